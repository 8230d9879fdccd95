# Wave 20, call 4 (what ~250 s of device time can hold after the refusals): build, then ncu cycles of dense and of the
# skip kernel on the balanced forced sets f = 0.5 and 0.25 at 32760x12x128 (call 2 had f = 0.75: 0.760 of dense).
# Run as  mkdir -p $OUT && BUDGET=150 bash benchmarks/wave20/call4.sh 2>&1 | tee $OUT/output.txt | tail -20  (carry [".whl"])
set -u
START=$(date +%s)
left() { echo $(( ${BUDGET:-150} - ($(date +%s) - START) )); }
OUT=$OUT bash tools/gpu_suite.sh build > $OUT/build_part.log 2>&1 || { tail -20 $OUT/build_part.log; exit 1; }
tail -3 $OUT/build_part.log
export LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
M=gpu__time_duration.sum,sm__cycles_active.avg,sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active
for spec in "dense" "skip 0.5:balanced" "skip 0.25:balanced" "skip 0.5:heavy-last"; do
  [ $(left) -gt 15 ] || break
  name=$(echo "$spec" | tr ' :.' '___')
  timeout $(( $(left) - 5 )) ncu -k regex:fwd_kernel --launch-skip 3 --launch-count 1 --metrics $M \
    python3 tools/ncu_worker.py ${spec%% *} 32760,12,128 $(echo "$spec" | cut -s -d' ' -f2) > $OUT/ncu_$name.log 2>&1
  echo "ncu $spec: $(grep -E 'sm__cycles_active|gpu__time' $OUT/ncu_$name.log | tr -s ' ' | tr '\n' ' ')"
done
nvidia-smi --query-gpu=name --format=csv,noheader
