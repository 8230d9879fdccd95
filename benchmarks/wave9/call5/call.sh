# Wave 9 call 5: the whole GPU suite on the wave's final tree (csrc identical to v11), with the captured output of
# the passed tests kept, so the structured skip-decision counts (issue 10's third target, issue 12's 0.2 %) are
# printed: "skip decisions: X / Y tiles disagree" (16-bit) and "INT8 skip decisions: ...".
set -u
export LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) PYTHONUNBUFFERED=1
OUT=$OUT bash tools/gpu_suite.sh build || exit 1
rm -f $OUT/build.log
export PYTHONPATH=/tmp/site
timeout 420 python3 -m pytest -m cuda tests/ -q -n 6 -rP -p no:cacheprovider > $OUT/tests.log 2>&1
echo "tests rc $?"; grep -E "^(FAILED|ERROR)" $OUT/tests.log | head -20; tail -1 $OUT/tests.log
grep -E "tiles disagree" $OUT/tests.log | sort | uniq -c
