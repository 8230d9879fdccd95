# mbarrier_probe.cu under racecheck, one line per mode: bash benchmarks/wave13/mbarrier_probe.sh 0 1 3 (logs in $OUT).
nvcc -gencode=arch=compute_90a,code=sm_90a -lineinfo -o /tmp/probe "$(dirname "$0")/mbarrier_probe.cu" || exit 1
for m in "$@"; do
  compute-sanitizer --tool racecheck --racecheck-report all /tmp/probe "$m" > "$OUT/probe_$m.log" 2>&1
  echo "probe mode $m: $(grep -E '^mode' "$OUT/probe_$m.log") | $(grep -E 'RACECHECK SUMMARY' "$OUT/probe_$m.log")"
done
