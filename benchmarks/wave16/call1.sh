# Wave 16, call 1: main as it is (the split wave tail the dense default; its NaN-row and alignment fixes and the
# tests changed after wave 15's call 2) on whatever card comes. ~6-7 min: build, the GPU suite, memcheck of
# tools/sanitize.py's cases (the split tail's among them), bench.py's full table with cuDNN in the same run.
# One archive comes back. Run as
#   mkdir -p $OUT && BUDGET=560 bash benchmarks/wave16/call1.sh 2>&1 | tee $OUT/output.txt | tail -70   (carry [".whl"])
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
[ $(left) -gt 110 ] && OUT=$OUT bash tools/gpu_suite.sh bench
cat $OUT/smi.txt
cd $OUT && tar czf logs.tgz --exclude output.txt --exclude logs.tgz * && find . -type f ! -name output.txt ! -name logs.tgz -delete; ls $OUT
