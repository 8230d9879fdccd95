# Wave 12 call 2: where persistskip's d128 time goes. Call 1's ncu (32760x12x128, f = 1): 20.9 M cycles against the
# default skip kernel's 16.6 M, tensor pipe 60.7 % vs 76.2 %, +3.5 % instructions; its per-instruction samples did
# not come back (the file count). Same ncu, persistskip only, summarised here by tools/ncu_stalls.py.
set -u
export CMAKE_ARGS='-DLITEATTN_AB_VARIANTS=15363@128'
OUT=$OUT bash tools/gpu_suite.sh build || exit 1
export LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
V=persistskip
LITEATTN_VARIANT=$V timeout 120 ncu -k regex:fwd_kernel --launch-skip 3 --launch-count 1 --section WarpStateStats \
  --section SourceCounters -o $OUT/ncu_$V -f python3 tools/ncu_worker.py skip > $OUT/ncu_$V.log 2>&1; echo "ncu rc $?"
ncu -i $OUT/ncu_$V.ncu-rep --page source --csv --print-source sass 2>&1 | gzip > $OUT/ncu_${V}_sass.csv.gz
rm -f $OUT/ncu_$V.ncu-rep $OUT/build.log
python3 tools/ncu_stalls.py $OUT/ncu_${V}_sass.csv.gz 45
