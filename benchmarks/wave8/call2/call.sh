# Wave 8 call 2: the whole GPU suite on the v11 default (tree row max; persistent dense CTAs in both Q/K modes; INT8
# kernels built), the sanitizer's four tools, the schedule kernel's own time (wave 7 call 4's script, never run), and
# ncu's per-instruction stall samples of the d128 bf16 dense kernel for the next optimisation. (As run, the ncu target
# was a copy of wave 6's worker in this folder; its dense mode is tools/ncu_worker.py's, which this line now names.)
set -u
export LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) PYTHONUNBUFFERED=1
T0=$(date +%s); st() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
OUT=$OUT bash tools/gpu_suite.sh build || exit 1
export PYTHONPATH=/tmp/site
st tests
timeout 300 python3 -m pytest -m cuda tests/ -q -n 8 -p no:cacheprovider > $OUT/tests.log 2>&1
echo "tests rc $?"; grep -E "^(FAILED|ERROR)" $OUT/tests.log | head -10; tail -1 $OUT/tests.log
st sanitize
timeout 150 python3 tools/sanitize.py --parallel > $OUT/sanitize.log 2>&1
echo "sanitize rc $?"; tail -6 $OUT/sanitize.log
st schedule
timeout 60 python3 benchmarks/wave7_h200/call4/profile_schedule.py 2>&1 | grep -v Warning | tail -6 | tee $OUT/schedule.log
st ncu
timeout 100 ncu -k regex:fwd_kernel --launch-skip 3 --launch-count 1 --section SpeedOfLight --section WarpStateStats \
  --section SourceCounters --metrics sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active \
  -o $OUT/ncu_dense -f python3 tools/ncu_worker.py dense > $OUT/ncu.log 2>&1; echo "ncu rc $?"
ncu -i $OUT/ncu_dense.ncu-rep --page source --csv --print-source sass 2>&1 | gzip > $OUT/ncu_dense_sass.csv.gz
ncu -i $OUT/ncu_dense.ncu-rep --page details > $OUT/ncu_dense_details.txt 2>&1
rm -f $OUT/ncu_dense.ncu-rep
grep -E "Duration|Warp Cycles Per Issued|tensor_cycles|pipe_xu|No Eligible|Issued Warp" $OUT/ncu_dense_details.txt | head -8
st done
