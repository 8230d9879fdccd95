# Wave 6 call 4: as call 2, with the first step range taking the later ranges' minimum instead of -inf (flat curves).
set -u
export LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) PYTHONUNBUFFERED=1
T0=$(date +%s); st() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
OUT=$OUT CMAKE_ARGS='-DLITEATTN_BUILD_INT8=OFF' bash tools/gpu_suite.sh build || exit 1
export PYTHONPATH=/tmp/site
st calibration
timeout 420 python3 -m liteattn_ops.calibration --preset wan-small --compare --budget 0.01,0.03,0.1 --cap 3,10 --device cuda \
  --resolution 128x128 --frames 32 --steps 20 --schedule per-step --uniform=-12,-10,-8,-6,-5,-4,-3,-2,-1 --out $OUT/calib \
  > $OUT/calibration.log 2>&1; echo "rc $?"; grep -E "profile pass" $OUT/calibration.log; sed -n '/^| run /,$p' $OUT/calibration.log | cut -c1-400
st done
