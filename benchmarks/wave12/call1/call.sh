# Wave 12 call 1: the HEAD default (latevote on the 16-bit skip path) measured as issue 10 / 12 ask -- compute-sanitizer's
# four tools and bench.py's full table (cuDNN in the same run) -- plus ncu of the d128 skip kernel at 32760x12x128,
# f = 1, default vs persistskip (wave 11: persistskip loses 12-15 % per visited tile at d128 whether its reader polls
# or sleeps; where the time goes decides whether it can be fixed). One build: the default + the persistskip ids.
set -u
export CMAKE_ARGS='-DLITEATTN_AB_VARIANTS=15363@128;15361@64'
OUT=$OUT bash tools/gpu_suite.sh build || exit 1
export LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
T0=$(date +%s); st() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
M=sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active,sm__cycles_active.avg,smsp__inst_executed.sum,lts__t_sector_hit_rate.pct,dram__bytes_read.sum,sm__warps_active.avg.pct_of_peak_sustained_active
for V in default persistskip; do
  st "ncu $V"
  LITEATTN_VARIANT=$V timeout 120 ncu -k regex:fwd_kernel --launch-skip 3 --launch-count 1 --section SpeedOfLight \
    --section WarpStateStats --section SchedulerStats --section LaunchStats --section SourceCounters --metrics $M \
    -o $OUT/ncu_$V -f python3 tools/ncu_worker.py skip > $OUT/ncu_$V.log 2>&1; echo "ncu $V rc $?"
  ncu -i $OUT/ncu_$V.ncu-rep --page details > $OUT/ncu_${V}_details.txt 2>&1
  ncu -i $OUT/ncu_$V.ncu-rep --page source --csv --print-source sass 2>&1 | gzip > $OUT/ncu_${V}_sass.csv.gz
  rm -f $OUT/ncu_$V.ncu-rep
done
st sanitize
timeout 200 python3 tools/sanitize.py --parallel > $OUT/sanitize.log 2>&1; echo "sanitize rc $?"; tail -6 $OUT/sanitize.log
st bench
timeout 200 python3 tools/bench.py --only ours,ours_int8,sdpa --fractions 0.75,0.5,0.25 --kinds balanced,heavy-first,heavy-last \
  --big-fractions 0.5 --big-kinds balanced --json $OUT/bench.json > $OUT/bench.log 2>&1; echo "bench rc $?"
st done
for V in default persistskip; do echo "== $V"; grep -E "^ +(Duration|Elapsed Cycles|Registers Per|Grid Size|Issued Warp Per|No Eligible|Warp Cycles Per Issued|sm__pipe_tensor|sm__cycles_active|smsp__inst_executed.sum|lts__t_sector_hit|dram__bytes_read|sm__warps_active)" $OUT/ncu_${V}_details.txt | tr -s ' ' | head -16; done
sed -n '/^summary/,$p' $OUT/bench.log | tail -45
