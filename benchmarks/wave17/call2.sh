# Wave 17, call 2: main with the -inf-safe exponent bias (softmax.cuh kNoMax) and its test, on whatever card comes.
# ~8 min: build, the GPU suite, memcheck of tools/sanitize.py's cases, bench.py's full table with cuDNN in the same
# run, then the clock probe of dense / skip f = 1 / cuDNN at a shape with no wave tail (16896x8x128: 1056 query tiles
# = 8 rounds of 132 SMs; is the skip path's f = 1 gap cycles or clock?). One archive comes back. Run as
#   mkdir -p $OUT && BUDGET=560 bash benchmarks/wave17/call2.sh 2>&1 | tee $OUT/output.txt | tail -70   (carry [".whl"])
set -u
START=$(date +%s)
left() { echo $(( ${BUDGET:-560} - ($(date +%s) - START) )); }
OUT=$OUT bash tools/gpu_suite.sh build || exit 1
rm -f $OUT/build.log
export LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit,temperature.gpu --format=csv > $OUT/smi.txt 2>&1
OUT=$OUT bash tools/gpu_suite.sh tests
echo "memcheck ($(left) s left)"
timeout 120 python3 tools/sanitize.py --tools memcheck > $OUT/sanitize.log 2>&1; echo "memcheck rc $?"; tail -4 $OUT/sanitize.log
echo "bench ($(left) s left)"
[ $(left) -gt 150 ] && OUT=$OUT bash tools/gpu_suite.sh bench
echo "clock probe ($(left) s left)"
[ $(left) -gt 45 ] && timeout $(( $(left) - 15 )) python3 tools/clock_probe.py --shape 16896,8,128 --seconds 3 \
  --kernels dense,skip,cudnn > $OUT/clock.log 2>&1; cat $OUT/clock.log | tail -8
cat $OUT/smi.txt
cd $OUT && tar czf logs.tgz --exclude output.txt --exclude logs.tgz * && find . -type f ! -name output.txt ! -name logs.tgz -delete; ls $OUT
