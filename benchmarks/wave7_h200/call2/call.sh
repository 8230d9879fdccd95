# Wave 7 call 2: A/B of the persistent dense kernel (variant bit 1024, "persist") against the default.
set -u
export LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) PYTHONUNBUFFERED=1
T0=$(date +%s); st() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
OUT=$OUT CMAKE_ARGS='-DLITEATTN_BUILD_INT8=OFF -DLITEATTN_AB_VARIANTS=1027@128;1025@64' bash tools/gpu_suite.sh build || exit 1
export PYTHONPATH=/tmp/site
st check_variants
timeout 150 python3 tools/check_variants.py default,persist > $OUT/check.log 2>&1; echo "check rc $?"
echo "ok lines: $(grep -c ' ok' $OUT/check.log)"; grep -E "FAIL|Error|differ" $OUT/check.log | head -8
st kernel tests under persist
LITEATTN_VARIANT=persist timeout 200 python3 -m pytest -m cuda tests/test_kernel_cuda.py -q -n 6 -p no:cacheprovider > $OUT/tests_persist.log 2>&1
echo "tests rc $?"; grep -E "^(FAILED|ERROR)" $OUT/tests_persist.log | head -10; tail -1 $OUT/tests_persist.log
st sanitize under persist
LITEATTN_VARIANT=persist timeout 200 python3 tools/sanitize.py --parallel --tools memcheck,racecheck > $OUT/sanitize.log 2>&1
echo "sanitize rc $?"; tail -5 $OUT/sanitize.log
st bench
timeout 240 python3 tools/bench.py --only ours,sdpa --shapes 4096,12,128 16384,4,64 16384,24,128 32760,12,128 32760,24,64 \
  --variants default,persist --repeats 2 --fractions "" --big-fractions "" --no-structured --json $OUT/bench.json > $OUT/bench.log 2>&1
echo "bench rc $?"; grep -E "^S=|ours dense|f=1.00|CUDNN" $OUT/bench.log
st done
