# Next session, call 2 (same warm machine as call1.sh, within ~30 s): the GPU suite and bench.py's full table
# (cuDNN in the same run; heavy-first / heavy-last) on the persistskip default. ~7 min.
set -u
export LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
python3 -c "import liteattn_ops; assert liteattn_ops.is_available()" 2>/dev/null \
  || { export CMAKE_ARGS='-DLITEATTN_AB_VARIANTS=23555@128;7169@64'; OUT=$OUT bash tools/gpu_suite.sh build || exit 1; rm -f $OUT/build.log; }
OUT=$OUT bash tools/gpu_suite.sh tests bench
