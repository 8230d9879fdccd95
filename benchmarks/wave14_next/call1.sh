# Next session, call 1 (prepared at the end of wave 13, not run): persistskip as the default for both head dims,
# with wave 13's hand-off fixes (the TMA thread arrives on state_empty after its last load of a row; every consumer
# thread arrives, not lane 0 after __syncwarp; the reader's lanes take the row by shuffle; compiler fences around
# the clobber-less CUTLASS arrive / wait). First make the default 31747 at d128 and 15361 at d64
# (csrc/liteattn.h: add kVariantPersistSkip to both; wave 13 had it so in commit ff062a3). Then, ~6-7 min:
# mbarrier_probe.cu mode 3 (does racecheck carry __syncwarp into an mbarrier's ordering?), the sanitizer's four
# tools (full racecheck report kept), check_variants and an A/B of the default against nopersistskip (the wave 12
# default, in the build as 23555@128 / 7169@64) with the structured case per variant.
set -u
grep -A3 "constexpr int default_variant" csrc/liteattn.h | grep -q "kVariantPersistSkip" \
  || { echo "call1: default_variant has no kVariantPersistSkip: adopt it first"; exit 1; }
export CMAKE_ARGS='-DLITEATTN_AB_VARIANTS=23555@128;7169@64'
OUT=$OUT bash tools/gpu_suite.sh build || exit 1
rm -f $OUT/build.log
export LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
T0=$(date +%s); st() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
OUT=$OUT bash benchmarks/wave13/mbarrier_probe.sh 0 1 3
st sanitize
mkdir -p $OUT/san
timeout 220 python3 tools/sanitize.py --parallel --print-limit 200 --log-dir $OUT/san > $OUT/sanitize.log 2>&1
echo "sanitize rc $?"; sed -n '/^tool /,$p' $OUT/sanitize.log  # the table, and racecheck's hazards by source line
st ab
timeout 120 python3 tools/check_variants.py default,nopersistskip > $OUT/check.log 2>&1
echo "check rc $?: $(grep -c ' ok' $OUT/check.log) ok; $(grep 'CHECK FAILURES' $OUT/check.log)"
timeout 200 python3 tools/bench.py --only ours,ours_int8,sdpa \
  --shapes 4096,12,128 16384,4,64 16384,24,128 32760,12,128 32760,24,64 \
  --variants default,nopersistskip --repeats 2 --fractions 0.5,0.25 --kinds balanced,heavy-last \
  --big-fractions "" --json $OUT/ab.json > $OUT/ab.log 2>&1; echo "ab rc $?"
st done
cd $OUT && tar czf logs.tgz san probe_*.log check.log && rm -rf san probe_*.log check.log && cd - > /dev/null
python3 tools/ab_table.py $OUT/ab.json
