# Wave 9 call 4: A/B of `rowstores` (NOTES.md "Experiment (wave 9 call 4)"): the epilogue's 32 stores per thread
# from one base pointer per row at constant offsets, predicated on the row, instead of a branch and a 64-bit address each.
set -u
export LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) PYTHONUNBUFFERED=1
T0=$(date +%s); st() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
OUT=$OUT CMAKE_ARGS='-DLITEATTN_AB_VARIANTS=7171@128;7169@64' bash tools/gpu_suite.sh build || exit 1
rm -f $OUT/build.log
export PYTHONPATH=/tmp/site
st check
timeout 90 python3 tools/check_variants.py default,rowstores > $OUT/check.log 2>&1
echo "check rc $? ok lines: $(grep -c ' ok' $OUT/check.log)"; grep -E "FAIL|Error|CHECK" $OUT/check.log | head -8
st ab
timeout 200 python3 tools/bench.py --only ours,ours_int8,sdpa --shapes 4096,12,128 16384,4,64 16384,24,128 32760,12,128 \
  32760,24,64 --variants default,rowstores --repeats 4 --fractions "" --big-fractions "" --no-structured \
  --json $OUT/ab.json > $OUT/ab.log 2>&1; echo "ab rc $?"
st done
python3 benchmarks/wave8/call1/table.py $OUT/ab.json
