# Wave 6 call 5: HEAD's calibration (flat-curve rule for the first range only) on the call-2/4 generation; rows to compare with call 4.
set -u
export LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) PYTHONUNBUFFERED=1
OUT=$OUT CMAKE_ARGS='-DLITEATTN_BUILD_INT8=OFF' bash tools/gpu_suite.sh build || exit 1
export PYTHONPATH=/tmp/site
timeout 250 python3 -m liteattn_ops.calibration --preset wan-small --compare --budget 0.01,0.03,0.1 --cap 3,10 --device cuda \
  --resolution 128x128 --frames 32 --steps 20 --schedule per-step --uniform=-8 --out $OUT/calib \
  > $OUT/calibration.log 2>&1; echo "rc $?"; sed -n '/^| run /,$p' $OUT/calibration.log | cut -d'|' -f1-5,9
