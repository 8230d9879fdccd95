# Wave 7 call 4: the sliced schedule kernel's own duration (profiler), next to the forward kernel's.
set -u
export LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) PYTHONUNBUFFERED=1
OUT=$OUT CMAKE_ARGS='-DLITEATTN_BUILD_INT8=OFF' bash tools/gpu_suite.sh build || exit 1
export PYTHONPATH=/tmp/site
timeout 60 python3 benchmarks/wave7_h200/call4/profile_schedule.py 2>&1 | grep -v Warning | tail -6
