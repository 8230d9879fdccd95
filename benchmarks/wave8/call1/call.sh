# Wave 8 call 1: A/B of kernel v11 candidates in one build (INT8 kernels on): the tree row max (new default bit),
# persistent INT8 dense CTAs (new: the INT8 dense path follows the persist bit), FMA-pipe exp2 for 1 or 2 of every 8
# exponentials (poly1, poly2), the partial-tile mask on its own branch (maskbranch). (BN 192 left out: one build round fewer.)
# Correctness of every variant first (check_variants, bf16 and INT8), then the timings, A B C ... A B C.
set -u
export LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) PYTHONUNBUFFERED=1
T0=$(date +%s); st() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
OUT=$OUT CMAKE_ARGS='-DLITEATTN_AB_VARIANTS=1027@128;2051@128;3587@128;7171@128;11267@128;1025@64;2049@64;7169@64' \
  bash tools/gpu_suite.sh build || exit 1
export PYTHONPATH=/tmp/site
st check_variants
timeout 120 python3 tools/check_variants.py default,notreemax,nopersist,maskbranch,poly1,poly2 > $OUT/check.log 2>&1
echo "check rc $? ok lines: $(grep -c ' ok' $OUT/check.log)"; grep -E "FAIL|Error|CHECK" $OUT/check.log | head -12
st bench d128
timeout 200 python3 tools/bench.py --only ours,ours_int8,sdpa --shapes 4096,12,128 16384,24,128 32760,12,128 \
  --variants default,notreemax,nopersist,maskbranch,poly1,poly2 --repeats 2 --fractions "" --big-fractions "" \
  --no-structured --json $OUT/bench128.json > $OUT/bench128.log 2>&1
echo "bench128 rc $?"
st bench d64
timeout 100 python3 tools/bench.py --only ours,ours_int8,sdpa --shapes 16384,4,64 32760,24,64 \
  --variants default,notreemax,nopersist,poly1 --repeats 2 --fractions "" --big-fractions "" \
  --no-structured --json $OUT/bench64.json > $OUT/bench64.log 2>&1
echo "bench64 rc $?"
st done
python3 benchmarks/wave8/call1/table.py $OUT/bench128.json $OUT/bench64.json
