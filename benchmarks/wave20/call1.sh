# Wave 20, call 1 (prepared at the end of wave 19 as benchmarks/wave20_next/call1.sh): main as it is, on an H200 if one comes (the "/FA3"
# column needs one). Wave 19 changed host code on the skip path (the schedule kernel zeroes the work counter; the small
# kernels ask for the forward kernel's carveout), and the whole GPU suite has not run on it. ~9 min: build; the whole
# GPU suite (`pytest -m cuda tests/`); bench.py's full table with cuDNN in the same run; memcheck, racecheck and synccheck
# of every sanitizer case with only our kernels instrumented. Run as
#   mkdir -p $OUT && BUDGET=560 bash benchmarks/wave20/call1.sh 2>&1 | tee $OUT/output.txt | tail -60   (carry [".whl"])
set -u
START=$(date +%s)
left() { echo $(( ${BUDGET:-560} - ($(date +%s) - START) )); }
OUT=$OUT bash tools/gpu_suite.sh build tests || exit 1
rm -f $OUT/build.log
export LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv > $OUT/smi.txt 2>&1
echo "bench ($(left) s left)"
[ $(left) -gt 120 ] && OUT=$OUT bash tools/gpu_suite.sh bench
echo "sanitize ($(left) s left)"
[ $(left) -gt 40 ] && timeout $(( $(left) - 20 )) python3 tools/sanitize.py --tools memcheck,racecheck,synccheck --parallel \
  --kernel-filter liteattn --log-dir $OUT/sanitize > $OUT/sanitize.log 2>&1; echo "sanitize rc $?"; tail -6 $OUT/sanitize.log
cat $OUT/smi.txt
cd $OUT && tar czf logs.tgz --exclude output.txt --exclude logs.tgz * && find . -type f ! -name output.txt ! -name logs.tgz -delete; ls $OUT
