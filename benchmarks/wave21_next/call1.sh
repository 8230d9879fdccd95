# Next session, call 1 (prepared at the end of wave 20, not run). (1) bench.py's whole table with --paired 3 (each
# sparse row over the dense time measured just before it), which wave 20's call 3 never got to run; on an H200 the
# "/FA3" column applies. (2) Where the skip kernel's 1.0-1.2 % of dense cycles at every forced fraction comes from
# (NOTES.md "Wave 20"): ncu cycles of dense, skip f = 1 and skip at balanced f = 0.5 at three no-tail shapes (whole
# rounds of 132 SMs): 16896x8x128 (8 rows a CTA, 96 key tiles a row), 33792x4x128 (8 rows, 192 tiles) and 16896x16x128
# (16 rows, 96 tiles). Against the first, a cost per visited tile stays at both; a per-row cost halves at the second and
# stays at the third; a per-call cost halves at both.
# Run as  mkdir -p $OUT && BUDGET=560 bash benchmarks/wave21_next/call1.sh 2>&1 | tee $OUT/output.txt | tail -50  (carry [".whl"])
set -u
START=$(date +%s)
left() { echo $(( ${BUDGET:-560} - ($(date +%s) - START) )); }
OUT=$OUT bash tools/gpu_suite.sh build > $OUT/build_part.log 2>&1 || { tail -20 $OUT/build_part.log; exit 1; }
tail -3 $OUT/build_part.log
export LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
timeout $(( $(left) - 170 )) python3 tools/bench.py --only ours,ours_int8,sdpa --fractions 0.75,0.5,0.25 \
  --kinds balanced,heavy-first,heavy-last --big-fractions 0.5 --big-kinds balanced --paired 3 --json $OUT/bench.json \
  > $OUT/bench.log 2>&1; echo "bench rc $? ($(left) s left)"
M=gpu__time_duration.sum,sm__cycles_active.avg,sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active
for shape in 16896,8,128 33792,4,128 16896,16,128; do
  for spec in "dense" "skip" "skip 0.5:balanced"; do
    [ $(left) -gt 25 ] || break
    name=$(echo "$shape $spec" | tr ' :.,' '____')
    timeout $(( $(left) - 15 )) ncu -k regex:fwd_kernel --launch-skip 3 --launch-count 1 --metrics $M \
      python3 tools/ncu_worker.py ${spec%% *} $shape $(echo "$spec" | cut -s -d' ' -f2) > $OUT/ncu_$name.log 2>&1
    echo "ncu $shape $spec: $(grep -E 'sm__cycles_active' $OUT/ncu_$name.log | tr -s ' ')"
  done
done
sed -n '/^summary/,$p' $OUT/bench.log
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv
cd $OUT && tar czf logs.tgz --exclude output.txt --exclude logs.tgz * && find . -type f ! -name output.txt ! -name logs.tgz -delete
