# Wave 5 call 2: plain build; INT8 fp16 LSE diagnosis; GPU calibration of wan-small (per-step); mass vs max at 32K tokens.
set -u
export LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) PYTHONUNBUFFERED=1
T0=$(date +%s); st() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
OUT=$OUT bash tools/gpu_suite.sh build || exit 1
export PYTHONPATH=/tmp/site
st diag
timeout 90 python3 benchmarks/wave5_h200/call2/int8_lse_diag2.py > $OUT/int8_lse_diag2.log 2>&1; echo "rc $?"; grep -E "step|kernel" $OUT/int8_lse_diag2.log | cut -c1-260 | head -30
st calibration
timeout 330 python3 -m liteattn_ops.calibration --preset wan-small --compare --budget 0.01,0.03,0.1 --device cuda \
  --resolution 128x128 --frames 32 --steps 20 --schedule per-step --uniform=-10,-8,-6,-4,-3 --out $OUT/calib \
  > $OUT/calibration.log 2>&1; echo "rc $?"; grep -v "^\s*$" $OUT/calibration.log | tail -25
st criteria
timeout 80 python3 -m liteattn_ops.calibration.criteria --device cuda --grid 21,30,52 > $OUT/criteria_32k.log 2>&1; echo "rc $?"; tail -14 $OUT/criteria_32k.log
st done
