# Prepared at the end of wave 8 for the next session's first device call (~6 min): the `mmasum` A/B (NOTES.md
# "Prepared, not measured") and its correctness (check_variants, both Q/K modes). The sanitizer cannot run a bf16-only
# A/B variant (its fp16 cases raise "not built"), so it runs after adoption.
# Then, if mmasum wins: make it the default bit (csrc/liteattn.h, default_variant) and run
# `bash tools/gpu_suite.sh build tests sanitize bench` on that version.
set -u
export LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) PYTHONUNBUFFERED=1
T0=$(date +%s); st() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
OUT=$OUT CMAKE_ARGS='-DLITEATTN_AB_VARIANTS=68611@128;68609@64' bash tools/gpu_suite.sh build || exit 1
rm -f $OUT/build.log
export PYTHONPATH=/tmp/site
st check
timeout 60 python3 tools/check_variants.py default,mmasum > $OUT/check.log 2>&1
echo "check rc $? ok lines: $(grep -c ' ok' $OUT/check.log)"; grep -E "FAIL|Error|CHECK" $OUT/check.log | head -8
st ab
timeout 120 python3 tools/bench.py --only ours,ours_int8,sdpa --shapes 4096,12,128 16384,4,64 16384,24,128 32760,12,128 \
  32760,24,64 --variants default,mmasum --repeats 3 --fractions "" --big-fractions "" --no-structured \
  --json $OUT/ab.json > $OUT/ab.log 2>&1; echo "ab rc $?"
st done
python3 benchmarks/wave8/call1/table.py $OUT/ab.json
