# Call 1 of the next session with a GPU (prepared in wave 21; in wave 22 nine starts were refused and loans paused, so it never ran).
# First, here: `git apply benchmarks/wave23_next/chain.patch` (the call's kernel chain as programmatic dependent
# launches, off unless LITEATTN_PDL=1; the split tail's vote kernel with its records loaded 32 ahead and one shared
# OR per state word; the combine kernel with float4 loads, four chunks in flight, and an element-wise path for out
# views that are not 8-byte aligned, with its test; tools/clock_probe.py --pdl-ab). Predictions: NOTES.md wave 21.
# Then on the GPU (wave 22: one call, since starts are scarce; each part runs only if the budget still has room for it):
# (1) an A/B build (-DLITEATTN_AB_VARIANTS=261123@128: the default kernels and the timeline variant); (2) the whole
# GPU suite with LITEATTN_PDL=1 (the chain on); (3) kernel_times at 32760x12x128 forced 0.5:balanced, PDL off (each
# small kernel's own time) and on (the span); (4) the clock probe, PDL on / off in one process, at 4096x12x128;
# (5) the per-CTA timeline at 4096x12x128, f = 1 and forced 0.5; (6) bench.py's table with the chain on;
# (7) the timeline at 16896x8x128; the clock probe at 32760x12x128 forced 0.5; the sanitizer on the split cases.
# If all pass and PDL helps, set kDependentLaunchByDefault = true (csrc/dependent_launch.cuh).
# Run as  mkdir -p $OUT && BUDGET=560 bash benchmarks/wave23_next/call1.sh 2>&1 | tee $OUT/output.txt  (carry [".whl"])
set -u
START=$(date +%s)
left() { echo $(( ${BUDGET:-590} - ($(date +%s) - START) )); }
# One A/B build serves both: the default kernels for the suite and the table, the timeline variant (261123) for
# the per-CTA timeline.
CMAKE_ARGS='-DLITEATTN_AB_VARIANTS=261123@128' OUT=$OUT bash tools/gpu_suite.sh build > $OUT/build_part.log 2>&1 || { tail -30 $OUT/build_part.log; exit 1; }
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
timeline() {  # the per-CTA timeline: where the skip kernel's per-call and per-row excess goes
  local shape=$1 forced=$2 name
  name=$(echo "tl_${shape}_${forced:-f1}" | tr ',:.' '___')
  timeout 60 python3 tools/cta_timeline.py --shape $shape --modes dense,skip ${forced:+--forced $forced} \
    --csv $OUT/$name > $OUT/$name.log 2>&1
  echo "== timeline $shape ${forced:-f=1} rc $? ($(left) s left)"; tail -14 $OUT/$name.log
}
[ $(left) -gt 130 ] && timeline 4096,12,128 ""
[ $(left) -gt 130 ] && timeline 4096,12,128 0.5:balanced
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv > $OUT/smi.txt 2>&1
# The version's table (issue 10 / 12) with the chain on; wave 20's took 73 s.
[ $(left) -gt 100 ] && { LITEATTN_PDL=1 OUT=$OUT timeout $(( $(left) - 15 )) bash tools/gpu_suite.sh bench > $OUT/bench_part.log 2>&1; echo "bench rc $? ($(left) s left)"; tail -32 $OUT/bench_part.log; }
[ $(left) -gt 60 ] && timeline 16896,8,128 ""
[ $(left) -gt 60 ] && timeline 16896,8,128 0.5:balanced
[ $(left) -gt 70 ] && { timeout 60 python3 tools/clock_probe.py --shape 32760,12,128 --seconds 1.5 --kernels skip --forced 0.5:balanced --pdl-ab > $OUT/probe_32760.log 2>&1; echo "probe 32760 rc $?"; tail -5 $OUT/probe_32760.log; }
[ $(left) -gt 100 ] && { LITEATTN_PDL=1 timeout $(( $(left) - 20 )) python3 tools/sanitize.py --tools memcheck,racecheck,synccheck --parallel --cases split,skipsplit --kernel-filter liteattn --log-dir $OUT/sanitize > $OUT/sanitize.log 2>&1; echo "sanitize rc $?"; tail -6 $OUT/sanitize.log; }
cat $OUT/smi.txt
echo "($(left) s left)"
cd $OUT && tar czf logs.tgz --exclude output.txt --exclude logs.tgz * && find . -type f ! -name output.txt ! -name logs.tgz -delete
