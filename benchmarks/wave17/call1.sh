# Next session, call 1 (prepared at the end of wave 16, not run): decide the skip path's split tail (splitskip,
# NOTES.md "Wave 16"). ~8.5 min: the A/B build, the A/B timing in both slot orders (wave 16's call 2 showed the
# second slot 2-11 % slower for the same kernel), then the whole GPU suite under LITEATTN_VARIANT=splitskip.
# Adopt (default_variant |= kVariantSplitSkip at both head dims; README "Outputs") if splitskip's skip f = 1 is
# >= the default's in both orders at the split shapes and call 2's racecheck is clean. Run as
#   mkdir -p $OUT && BUDGET=540 bash benchmarks/wave17_next/call1.sh 2>&1 | tee $OUT/output.txt | tail -70   (carry [".whl"])
set -u
START=$(date +%s)
left() { echo $(( ${BUDGET:-540} - ($(date +%s) - START) )); }
export CMAKE_ARGS='-DLITEATTN_AB_VARIANTS=130051@128;105473@64'
OUT=$OUT bash tools/gpu_suite.sh build || exit 1
rm -f $OUT/build.log
export LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
SHAPES="16384,4,64 16384,24,128 32760,12,128 32760,24,64 17408,8,128 75600,40,128"
echo "ab splitskip first ($(left) s left)"
AB_SHAPES="$SHAPES" AB_VARIANTS=splitskip,default OUT=$OUT bash tools/gpu_suite.sh ab; mv $OUT/ab.json $OUT/ab_reversed.json; mv $OUT/ab.log $OUT/ab_reversed.log
echo "ab default first ($(left) s left)"
AB_SHAPES="$SHAPES" AB_VARIANTS=default,splitskip OUT=$OUT bash tools/gpu_suite.sh ab
echo "suite under splitskip ($(left) s left)"
[ $(left) -gt 120 ] && LITEATTN_VARIANT=splitskip timeout $(( $(left) - 25 )) python3 -m pytest -m cuda tests/ -q -n 6 \
  -p no:cacheprovider -rs > $OUT/tests.log 2>&1
echo "suite rc $?"; grep -E "^(FAILED|ERROR)" $OUT/tests.log | head -20; tail -1 $OUT/tests.log
cd $OUT && tar czf logs.tgz --exclude output.txt --exclude logs.tgz * && find . -type f ! -name output.txt ! -name logs.tgz -delete; ls $OUT
