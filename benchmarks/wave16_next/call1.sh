# Next session, call 1 (prepared at the end of wave 15, not run): this version (the split wave tail as the default)
# on whatever card comes, H200 preferred. ~8-9 min: the build (A/B ids 31747@128;7169@64 = the no-split kernels, for
# the clock probe), the GPU suite (six tests changed after wave 15's call 2, unverified), the clock probe of
# split / no split / cuDNN back to back (NOTES.md "Wave 15": was call 2's same-run gain a clock transient?), and
# bench.py's full table (cuDNN in the same run). One archive comes back. Run as
#   mkdir -p $OUT && BUDGET=540 bash benchmarks/wave16_next/call1.sh 2>&1 | tee $OUT/output.txt | tail -60   (carry [".whl"])
set -u
START=$(date +%s)
left() { echo $(( ${BUDGET:-540} - ($(date +%s) - START) )); }
export CMAKE_ARGS='-DLITEATTN_AB_VARIANTS=31747@128;7169@64'
OUT=$OUT bash tools/gpu_suite.sh build || exit 1
rm -f $OUT/build.log
export LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit,temperature.gpu --format=csv > $OUT/smi.txt 2>&1
OUT=$OUT bash tools/gpu_suite.sh tests
timeout 80 python3 tools/clock_probe.py --variants default,nosplittail > $OUT/clock_probe.txt 2>&1; echo "clock probe rc $?"
timeout 80 python3 tools/clock_probe.py --shape 16384,24,128 --variants default,nosplittail >> $OUT/clock_probe.txt 2>&1
[ $(left) -gt 200 ] && OUT=$OUT bash tools/gpu_suite.sh bench
cat $OUT/smi.txt $OUT/clock_probe.txt
cd $OUT && tar czf logs.tgz --exclude output.txt --exclude logs.tgz * && find . -type f ! -name output.txt ! -name logs.tgz -delete; ls $OUT
