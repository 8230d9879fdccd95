# Wave 14, call 3: is persistskip's f = 1 at 75600x40x128 (1.110 of dense in call 1's table, against 1.029 for the
# one-tile grid in wave 12) real? Same-run A/B at the two Wan shapes, then the GPU suite on main's shipped defaults
# (31747 at d128, 7169 at d64) in what is left.
set -u
START=$(date +%s)
export CMAKE_ARGS='-DLITEATTN_AB_VARIANTS=23555@128'
OUT=$OUT bash tools/gpu_suite.sh build || exit 1
rm -f $OUT/build.log
export LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
T0=$(date +%s); st() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
st ab
timeout 150 python3 tools/bench.py --only ours,sdpa --shapes 75600,40,128 32760,12,128 \
  --variants default,nopersistskip --repeats 3 --fractions "" --big-fractions "" --json $OUT/ab3.json > $OUT/ab3.log 2>&1
echo "ab rc $?"
python3 tools/ab_table.py $OUT/ab3.json
grep "structured" $OUT/ab3.log
LEFT=$(( 390 - ($(date +%s) - START) ))
st "tests (${LEFT} s left)"
[ $LEFT -gt 60 ] && { timeout $LEFT python3 -m pytest -m cuda tests/ -q -n 8 -p no:cacheprovider > $OUT/tests.log 2>&1;
  echo "tests rc $?"; grep -E "^(FAILED|ERROR)" $OUT/tests.log | head -20; tail -1 $OUT/tests.log; }
st done
