# Wave 8 call 4 (last of the session's device time): BN 192 on the v11 bf16 dense path (A/B; dense-only, the skip state
# and the INT8 k_scale keep the table's 176), ncu stall samples of the INT8 dense kernel (the issue-12 lead).
# (The 10,000-call soak was cut after the first try found no machine: the skip path it exercises is unchanged since v9.)
set -u
export LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) PYTHONUNBUFFERED=1
T0=$(date +%s); st() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
OUT=$OUT CMAKE_ARGS='-DLITEATTN_AB_VARIANTS=3171@128' bash tools/gpu_suite.sh build || exit 1
rm -f $OUT/build.log
export PYTHONPATH=/tmp/site
st check
timeout 40 python3 tools/check_variants.py default,bn192 > $OUT/check.log 2>&1
echo "check rc $? ok lines: $(grep -c ' ok' $OUT/check.log)"; grep -E "FAIL|Error|CHECK" $OUT/check.log | head -6
st ab
timeout 50 python3 tools/bench.py --only ours --shapes 4096,12,128 16384,24,128 32760,12,128 --variants default,bn192 \
  --repeats 3 --fractions "" --big-fractions "" --no-structured --json $OUT/ab.json > $OUT/ab.log 2>&1; echo "ab rc $?"
st ncu
timeout 100 ncu -k regex:fwd_kernel --launch-skip 3 --launch-count 1 --section SpeedOfLight --section WarpStateStats \
  --section SourceCounters --metrics sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active \
  -o $OUT/ncu_int8 -f python3 tools/ncu_worker.py int8 > $OUT/ncu.log 2>&1; echo "ncu rc $?"
ncu -i $OUT/ncu_int8.ncu-rep --page source --csv --print-source sass 2>&1 | gzip > $OUT/ncu_int8_sass.csv.gz
ncu -i $OUT/ncu_int8.ncu-rep --page details > $OUT/ncu_int8_details.txt 2>&1
rm -f $OUT/ncu_int8.ncu-rep
grep -E "Duration|Warp Cycles Per Issued|tensor_cycles|pipe_xu" $OUT/ncu_int8_details.txt | head -6
st done
python3 benchmarks/wave8/call1/table.py $OUT/ab.json
