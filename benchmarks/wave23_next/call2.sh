# Next session, call 2 (prepared in wave 21): where the skip kernel's per-call (~8-9 tile-times a CTA) and per-row
# (~0.9 tile-times once tiles are skipped) excess goes, from the per-CTA timeline (tools/cta_timeline.py; the
# timeline variant, an A/B build). Dense against skip f = 1 and skip at forced 0.5 balanced, at 4096x12x128 (3 rows a
# CTA: the excess there is 15-20 us of a 182 us call) and 16896x8x128 (8 rows a CTA, no tail: call 1's ncu shape).
# Reading: the skip CTAs start later (start_mean, first_row_wait, first_k_wait), spend it between rows (row_gap,
# later_k_wait), or end apart (last_row_max - last_row_min, exit_after_last_row).
# Run as  mkdir -p $OUT && BUDGET=300 bash benchmarks/wave23_next/call2.sh 2>&1 | tee $OUT/output.txt | tail -60  (carry [".whl"])
set -u
START=$(date +%s)
left() { echo $(( ${BUDGET:-300} - ($(date +%s) - START) )); }
CMAKE_ARGS='-DLITEATTN_AB_VARIANTS=261123@128' OUT=$OUT bash tools/gpu_suite.sh build > $OUT/build_part.log 2>&1 \
  || { tail -30 $OUT/build_part.log; exit 1; }
tail -1 $OUT/build_part.log; echo "($(left) s left)"
export LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
for shape in 4096,12,128 16896,8,128; do
  for forced in "" 0.5:balanced; do
    [ $(left) -gt 20 ] || break
    name=$(echo "tl_${shape}_${forced:-f1}" | tr ',:.' '___')
    timeout 60 python3 tools/cta_timeline.py --shape $shape --modes dense,skip ${forced:+--forced $forced} \
      --csv $OUT/$name > $OUT/$name.log 2>&1
    echo "== $shape ${forced:-f=1} rc $?"; tail -14 $OUT/$name.log
  done
done
echo "($(left) s left)"
cd $OUT && tar czf logs.tgz --exclude output.txt --exclude logs.tgz * && find . -type f ! -name output.txt ! -name logs.tgz -delete
