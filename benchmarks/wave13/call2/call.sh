# Wave 13 call 2: call 1's racecheck found 20 hazards (1799 errors) on the persistskip default. (a) Does racecheck
# model mbarrier arrive / wait at all? (mbarrier_probe.cu: ordered by an mbarrier / a real race / __syncthreads.)
# (b) The sanitizer again on the kernel with the TMA thread's arrival on state_empty (a row with no visited tile
# had no ordering between the TMA thread's visit-word reads and the refill), full logs kept, hazards summarised
# by source line. (c) The GPU test suite on this default.
set -u
export CMAKE_ARGS='-DLITEATTN_AB_VARIANTS=23555@128;7169@64'
OUT=$OUT bash tools/gpu_suite.sh build || exit 1
rm -f $OUT/build.log
export LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
T0=$(date +%s); st() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
nvcc -gencode=arch=compute_90a,code=sm_90a -lineinfo -o /tmp/probe benchmarks/wave13/mbarrier_probe.cu
for m in 0 1 2; do
  compute-sanitizer --tool racecheck --racecheck-report all /tmp/probe $m > $OUT/probe_$m.log 2>&1
  echo "probe mode $m: $(grep -E '^mode' $OUT/probe_$m.log) | $(grep -E 'RACECHECK SUMMARY' $OUT/probe_$m.log)"
done
st sanitize
mkdir -p $OUT/san
timeout 220 python3 tools/sanitize.py --parallel --log-dir $OUT/san > $OUT/sanitize.log 2>&1; echo "sanitize rc $?"; tail -6 $OUT/sanitize.log
python3 - $OUT/san/sanitize_racecheck.log <<'PY'
import collections, re, sys
text = open(sys.argv[1], errors="replace").read()
pairs = collections.Counter()
for m in re.finditer(r"Race reported between (\w+) access at (.*?) in (\S+?):(\d+)\s*\n=+\s+and (\w+) access at (.*?) in (\S+?):(\d+)", text):
    a = f"{m[1]} {m[3].split('/')[-1]}:{m[4]}"; b = f"{m[5]} {m[7].split('/')[-1]}:{m[8]}"
    pairs[(a, b)] += 1
for (a, b), c in pairs.most_common(20): print(f"  hazard x{c}: {a}  <->  {b}")
if not pairs: print("  no parsed hazards; first race lines:"); [print("  " + l[:300]) for l in text.splitlines() if "Race" in l or "access at" in l][:12]
PY
grep -E "^case .*FAIL|differs|worker done" $OUT/san/sanitize_racecheck.log | head -5
st tests
timeout 250 python3 -m pytest -m cuda tests/ -q -n 6 -p no:cacheprovider > $OUT/tests.log 2>&1; echo "tests rc $?"
grep -E "^(FAILED|ERROR)" $OUT/tests.log | head -10; tail -1 $OUT/tests.log
st done
cd $OUT && tar czf san_logs.tgz san probe_*.log && rm -rf san probe_*.log
