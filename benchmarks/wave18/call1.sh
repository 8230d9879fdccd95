# Wave 18, call 1: the skip loop's instruction cut (finiteness by FSETP |x| < inf; the visit list written in visit
# order, walked by one pointer) on the A/B build, then the last check before adopting splitskip at d128.
# ~8 min: build; the kernel tests under the default and under splitskip; racecheck + synccheck of tools/sanitize.py's
# skip cases under splitskip, only our kernels instrumented; the clock probe (each kernel back to back for 3 s, A B A B,
# the dense kernel as the control): skip f = 1 vs dense at a shape with no wave tail (16896x8x128; wave 17: +2.9 %
# cycles), and splitskip vs default on f = 1 and on forced heavy-last / heavy-first sets at 32760x12x128. Run as
#   mkdir -p $OUT && BUDGET=540 bash benchmarks/wave18/call1.sh 2>&1 | tee $OUT/output.txt | tail -70   (carry [".whl"])
# (Ran before splitskip was adopted: 130051 is now default_variant(128), and an A/B build must not list the default;
# the same A/B after the adoption is -DLITEATTN_AB_VARIANTS=64515@128;105473@64 with LITEATTN_VARIANT=nosplitskip.)
set -u
START=$(date +%s)
left() { echo $(( ${BUDGET:-540} - ($(date +%s) - START) )); }
export CMAKE_ARGS='-DLITEATTN_AB_VARIANTS=130051@128;105473@64'
OUT=$OUT bash tools/gpu_suite.sh build || exit 1
rm -f $OUT/build.log
export LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv > $OUT/smi.txt 2>&1
KT="tests/test_kernel_cuda.py tests/test_int8_cuda.py tests/test_cuda_graph_state.py"
timeout 100 python3 -m pytest -m cuda $KT -q -n 6 -p no:cacheprovider -rs > $OUT/tests_default.log 2>&1
echo "kernel tests (default) rc $?"; grep -E "^(FAILED|ERROR)" $OUT/tests_default.log | head; tail -1 $OUT/tests_default.log
LITEATTN_VARIANT=splitskip timeout 100 python3 -m pytest -m cuda $KT -q -n 6 -p no:cacheprovider -rs \
  > $OUT/tests_splitskip.log 2>&1
echo "kernel tests (splitskip) rc $?"; grep -E "^(FAILED|ERROR)" $OUT/tests_splitskip.log | head; tail -1 $OUT/tests_splitskip.log
compute-sanitizer --help 2>&1 | grep -A12 -- "--kernel-name" | head -16 > $OUT/sanitizer_help.txt
echo "racecheck ($(left) s left)"
LITEATTN_VARIANT=splitskip timeout 170 python3 tools/sanitize.py --tools racecheck,synccheck --parallel \
  --cases skipsplit,skip,forced --kernel-filter liteattn --log-dir $OUT/sanitize > $OUT/sanitize.log 2>&1
echo "sanitize rc $?"; tail -5 $OUT/sanitize.log
probe() {  # name, then clock_probe.py's arguments
  local name=$1; shift
  echo "clock probe $name ($(left) s left)"
  [ $(left) -gt 45 ] && timeout 60 python3 tools/clock_probe.py --seconds 3 "$@" > $OUT/clock_$name.log 2>&1
  tail -9 $OUT/clock_$name.log
}
probe notail --shape 16896,8,128 --kernels dense,skip --variants default,splitskip
probe hl50 --shape 32760,12,128 --kernels dense,skip --variants default,splitskip --forced 0.5:heavy-last
probe f1 --shape 32760,12,128 --kernels dense,skip --variants default,splitskip
probe hf50 --shape 32760,12,128 --kernels dense,skip --variants default,splitskip --forced 0.5:heavy-first
cat $OUT/smi.txt
cd $OUT && tar czf logs.tgz --exclude output.txt --exclude logs.tgz * && find . -type f ! -name output.txt ! -name logs.tgz -delete; ls $OUT
