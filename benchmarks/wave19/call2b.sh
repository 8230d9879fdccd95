# Wave 19, call 2b: call 2 (benchmarks/wave19/call2.sh) cut to what ~300 s of device time holds after the device
# refused six starts: build (A/B 130051@128 = the previous d128 default, LITEATTN_VARIANT=noquietreader); the kernel
# tests under the new default; racecheck + synccheck of the skip cases; the clock probe of quietreader vs not at the
# no-tail shape; kernel_times.py there. Each step runs only if the budget still holds it. Run as
#   mkdir -p $OUT && BUDGET=280 bash benchmarks/wave19/call2b.sh 2>&1 | tee $OUT/output.txt | tail -60   (carry [".whl"])
# With less time (BUDGET=180): the build and as much of the kernel tests as fits (their timeout shrinks to the budget).
# (quietreader was measured in call 2b and removed: LITEATTN_VARIANT=noquietreader no longer exists on main.)
set -u
START=$(date +%s)
left() { echo $(( ${BUDGET:-280} - ($(date +%s) - START) )); }
export CMAKE_ARGS='-DLITEATTN_AB_VARIANTS=130051@128'
OUT=$OUT bash tools/gpu_suite.sh build || exit 1
rm -f $OUT/build.log
export LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
echo "kernel tests ($(left) s left)"
KT="tests/test_kernel_cuda.py tests/test_int8_cuda.py tests/test_cuda_graph_state.py"
[ $(left) -gt 30 ] && timeout $(( $(left) - 15 < 95 ? $(left) - 15 : 95 )) python3 -m pytest -m cuda $KT -q -n 8 \
  -p no:cacheprovider > $OUT/tests_default.log 2>&1
echo "kernel tests (default) rc $?"; grep -E "^(FAILED|ERROR)" $OUT/tests_default.log | head; tail -1 $OUT/tests_default.log
echo "racecheck ($(left) s left)"
[ $(left) -gt 50 ] && timeout 45 python3 tools/sanitize.py --tools racecheck,synccheck --parallel \
  --cases skipsplit,skip,forced --kernel-filter liteattn --log-dir $OUT/sanitize > $OUT/sanitize.log 2>&1
echo "sanitize rc $?"; tail -4 $OUT/sanitize.log
echo "clock probe ($(left) s left)"
[ $(left) -gt 30 ] && timeout 40 python3 tools/clock_probe.py --seconds 2 --shape 16896,8,128 --kernels dense,skip \
  --variants default,noquietreader > $OUT/clock_notail.log 2>&1
tail -9 $OUT/clock_notail.log
echo "kernel times ($(left) s left)"
[ $(left) -gt 15 ] && timeout 25 python3 tools/kernel_times.py --shape 16896,8,128 > $OUT/kernel_times.log 2>&1
grep -v -i warn $OUT/kernel_times.log | tail -9
