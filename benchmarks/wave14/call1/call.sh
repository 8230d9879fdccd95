# Wave 14, call 1 (one call, since device starts were scarce): the persistskip default (wave 13's hand-off fixes)
# built with the wave 12 default beside it (23555@128 / 7169@64 = "nopersistskip"), in the new compile-unit layout;
# then the sanitizer's four tools and the GPU suite side by side (neither is timed), then, alone on the GPU, an A/B
# of default vs nopersistskip with the structured case and bench.py's full table in what is left (~8-9 min in all).
set -u
START=$(date +%s)
grep -A3 "constexpr int default_variant" csrc/liteattn.h | grep -q "kVariantPersistSkip" \
  || { echo "call1: default_variant has no kVariantPersistSkip"; exit 1; }
export CMAKE_ARGS='-DLITEATTN_AB_VARIANTS=23555@128;7169@64'
OUT=$OUT bash tools/gpu_suite.sh build || exit 1
ls build/*/generated/instantiations/ | tr '\n' ' '; echo
rm -f $OUT/build.log
export LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
T0=$(date +%s); st() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
st "sanitize + tests"
mkdir -p $OUT/san
timeout 270 python3 tools/sanitize.py --parallel --print-limit 200 --log-dir $OUT/san > $OUT/sanitize.log 2>&1 &
SAN=$!
timeout 270 python3 -m pytest -m cuda tests/ -q -n 6 -p no:cacheprovider > $OUT/tests.log 2>&1 &
TESTS=$!
wait $SAN; echo "sanitize rc $?"; sed -n '/^tool /,$p' $OUT/sanitize.log | head -40
wait $TESTS; echo "tests rc $?"; grep -E "^(FAILED|ERROR)" $OUT/tests.log | head -20; tail -1 $OUT/tests.log
st ab
timeout 130 python3 tools/bench.py --only ours,sdpa \
  --shapes 16384,4,64 16384,24,128 32760,12,128 32760,24,64 \
  --variants default,nopersistskip --repeats 2 --fractions 0.5,0.25 --kinds balanced,heavy-last \
  --big-fractions "" --json $OUT/ab.json > $OUT/ab.log 2>&1; echo "ab rc $?"
python3 tools/ab_table.py $OUT/ab.json
# The full table gets what is left of the call's 600 s ($OUT comes back even if the call is cut off).
LEFT=$(( 570 - ($(date +%s) - START) ))
st "bench (${LEFT} s left)"
[ $LEFT -gt 60 ] && { timeout $LEFT python3 tools/bench.py --only ours,ours_int8,sdpa --fractions 0.75,0.5,0.25 \
  --kinds balanced,heavy-first,heavy-last --big-fractions 0.5 --big-kinds balanced --json $OUT/bench.json \
  > $OUT/bench.log 2>&1; echo "bench rc $?"; }
st done
cd $OUT && tar czf san_logs.tgz san && rm -rf san && cd - > /dev/null
sed -n '/^summary/,$p' $OUT/bench.log | tail -14
