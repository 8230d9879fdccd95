# Wave 6 call 3: compute-sanitizer (memcheck, racecheck, initcheck, synccheck) over HEAD's kernels, INT8 mode included.
set -u
export LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) PYTHONUNBUFFERED=1
T0=$(date +%s); st() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
OUT=$OUT bash tools/gpu_suite.sh build sanitize
st done
