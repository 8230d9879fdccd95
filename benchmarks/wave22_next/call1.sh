# Next session, call 1 (prepared in wave 21, not run: the session's device time went to refused starts).
# First, here: `git apply benchmarks/wave22_next/chain.patch` (the call's kernel chain as programmatic dependent
# launches, off unless LITEATTN_PDL=1; the split tail's vote kernel with its records loaded 32 ahead and one shared
# OR per state word; the combine kernel with float4 loads, four chunks in flight, and an element-wise path for out
# views that are not 8-byte aligned, with its test; tools/clock_probe.py --pdl-ab). Predictions: NOTES.md wave 21.
# Then on the GPU: (1) build; (2) the whole GPU suite with LITEATTN_PDL=1 (the chain on); (3) kernel_times at
# 32760x12x128 forced 0.5:balanced, PDL off (each small kernel's own time) and on (the span); (4) the clock probe, PDL
# on / off in one process, at 4096x12x128 (schedule -> forward) and 32760x12x128 forced 0.5; (5) time permitting, the
# sanitizer on the split cases with the chain on. If all pass and PDL helps, set kDependentLaunchByDefault = true
# (csrc/dependent_launch.cuh) and run the suite once more with LITEATTN_PDL unset.
# Run as  mkdir -p $OUT && BUDGET=590 bash benchmarks/wave22_next/call1.sh 2>&1 | tee $OUT/output.txt | tail -60  (carry [".whl"])
set -u
START=$(date +%s)
left() { echo $(( ${BUDGET:-590} - ($(date +%s) - START) )); }
OUT=$OUT bash tools/gpu_suite.sh build > $OUT/build_part.log 2>&1 || { tail -30 $OUT/build_part.log; exit 1; }
tail -1 $OUT/build_part.log; echo "($(left) s left)"
export LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
LITEATTN_PDL=1 timeout 270 python3 -m pytest -m cuda tests/ -q -n 6 -p no:cacheprovider > $OUT/tests.log 2>&1
echo "tests (PDL on) rc $? ($(left) s left): $(tail -1 $OUT/tests.log)"; grep -E '^(FAILED|ERROR)' $OUT/tests.log | head -20
for pdl in 0 1; do
  LITEATTN_PDL=$pdl timeout 40 python3 tools/kernel_times.py --shape 32760,12,128 --calls 5 --modes dense,skip --forced 0.5:balanced > $OUT/kt_pdl$pdl.log 2>&1
  echo "kernel_times PDL=$pdl rc $?"; grep -v '^$' $OUT/kt_pdl$pdl.log | tail -12
done
timeout 45 python3 tools/clock_probe.py --shape 4096,12,128 --seconds 1 --kernels dense,skip --pdl-ab > $OUT/probe_4096.log 2>&1
echo "probe 4096 rc $?"; tail -9 $OUT/probe_4096.log
timeout 60 python3 tools/clock_probe.py --shape 32760,12,128 --seconds 1.5 --kernels skip --forced 0.5:balanced --pdl-ab > $OUT/probe_32760.log 2>&1
echo "probe 32760 rc $?"; tail -5 $OUT/probe_32760.log
[ $(left) -gt 100 ] && { LITEATTN_PDL=1 timeout $(( $(left) - 20 )) python3 tools/sanitize.py --tools memcheck,racecheck,synccheck --parallel --cases split,skipsplit --kernel-filter liteattn --log-dir $OUT/sanitize > $OUT/sanitize.log 2>&1; echo "sanitize rc $?"; tail -6 $OUT/sanitize.log; }
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv
echo "($(left) s left)"
cd $OUT && tar czf logs.tgz --exclude output.txt --exclude logs.tgz * && find . -type f ! -name output.txt ! -name logs.tgz -delete
