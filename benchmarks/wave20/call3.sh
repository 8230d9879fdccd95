# Wave 20, call 3: issue 10's table with paired ratios. Call 2 showed that the forced rows' spread in bench.py is the
# clock, not the kernel: at ncu's locked clock heavy-first and heavy-last f = 0.75 take the same cycles (11.81 M,
# 0.760 of dense's 15.53 M at 32760x12x128), and 75600x40x128 skip f = 1 is 1.008 of dense (bench.py: 1.110), while
# dense alone moved 9.10 -> 9.66 ms between two runs of kernel_times. Here: bench.py --paired 3 (each sparse row's
# time over the dense time measured just before it, median of 3 turns), and ncu cycles of dense / skip at the other
# forced sets of 32760x12x128.
# Run as  mkdir -p $OUT && BUDGET=520 bash benchmarks/wave20/call3.sh 2>&1 | tee $OUT/output.txt | tail -40  (carry [".whl"])
set -u
START=$(date +%s)
left() { echo $(( ${BUDGET:-520} - ($(date +%s) - START) )); }
OUT=$OUT bash tools/gpu_suite.sh build > $OUT/build_part.log 2>&1 || { tail -20 $OUT/build_part.log; exit 1; }
tail -3 $OUT/build_part.log
export LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
# SHAPES: bench.py's --shapes (default its six); the ncu loop takes what time is left.
timeout $(( $(left) - 75 )) python3 tools/bench.py --only ours,ours_int8,sdpa ${SHAPES:+--shapes $SHAPES} --fractions 0.75,0.5,0.25 \
  --kinds balanced,heavy-first,heavy-last --big-fractions 0.5 --big-kinds balanced --paired 3 --json $OUT/bench.json \
  > $OUT/bench.log 2>&1; echo "bench rc $? ($(left) s left)"
M=gpu__time_duration.sum,sm__cycles_active.avg,sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active
SH=32760,12,128
for spec in "dense" "skip 0.5:balanced" "skip 0.25:balanced" "skip" "skip 0.5:heavy-first" "skip 0.5:heavy-last"; do
  [ $(left) -gt 25 ] || break
  name=$(echo "$spec" | tr ' :.' '___')
  timeout $(( $(left) - 15 )) ncu -k regex:fwd_kernel --launch-skip 3 --launch-count 1 --metrics $M \
    python3 tools/ncu_worker.py ${spec%% *} $SH $(echo "$spec" | cut -s -d' ' -f2) > $OUT/ncu_$name.log 2>&1
  echo "ncu $spec: $(grep -E 'sm__cycles_active' $OUT/ncu_$name.log | tr -s ' ')"
done
sed -n '/^summary/,$p' $OUT/bench.log
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv
cd $OUT && tar czf logs.tgz --exclude output.txt --exclude logs.tgz * && find . -type f ! -name output.txt ! -name logs.tgz -delete
