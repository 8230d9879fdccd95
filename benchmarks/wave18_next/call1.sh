# Next session, call 1 (prepared at the end of wave 17, not run): the last check before adopting the skip path's
# split tail at d128 (NOTES.md "Wave 17"): racecheck (+ synccheck) of tools/sanitize.py's skip cases under
# LITEATTN_VARIANT=splitskip, only our kernels instrumented (call 3 of wave 17 ran all cases with torch's kernels
# instrumented too and did not finish in 325 s); then splitskip against the default by the clock probe on forced
# heavy-first / heavy-last live sets (never timed: under LPT the tail rows are the lightest). ~7 min. Run as
#   mkdir -p $OUT && BUDGET=540 bash benchmarks/wave18_next/call1.sh 2>&1 | tee $OUT/output.txt | tail -60   (carry [".whl"])
set -u
START=$(date +%s)
left() { echo $(( ${BUDGET:-540} - ($(date +%s) - START) )); }
export CMAKE_ARGS='-DLITEATTN_AB_VARIANTS=130051@128;105473@64'
OUT=$OUT bash tools/gpu_suite.sh build || exit 1
rm -f $OUT/build.log
export LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
compute-sanitizer --help 2>&1 | grep -A12 -- "--kernel-name" | head -16 > $OUT/sanitizer_help.txt
echo "racecheck ($(left) s left)"
LITEATTN_VARIANT=splitskip timeout 300 python3 tools/sanitize.py --tools racecheck,synccheck --parallel \
  --cases skipsplit,skip,forced --kernel-filter liteattn --log-dir $OUT/sanitize > $OUT/sanitize.log 2>&1
echo "sanitize rc $?"; tail -6 $OUT/sanitize.log
for forced in 0.5:heavy-last 0.5:heavy-first 0.25:heavy-last; do
  echo "clock probe 32760,12,128 $forced ($(left) s left)"
  [ $(left) -gt 70 ] && timeout 80 python3 tools/clock_probe.py --shape 32760,12,128 --seconds 3 --kernels dense,skip \
    --variants default,splitskip --forced $forced > $OUT/clock_$forced.log 2>&1; tail -9 $OUT/clock_$forced.log
done
cd $OUT && tar czf logs.tgz --exclude output.txt --exclude logs.tgz * && find . -type f ! -name output.txt ! -name logs.tgz -delete; ls $OUT
