# Wave 5 call 4: --passes 3 (goal rescaled by measured / predicted error) on the GPU calibration of wan-small.
set -u
export LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) PYTHONUNBUFFERED=1
T0=$(date +%s); st() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
CMAKE_ARGS='-DLITEATTN_BUILD_INT8=OFF' OUT=$OUT bash tools/gpu_suite.sh build || exit 1
export PYTHONPATH=/tmp/site
st calibration
timeout 230 python3 -m liteattn_ops.calibration --preset wan-small --compare --budget 0.01,0.03 --cap 10 --passes 3 --device cuda \
  --resolution 128x128 --frames 32 --steps 20 --schedule per-step --uniform=-8,-6,-5,-4,-3 --out $OUT/calib \
  > $OUT/calibration.log 2>&1; echo "rc $?"; grep -E "budget|profile" $OUT/calibration.log | cut -c1-200; sed -n '/^| run /,$p' $OUT/calibration.log
st done
