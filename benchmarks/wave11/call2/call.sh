# Wave 11 call 2: persistskip again, with one state-reader warp that sleeps on its mbarrier (suspend-time hint)
# instead of three polling warps (call 1: correct, but -12..-15 % at head dim 128, NOTES.md). Same A/B as call 1
# (balanced forced rows only); then the whole GPU test suite on the default kernels of this build (the latevote
# default; the A/B variants are extra instantiations, unused without LITEATTN_VARIANT).
set -u
export CMAKE_ARGS='-DLITEATTN_AB_VARIANTS=15363@128;15361@64'
OUT=$OUT bash tools/gpu_suite.sh build
export LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
T0=$(date +%s)
timeout 150 python3 tools/check_variants.py default,persistskip > $OUT/check.log 2>&1
echo "[$(( $(date +%s) - T0 )) s] check rc $?: $(grep -c ' ok' $OUT/check.log) ok; $(grep 'CHECK FAILURES' $OUT/check.log)"
grep -E " FAIL$|Error" $OUT/check.log | head -8
timeout 200 python3 tools/bench.py --only ours,ours_int8,sdpa \
  --shapes 4096,12,128 16384,4,64 16384,24,128 32760,12,128 32760,24,64 \
  --variants default,persistskip --repeats 2 --fractions 0.5,0.25 --kinds balanced \
  --big-fractions "" --no-structured --json $OUT/ab.json > $OUT/ab.log 2>&1
echo "[$(( $(date +%s) - T0 )) s] bench rc $?"
python3 tools/ab_table.py $OUT/ab.json
OUT=$OUT bash tools/gpu_suite.sh tests
