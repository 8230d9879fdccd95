# Wave 18, call 2: main with splitskip adopted at d128 and the skip loop's instruction cut, on whatever card comes
# (no A/B build: the tests run every dtype). ~9 min: build; the whole GPU suite; compute-sanitizer's four tools over
# every case of tools/sanitize.py with only our kernels instrumented; bench.py's full table with cuDNN in the same run;
# ncu of dense / skip f = 1 at 16896x8x128 (no wave tail); the clock probe of dense / skip f = 1 at 32760x12x128. One archive comes back. Run as
#   mkdir -p $OUT && BUDGET=575 bash benchmarks/wave18/call2.sh 2>&1 | tee $OUT/output.txt | tail -70   (carry [".whl"])
set -u
START=$(date +%s)
left() { echo $(( ${BUDGET:-575} - ($(date +%s) - START) )); }
OUT=$OUT bash tools/gpu_suite.sh build || exit 1
rm -f $OUT/build.log
export LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv > $OUT/smi.txt 2>&1
OUT=$OUT bash tools/gpu_suite.sh tests
echo "sanitize ($(left) s left)"
timeout 150 python3 tools/sanitize.py --parallel --kernel-filter liteattn --log-dir $OUT/sanitize > $OUT/sanitize.log 2>&1
echo "sanitize rc $?"; tail -7 $OUT/sanitize.log
echo "bench ($(left) s left)"
[ $(left) -gt 110 ] && OUT=$OUT bash tools/gpu_suite.sh bench
# ncu of dense vs skip f = 1 at the no-tail shape: where the skip path's +3 % cycles go (NOTES.md "Wave 18").
M=sm__cycles_active.avg,smsp__inst_executed.sum,sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active
for V in dense skip; do
  echo "ncu $V ($(left) s left)"
  [ $(left) -gt 100 ] || break
  timeout 60 ncu -k regex:fwd_kernel --launch-skip 3 --launch-count 1 --section SpeedOfLight --section WarpStateStats \
    --section SchedulerStats --section SourceCounters --metrics $M -o $OUT/ncu_$V -f \
    python3 tools/ncu_worker.py $V 16896,8,128 > $OUT/ncu_$V.log 2>&1; echo "ncu $V rc $?"
  ncu -i $OUT/ncu_$V.ncu-rep --page details > $OUT/ncu_${V}_details.txt 2>&1
  ncu -i $OUT/ncu_$V.ncu-rep --page source --csv --print-source sass 2>&1 | gzip > $OUT/ncu_${V}_sass.csv.gz
  rm -f $OUT/ncu_$V.ncu-rep
  grep -E "^ +(Duration|Elapsed Cycles|Issued Warp Per|No Eligible|sm__cycles_active|smsp__inst_executed.sum|sm__pipe_tensor)" \
    $OUT/ncu_${V}_details.txt | tr -s ' ' | head -8
done
echo "clock probe ($(left) s left)"
[ $(left) -gt 40 ] && timeout $(( $(left) - 10 )) python3 tools/clock_probe.py --shape 32760,12,128 --seconds 3 \
  --kernels dense,skip > $OUT/clock.log 2>&1; tail -5 $OUT/clock.log
cat $OUT/smi.txt
cd $OUT && tar czf logs.tgz --exclude output.txt --exclude logs.tgz * && find . -type f ! -name output.txt ! -name logs.tgz -delete; ls $OUT
