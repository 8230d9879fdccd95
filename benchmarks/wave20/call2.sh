# Wave 20, call 2: where the forced rows' excess over t_dense * f comes from (NOTES.md "Wave 20"). Wave 19's bench.py
# gave heavy-first f = 0.75 at 0.860 of dense and heavy-last at 0.779 at 32760x12x128, although both rows sets get the
# same per-head heaviest-first order (a list-scheduling model of the persistent grid predicts <= balanced's 0.749 +
# 0.3 % for both), and skip f = 1 at 75600x40x128 at 1.071 against 1.025 at 32760x12x128. Measured here:
#  - the clock probe (cycles, so that the power cap's clock drift is out) of dense and skip on the forced sets, with
#    and without the schedule (LITEATTN_VARIANT=nolpt), and at 75600x40x128 f = 1, where call 1's bench.py gave
#    skip / dense 1.110 and the INT8 mode's 0.998;
#  - kernel_times on the forced sets (the attention kernel alone, against the schedule kernel and the gaps);
#  - ncu's DRAM bytes and L2 hit rate, dense against skip, at 75600x40x128 (f = 1) and 32760x12x128 (forced).
# When it ran, the clock / ktimes logs were named clock_$F.log: the ":" kept them from coming back (call2/output_tail.txt
# has what did); fixed after the run.
# Run as  mkdir -p $OUT && BUDGET=470 bash benchmarks/wave20/call2.sh 2>&1 | tee $OUT/output.txt | tail -70  (carry [".whl"])
set -u
START=$(date +%s)
left() { echo $(( ${BUDGET:-470} - ($(date +%s) - START) )); }
OUT=$OUT bash tools/gpu_suite.sh build > $OUT/build_part.log 2>&1 || { tail -20 $OUT/build_part.log; exit 1; }
tail -3 $OUT/build_part.log
export LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
SH=32760,12,128
for F in 0.75:heavy-first 0.75:heavy-last 0.75:balanced 0.5:heavy-first 0.5:heavy-last; do
  [ $(left) -gt 150 ] || break
  V=default,nolpt; [ "${F#*:}" = balanced ] && V=default
  timeout 60 python3 tools/clock_probe.py --shape $SH --seconds 1.5 --kernels dense,skip --forced $F --variants $V \
    > $OUT/clock_${F/:/_}.log 2>&1; echo "clock $F rc $? ($(left) s left)"
done
[ $(left) -gt 150 ] && { timeout 60 python3 tools/clock_probe.py --shape 75600,40,128 --seconds 2 --kernels dense,skip,int8 \
  > $OUT/clock_big_f1.log 2>&1; echo "clock big rc $? ($(left) s left)"; }
for F in 0.75:heavy-first 0.75:heavy-last; do
  [ $(left) -gt 120 ] || break
  timeout 40 python3 tools/kernel_times.py --shape $SH --modes dense,skip --forced $F > $OUT/ktimes_${F/:/_}.log 2>&1
  echo "kernel_times $F rc $?"
done
M=gpu__time_duration.sum,sm__cycles_active.avg,dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sector_hit_rate.pct,sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active
ncu_one() {  # name mode shape [forced]
  [ $(left) -gt 40 ] || { echo "ncu $1 skipped"; return; }
  timeout $(( $(left) - 25 )) ncu -k regex:fwd_kernel --launch-skip 3 --launch-count 1 --metrics $M \
    python3 tools/ncu_worker.py $2 $3 ${4:-} > $OUT/ncu_$1.log 2>&1; echo "ncu $1 rc $?"
}
ncu_one big_dense dense 75600,40,128
ncu_one big_skip skip 75600,40,128
ncu_one hf75_skip skip $SH 0.75:heavy-first
ncu_one hl75_skip skip $SH 0.75:heavy-last
ncu_one mid_dense dense $SH
echo "== summary"
for f in $OUT/clock_*.log; do echo "-- $(basename $f)"; sed -n '2,$p' $f | tail -9; done
for f in $OUT/ktimes_*.log; do echo "-- $(basename $f)"; cat $f | cut -c1-120; done
for f in $OUT/ncu_*.log; do echo "-- $(basename $f)"; grep -E "gpu__time|sm__cycles|dram__bytes|lts__t_sector|tensor" $f | tr -s ' '; done
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv
