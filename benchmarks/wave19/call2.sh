# Wave 19, call 2: the state reader's quiet wait (kVariantQuietReader, default at d128) and one launch fewer per skip
# call (the schedule kernel zeroes the work counter; the small kernels ask for the forward kernel's carveout).
# A/B build: 130051@128 = the previous d128 default (LITEATTN_VARIANT=noquietreader; the host-side changes apply to
# both). ~8 min: build; the kernel tests under the default; racecheck + synccheck of the skip cases (only our kernels
# instrumented); the clock probe (A B C D A B C D, the dense kernel as the control) at the no-tail shape and at
# 32760x12x128 (f = 1, forced 0.5 heavy-last); kernel_times.py at both shapes (the per-call gaps: call 1 had 14.6 us
# of idle GPU per skip call at 16896x8x128); ncu instruction counts of the skip kernel. Run as
#   mkdir -p $OUT && BUDGET=560 bash benchmarks/wave19/call2.sh 2>&1 | tee $OUT/output.txt | tail -80   (carry [".whl"])
# (Never ran: the device gave no machine; call2b.sh is what ran.) (quietreader was measured in call 2b and removed: LITEATTN_VARIANT=noquietreader no longer exists on main.)
set -u
START=$(date +%s)
left() { echo $(( ${BUDGET:-560} - ($(date +%s) - START) )); }
export CMAKE_ARGS='-DLITEATTN_AB_VARIANTS=130051@128'
OUT=$OUT bash tools/gpu_suite.sh build || exit 1
rm -f $OUT/build.log
export LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv > $OUT/smi.txt 2>&1
echo "kernel tests ($(left) s left)"
KT="tests/test_kernel_cuda.py tests/test_int8_cuda.py tests/test_cuda_graph_state.py"
timeout 120 python3 -m pytest -m cuda $KT -q -n 6 -p no:cacheprovider -rs > $OUT/tests_default.log 2>&1
echo "kernel tests (default) rc $?"; grep -E "^(FAILED|ERROR)" $OUT/tests_default.log | head; tail -1 $OUT/tests_default.log
echo "racecheck ($(left) s left)"
timeout 150 python3 tools/sanitize.py --tools racecheck,synccheck,memcheck --parallel \
  --cases skipsplit,skip,forced,int8 --kernel-filter liteattn --log-dir $OUT/sanitize > $OUT/sanitize.log 2>&1
echo "sanitize rc $?"; tail -6 $OUT/sanitize.log
probe() {  # name, then clock_probe.py's arguments
  local name=$1; shift
  echo "clock probe $name ($(left) s left)"
  [ $(left) -gt 50 ] && timeout 60 python3 tools/clock_probe.py --seconds 3 "$@" > $OUT/clock_$name.log 2>&1
  tail -9 $OUT/clock_$name.log
}
probe notail --shape 16896,8,128 --kernels dense,skip --variants default,noquietreader
probe f1 --shape 32760,12,128 --kernels dense,skip --variants default,noquietreader
probe hl50 --shape 32760,12,128 --kernels dense,skip --variants default,noquietreader --forced 0.5:heavy-last
for shape in 16896,8,128 32760,12,128; do
  echo "kernel times $shape ($(left) s left)"
  [ $(left) -gt 40 ] && timeout 40 python3 tools/kernel_times.py --shape $shape > $OUT/kernel_times_$shape.log 2>&1
  grep -v Warn $OUT/kernel_times_$shape.log | grep -v warn_once | tail -12
done
echo "ncu ($(left) s left)"
[ $(left) -gt 60 ] && NCU_MODES=skip NCU_SHAPE=16896,8,128 OUT=$OUT bash tools/gpu_suite.sh ncu
cat $OUT/smi.txt
cd $OUT && tar czf logs.tgz --exclude output.txt --exclude logs.tgz * && find . -type f ! -name output.txt ! -name logs.tgz -delete; ls $OUT
