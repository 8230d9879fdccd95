# Next session, call 1 (prepared at the end of wave 14, not run): this version on an H200, which wave 14 never got
# (all three of its calls ran on an H100). Main's defaults (31747 at d128, 7169 at d64), no A/B ids. ~7-8 min:
# the GPU suite, bench.py's full table (cuDNN in the same run; BENCHMARKS.md "Wave 14" has the H100 one), then ncu
# of the bf16 dense d128 kernel at 32760x12x128 (warp stalls and per-instruction samples, for issue 10's dense gap:
# NOTES.md "What limits it now", item 2), in what is left of the call. Run as
#   mkdir -p $OUT && bash benchmarks/wave15_next/call1.sh 2>&1 | tee $OUT/output.txt | tail -40   (carry [".whl"])
set -u
START=$(date +%s)
OUT=$OUT bash tools/gpu_suite.sh build tests bench || exit 1
rm -f $OUT/build.log
export LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
LEFT=$(( 560 - ($(date +%s) - START) ))
echo "ncu (${LEFT} s left)"
[ $LEFT -gt 60 ] && {
  timeout $LEFT ncu -k regex:fwd_kernel --launch-skip 3 --launch-count 1 --section SpeedOfLight --section WarpStateStats \
    --section SourceCounters --section ComputeWorkloadAnalysis -o $OUT/ncu_dense -f python3 tools/ncu_worker.py dense \
    > $OUT/ncu_dense.log 2>&1; echo "ncu rc $?"
  ncu -i $OUT/ncu_dense.ncu-rep --page details --csv > $OUT/ncu_dense_details.csv 2>&1
  ncu -i $OUT/ncu_dense.ncu-rep --page source --csv --print-source sass 2>&1 | gzip > $OUT/ncu_dense_sass.csv.gz
  rm -f $OUT/ncu_dense.ncu-rep
  python3 tools/ncu_stalls.py $OUT/ncu_dense_sass.csv.gz 30
}
