# Wave 12 call 3: A/B of `widev` (V^T's shared-memory atoms key-row-major: 2 TMA boxes per d128 V tile instead of 44)
# on the default and on persistskip. Wave 12 call 2's ncu: persistskip's producer thread moves its TMA operands
# through R2UR before each of the 46 boxes a tile and falls behind (consumers' k_full wait 13.6 % of samples, 1.3 % in
# the default). d64's V tile is one box in both layouts (23553 = the default's code: the noise control there).
set -u
export CMAKE_ARGS='-DLITEATTN_AB_VARIANTS=23555@128;31747@128;23553@64'
OUT=$OUT bash tools/gpu_suite.sh build || exit 1
export LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
T0=$(date +%s); st() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
timeout 150 python3 tools/check_variants.py default,widev,persistskip+widev > $OUT/check.log 2>&1
st "check rc $?: $(grep -c ' ok' $OUT/check.log) ok; $(grep 'CHECK FAILURES' $OUT/check.log)"
grep -E " FAIL$|Error" $OUT/check.log | head -8
timeout 240 python3 tools/bench.py --only ours,ours_int8,sdpa \
  --shapes 4096,12,128 16384,4,64 16384,24,128 32760,12,128 32760,24,64 \
  --variants default,widev,persistskip+widev --repeats 2 --fractions 0.5,0.25 --kinds balanced \
  --big-fractions "" --no-structured --json $OUT/ab.json > $OUT/ab.log 2>&1
st "bench rc $?"
LITEATTN_VARIANT=widev timeout 120 python3 -m pytest -m cuda tests/test_kernel_cuda.py -q -n 6 -p no:cacheprovider \
  > $OUT/tests_widev.log 2>&1
st "kernel tests under widev rc $?: $(tail -1 $OUT/tests_widev.log)"
grep -E "^FAILED" $OUT/tests_widev.log | grep -v "dtype1\]\|float16" | head -5
rm -f $OUT/build.log
python3 tools/ab_table.py $OUT/ab.json
