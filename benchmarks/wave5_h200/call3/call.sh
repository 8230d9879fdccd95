# Wave 5 call 3: INT8 tests with the kernel-mean oracle; GPU calibration of wan-small with caps 10 / 30 (cap 3: call 2); mass vs max at 32K.
set -u
export LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) PYTHONUNBUFFERED=1
T0=$(date +%s); st() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
OUT=$OUT bash tools/gpu_suite.sh build || exit 1
export PYTHONPATH=/tmp/site
st int8-tests
timeout 80 python3 -m pytest -m cuda tests/test_int8_cuda.py -q -n 6 -p no:cacheprovider -rf > $OUT/int8_tests.log 2>&1; grep -E "^(FAILED|ERROR)" $OUT/int8_tests.log | cut -c1-250 | head; tail -1 $OUT/int8_tests.log
st calibration
timeout 370 python3 -m liteattn_ops.calibration --preset wan-small --compare --budget 0.01,0.03,0.1 --cap 10,30 --device cuda \
  --resolution 128x128 --frames 32 --steps 20 --schedule per-step --uniform=-12,-10,-8,-6,-5,-4,-3,-2,-1 --out $OUT/calib \
  > $OUT/calibration.log 2>&1; echo "rc $?"; sed -n '/^| run /,$p' $OUT/calibration.log
st criteria
timeout 50 python3 -m liteattn_ops.calibration.criteria --device cuda --grid 21,30,52 > $OUT/criteria_32k.log 2>&1; echo "rc $?"; tail -12 $OUT/criteria_32k.log
st done
