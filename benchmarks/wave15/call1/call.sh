# Wave 15, call 1 (prepared at the end of wave 14): this version on whatever card comes (wave 14 never got an H200).
# Main's defaults (31747 at d128, 7169 at d64), no A/B ids. ~8-9 min: the build, the clock probe (ours bf16 / cuDNN /
# ours INT8 back to back with nvidia-smi sampling the SM clock: is the dense gap cycles or clock?), the GPU suite,
# bench.py's full table (cuDNN in the same run), ncu cycle counts of ours and cuDNN at 32760x12x128 (SpeedOfLight),
# then ncu of the bf16 dense d128 kernel (warp stalls, per-instruction samples) in what is left. Run as
#   mkdir -p $OUT && bash benchmarks/wave15/call1/call.sh 2>&1 | tee $OUT/output.txt | tail -60   (carry [".whl"])
set -u
START=$(date +%s)
left() { echo $(( 570 - ($(date +%s) - START) )); }
OUT=$OUT bash tools/gpu_suite.sh build || exit 1
rm -f $OUT/build.log
export LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.sm,power.limit,temperature.gpu --format=csv > $OUT/smi.txt 2>&1
timeout 60 python3 tools/clock_probe.py > $OUT/clock_probe.txt 2>&1; echo "clock probe rc $?"
OUT=$OUT bash tools/gpu_suite.sh tests bench
# The dense path's wave tail: 32760x12 and 16384x24 (d128) have 3072 query tiles = 23.27 rounds of 132 CTAs;
# 33792x12 / 16896x24 have 3168 = 24.00, 33792x24x64 (BM 192) 4224 = 32.00 against 32760x24x64's 31.09.
echo "tail probe ($(left) s left)"
[ $(left) -gt 150 ] && { timeout 120 python3 tools/bench.py --shapes 32760,12,128 33792,12,128 16384,24,128 16896,24,128 \
  32760,24,64 33792,24,64 --graph-shapes --only ours --fractions "" --no-structured --repeats 2 --json $OUT/tail.json \
  > $OUT/tail.log 2>&1; echo "tail probe rc $?"; grep -E "ours dense" $OUT/tail.log | cut -c1-150; }
echo "ncu SOL ($(left) s left)"
SOL="--section SpeedOfLight --metrics sm__cycles_elapsed.avg,sm__cycles_elapsed.avg.per_second,gpu__time_duration.sum"
[ $(left) -gt 40 ] && {
  timeout 60 ncu -k regex:fwd_kernel --launch-skip 3 --launch-count 1 $SOL --csv python3 tools/ncu_worker.py dense \
    > $OUT/ncu_sol_ours.csv 2>&1; echo "ncu ours rc $?"
  timeout 60 ncu --launch-count 12 $SOL --csv python3 tools/ncu_worker.py cudnn > $OUT/ncu_sol_cudnn.csv 2>&1
  echo "ncu cudnn rc $?"
  grep -hE "sm__cycles_elapsed.avg\"|gpu__time_duration.sum|SM Frequency" $OUT/ncu_sol_ours.csv $OUT/ncu_sol_cudnn.csv | cut -c1-300
}
LEFT=$(left)
echo "ncu dense (${LEFT} s left)"
[ $LEFT -gt 60 ] && {
  timeout $LEFT ncu -k regex:fwd_kernel --launch-skip 3 --launch-count 1 --section SpeedOfLight --section WarpStateStats \
    --section SourceCounters --section ComputeWorkloadAnalysis -o $OUT/ncu_dense -f python3 tools/ncu_worker.py dense \
    > $OUT/ncu_dense.log 2>&1; echo "ncu rc $?"
  ncu -i $OUT/ncu_dense.ncu-rep --page details --csv > $OUT/ncu_dense_details.csv 2>&1
  ncu -i $OUT/ncu_dense.ncu-rep --page source --csv --print-source sass 2>&1 | gzip > $OUT/ncu_dense_sass.csv.gz
  rm -f $OUT/ncu_dense.ncu-rep
  python3 tools/ncu_stalls.py $OUT/ncu_dense_sass.csv.gz 30
}
cat $OUT/smi.txt $OUT/clock_probe.txt
