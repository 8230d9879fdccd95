# Wave 19, call 1 (prepared at the end of wave 18 as benchmarks/wave19_next/call1.sh; ran 14:28-14:34 UTC on an H100): what wave 18 could not measure, on main as it was.
# ~8 min: build; bench.py's full table with cuDNN in the same run (this version has none: BENCHMARKS.md "Wave 18");
# the clock probe of dense / skip f = 1 at two shapes with no wave tail and the same 8 rows per CTA but 96 and 192 key
# tiles per row (16896x8x128, 33792x4x128): a per-tile cost gives the same skip / dense ratio at both, a per-row cost
# half the excess at the second (NOTES.md "Wave 18": which one the f = 1 gap is); ncu of dense vs skip at
# 16896x8x128 (instructions and stall samples by SASS line: tools/ncu_stalls.py), and each kernel's GPU time per
# call (tools/kernel_times.py: the LPT schedule and other per-call kernels apart from the attention kernel, since a
# per-call cost would also halve at the second shape); initcheck alone (wave 18's did not
# finish beside the other three tools). One archive comes back. Run as
#   mkdir -p $OUT && BUDGET=540 bash benchmarks/wave19_next/call1.sh 2>&1 | tee $OUT/output.txt | tail -70   (carry [".whl"])
set -u
START=$(date +%s)
left() { echo $(( ${BUDGET:-540} - ($(date +%s) - START) )); }
OUT=$OUT bash tools/gpu_suite.sh build || exit 1
rm -f $OUT/build.log
export LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv > $OUT/smi.txt 2>&1
echo "bench ($(left) s left)"
OUT=$OUT bash tools/gpu_suite.sh bench
for shape in 16896,8,128 33792,4,128; do
  echo "clock probe $shape ($(left) s left)"
  [ $(left) -gt 60 ] && timeout 50 python3 tools/clock_probe.py --shape $shape --seconds 3 --kernels dense,skip \
    > $OUT/clock_$shape.log 2>&1; tail -5 $OUT/clock_$shape.log
done
echo "kernel times ($(left) s left)"
[ $(left) -gt 230 ] && timeout 40 python3 tools/kernel_times.py --shape 16896,8,128 > $OUT/kernel_times.log 2>&1
tail -12 $OUT/kernel_times.log
echo "ncu ($(left) s left)"
[ $(left) -gt 200 ] && NCU_SHAPE=16896,8,128 OUT=$OUT bash tools/gpu_suite.sh ncu
echo "initcheck ($(left) s left)"
[ $(left) -gt 40 ] && timeout $(( $(left) - 20 )) python3 tools/sanitize.py --tools initcheck --kernel-filter liteattn \
  --log-dir $OUT/sanitize > $OUT/sanitize.log 2>&1; echo "initcheck rc $?"; tail -4 $OUT/sanitize.log
cat $OUT/smi.txt
cd $OUT && tar czf logs.tgz --exclude output.txt --exclude logs.tgz * && find . -type f ! -name output.txt ! -name logs.tgz -delete; ls $OUT
