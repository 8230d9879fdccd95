# Wave 6 call 1: the whole `cuda` suite on HEAD's csrc (not run since wave 4), ncu of the d128 dense vs skip (f = 1) kernels.
set -u
export LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) PYTHONUNBUFFERED=1
T0=$(date +%s); st() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
D=benchmarks/wave6_h200/call1
OUT=$OUT bash tools/gpu_suite.sh build tests || exit 1
export PYTHONPATH=/tmp/site
for mode in dense skip; do
  st "ncu $mode"
  timeout 100 ncu -k regex:fwd_kernel --launch-skip 3 --launch-count 1 --section SpeedOfLight --section WarpStateStats \
    --section SchedulerStats --section InstructionStats --section SourceCounters \
    --metrics sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active,smsp__inst_executed.sum \
    -o $OUT/ncu_$mode -f python3 $D/ncu_worker.py $mode > $OUT/ncu_$mode.log 2>&1; echo "rc $?"
  ncu -i $OUT/ncu_$mode.ncu-rep --page details > $OUT/ncu_${mode}_details.txt 2>&1
  ncu -i $OUT/ncu_$mode.ncu-rep --page source --csv --print-source sass > $OUT/ncu_${mode}_sass.csv 2>&1
  grep -E "Duration|Issue Slots Busy|Executed Instructions |Warp Cycles Per Issued|tensor_cycles|No Eligible" $OUT/ncu_${mode}_details.txt | head -12
done
st done
