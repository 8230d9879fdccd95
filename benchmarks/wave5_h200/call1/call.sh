# Wave 5 call 1: A/B of serial / serial+maskbranch at d128 (bf16 + INT8), then the two not-yet-GPU-run tests.
set -u
export LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) PYTHONUNBUFFERED=1
T0=$(date +%s); st() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
st build
CMAKE_ARGS='-DLITEATTN_AB_VARIANTS=259@128;771@128' OUT=$OUT bash tools/gpu_suite.sh build || exit 1
export PYTHONPATH=/tmp/site
st check_variants
timeout 120 python3 tools/check_variants.py default,serial,serial+maskbranch > $OUT/check_variants.log 2>&1; echo "rc $?"; tail -2 $OUT/check_variants.log
st int8-variant-tests
LITEATTN_VARIANT=serial+maskbranch timeout 90 python3 -m pytest -m cuda tests/test_int8_cuda.py -q -n 6 -p no:cacheprovider -rf > $OUT/int8_variant_tests.log 2>&1; echo "failed not for 'not built':"; grep "^FAILED" $OUT/int8_variant_tests.log | grep -vc "not built"; tail -1 $OUT/int8_variant_tests.log
st retest
timeout 100 python3 -m pytest -m cuda tests/test_int8_cuda.py tests/test_kernel_cuda.py -q -n 6 -p no:cacheprovider -k "int8 or key_bound or skip_decisions_over_calls" > $OUT/retest.log 2>&1; grep -E "^(FAILED|ERROR)" $OUT/retest.log | head; tail -1 $OUT/retest.log
st bench
timeout 260 python3 tools/bench.py --only ours,ours_int8,sdpa --shapes 32760,12,128 16384,24,128 75600,40,128 \
  --graph-shapes --variants default,serial,serial+maskbranch --repeats 2 --fractions 0.5 --kinds balanced \
  --big-fractions 0.5 --big-kinds balanced --no-structured --json $OUT/ab.json > $OUT/ab.log 2>&1; echo "rc $?"
st done
sed -n '/^summary/,$p' $OUT/ab.log | tail -45
