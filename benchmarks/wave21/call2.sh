# Wave 21, call 2: the call's kernel chain as programmatic dependent launches (csrc/dependent_launch.cuh) and the
# split tail's vote / combine kernels with their loads in flight. (1) build; (2) the whole GPU suite; (3) the clock
# probe, PDL on / off in one process (A B A B), at 4096x12x128 skip f = 1 (schedule -> forward), 32760x12x128 dense
# (forward -> combine) and skip forced 0.5:balanced (schedule -> forward -> combine -> vote); (4) kernel_times with
# PDL off (each small kernel's own time) and on (the span); (5) the sanitizer on the split-tail cases.
# Run as  mkdir -p $OUT && BUDGET=590 bash benchmarks/wave21/call2.sh 2>&1 | tee $OUT/output.txt | tail -60  (carry [".whl"])
set -u
START=$(date +%s)
left() { echo $(( ${BUDGET:-590} - ($(date +%s) - START) )); }
OUT=$OUT bash tools/gpu_suite.sh build > $OUT/build_part.log 2>&1 || { tail -30 $OUT/build_part.log; exit 1; }
tail -2 $OUT/build_part.log
export LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
timeout 270 python3 -m pytest -m cuda tests/ -q -n 6 -p no:cacheprovider > $OUT/tests.log 2>&1
echo "tests rc $? ($(left) s left): $(tail -1 $OUT/tests.log)"; grep -E '^(FAILED|ERROR)' $OUT/tests.log | head -20
timeout 50 python3 tools/clock_probe.py --shape 4096,12,128 --seconds 1 --kernels dense,skip --pdl-ab > $OUT/probe_4096.log 2>&1
echo "probe 4096 rc $?"; tail -9 $OUT/probe_4096.log
timeout 70 python3 tools/clock_probe.py --shape 32760,12,128 --seconds 1.5 --kernels dense,skip --forced 0.5:balanced --pdl-ab > $OUT/probe_32760.log 2>&1
echo "probe 32760 rc $?"; tail -9 $OUT/probe_32760.log
for pdl in 0 1; do
  LITEATTN_PDL=$pdl timeout 45 python3 tools/kernel_times.py --shape 32760,12,128 --calls 5 --modes dense,skip --forced 0.5:balanced > $OUT/kt_pdl$pdl.log 2>&1
  echo "kernel_times PDL=$pdl rc $?"; grep -v '^$' $OUT/kt_pdl$pdl.log | tail -14
done
[ $(left) -gt 100 ] && { timeout $(( $(left) - 20 )) python3 tools/sanitize.py --tools memcheck,racecheck,synccheck --parallel --cases split,skipsplit --kernel-filter liteattn --log-dir $OUT/sanitize > $OUT/sanitize.log 2>&1; echo "sanitize rc $?"; tail -6 $OUT/sanitize.log; }
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv
echo "($(left) s left)"
cd $OUT && tar czf logs.tgz --exclude output.txt --exclude logs.tgz * && find . -type f ! -name output.txt ! -name logs.tgz -delete
