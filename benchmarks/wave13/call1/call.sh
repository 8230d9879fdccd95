# Wave 13 call 1: persistskip adopted for both head dims (default_variant: 31747 at d128, 15361 at d64) -- the
# sanitizer's four tools on it (the 8-head cases have more query tiles than SMs: the row hand-off runs), then
# bench.py's full table (cuDNN in the same run; heavy-first / heavy-last kinds). The build also holds the old
# defaults (23555@128, 7169@64 = `nopersistskip`) for call 2's A/B.
set -u
export CMAKE_ARGS='-DLITEATTN_AB_VARIANTS=23555@128;7169@64'
OUT=$OUT bash tools/gpu_suite.sh build || exit 1
rm -f $OUT/build.log
export LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
T0=$(date +%s); st() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
st sanitize
timeout 220 python3 tools/sanitize.py --parallel > $OUT/sanitize.log 2>&1; echo "sanitize rc $?"; tail -6 $OUT/sanitize.log
grep -E "FAIL|differs" $OUT/sanitize.log | head -5
st bench
timeout 230 python3 tools/bench.py --only ours,ours_int8,sdpa --fractions 0.75,0.5,0.25 --kinds balanced,heavy-first,heavy-last \
  --big-fractions 0.5 --big-kinds balanced --json $OUT/bench.json > $OUT/bench.log 2>&1; echo "bench rc $?"
st done
sed -n '/^summary/,$p' $OUT/bench.log | tail -14
