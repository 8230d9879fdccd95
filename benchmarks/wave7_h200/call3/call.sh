# Wave 7 call 3: persistent dense CTAs as the default (v10) and the sliced schedule kernel; A/B against the
# one-tile-per-CTA dense kernel ("nopersist", built as an A/B variant), then the GPU suite and the sanitizer.
set -u
export LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) PYTHONUNBUFFERED=1
T0=$(date +%s); st() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
OUT=$OUT CMAKE_ARGS='-DLITEATTN_BUILD_INT8=OFF -DLITEATTN_AB_VARIANTS=3@128;1@64' bash tools/gpu_suite.sh build || exit 1
export PYTHONPATH=/tmp/site
st check_variants
timeout 50 python3 tools/check_variants.py default,nopersist > $OUT/check.log 2>&1; echo "check rc $?"
echo "ok lines: $(grep -c ' ok' $OUT/check.log)"; grep -E "FAIL|Error|differ" $OUT/check.log | grep -v "differing 0" | head -8
st bench
timeout 110 python3 tools/bench.py --only ours,sdpa --shapes 4096,12,128 16384,4,64 16384,24,128 32760,12,128 32760,24,64 \
  --variants default,nopersist --repeats 2 --fractions "" --big-fractions "" --no-structured --json $OUT/bench.json > $OUT/bench.log 2>&1
echo "bench rc $?"
st tests
timeout 220 python3 -m pytest -m cuda tests/ -q -n 8 -p no:cacheprovider > $OUT/tests.log 2>&1
echo "tests rc $?"; grep -E "^(FAILED|ERROR)" $OUT/tests.log | head -10; tail -1 $OUT/tests.log
st sanitize
timeout 80 python3 tools/sanitize.py --parallel --tools memcheck,racecheck > $OUT/sanitize.log 2>&1
echo "sanitize rc $?"; tail -4 $OUT/sanitize.log
st done
grep -E "^S=|ours dense|f=1.00|CUDNN" $OUT/bench.log | cut -c1-110
