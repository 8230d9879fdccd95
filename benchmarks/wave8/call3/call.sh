# Wave 8 call 3: the issue-10/12 table on the v11 default (bench.py as tools/gpu_suite.sh's bench part), then an A/B
# of `prewait1` / `prewait2` (the tile max, or the whole softmax step, pinned before the wait for the previous P V:
# ncu in call 2 put 47 % of a consumer warp's samples after that wait). One build: the default + the A/B variants.
set -u
export LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) PYTHONUNBUFFERED=1
T0=$(date +%s); st() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
OUT=$OUT CMAKE_ARGS='-DLITEATTN_AB_VARIANTS=19459@128;35843@128;19457@64' bash tools/gpu_suite.sh build || exit 1
rm -f $OUT/build.log
export PYTHONPATH=/tmp/site
st check_variants
timeout 60 python3 tools/check_variants.py default,prewait1,prewait2 > $OUT/check.log 2>&1
echo "check rc $? ok lines: $(grep -c ' ok' $OUT/check.log)"; grep -E "FAIL|Error|CHECK" $OUT/check.log | head -8
st bench
timeout 280 python3 tools/bench.py --only ours,ours_int8,sdpa --fractions 0.75,0.5,0.25 --kinds balanced,heavy-first,heavy-last \
  --big-fractions 0.5 --big-kinds balanced --json $OUT/bench.json > $OUT/bench.log 2>&1
echo "bench rc $?"
st ab
timeout 60 python3 tools/bench.py --only ours,ours_int8 --shapes 4096,12,128 16384,24,128 32760,12,128 \
  --variants default,prewait1,prewait2 --repeats 2 --fractions "" --big-fractions "" --no-structured \
  --json $OUT/ab128.json > $OUT/ab128.log 2>&1; echo "ab128 rc $?"
timeout 40 python3 tools/bench.py --only ours,ours_int8 --shapes 16384,4,64 32760,24,64 \
  --variants default,prewait1 --repeats 2 --fractions "" --big-fractions "" --no-structured \
  --json $OUT/ab64.json > $OUT/ab64.log 2>&1; echo "ab64 rc $?"
st done
sed -n '/^summary/,$p' $OUT/bench.log | tail -30
python3 benchmarks/wave8/call1/table.py $OUT/ab128.json $OUT/ab64.json
