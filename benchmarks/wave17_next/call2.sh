# Next session, call 2 (prepared at the end of wave 16, not run): compute-sanitizer racecheck and memcheck of
# tools/sanitize.py's cases under LITEATTN_VARIANT=splitskip (the persistent skip grid's row hand-off now also
# passes the split unit; split_vote_kernel's shared-memory words). Needs the A/B build of call 1 (same warm machine,
# or it rebuilds). ~7 min. Run as
#   mkdir -p $OUT && BUDGET=540 bash benchmarks/wave17_next/call2.sh 2>&1 | tee $OUT/output.txt | tail -30   (carry [".whl"])
set -u
export CMAKE_ARGS='-DLITEATTN_AB_VARIANTS=130051@128;105473@64'
OUT=$OUT bash tools/gpu_suite.sh build || exit 1
rm -f $OUT/build.log
export LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
LITEATTN_VARIANT=splitskip timeout 420 python3 tools/sanitize.py --tools racecheck,memcheck --parallel > $OUT/sanitize.log 2>&1
echo "sanitize rc $?"; tail -6 $OUT/sanitize.log
