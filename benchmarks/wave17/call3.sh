# Wave 17, call 3: the skip path's split tail (splitskip) once more, by the clock probe's method (each kernel back
# to back for 3 s, A B A B, the SM clock sampled; the dense kernel -- the same under both values -- as the control),
# since bench.py's interleaved A/B moved identical kernels by up to 13 % on H100 in call 1. Also on the A/B build:
# the -inf row-start test and the split tests under the variant, and racecheck + synccheck + memcheck of
# tools/sanitize.py's cases under it. ~6 min. Run as
#   mkdir -p $OUT && BUDGET=540 bash benchmarks/wave17/call3.sh 2>&1 | tee $OUT/output.txt | tail -60   (carry [".whl"])
set -u
START=$(date +%s)
left() { echo $(( ${BUDGET:-540} - ($(date +%s) - START) )); }
export CMAKE_ARGS='-DLITEATTN_AB_VARIANTS=130051@128;105473@64'
OUT=$OUT bash tools/gpu_suite.sh build || exit 1
rm -f $OUT/build.log
export LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
LITEATTN_VARIANT=splitskip timeout 150 python3 -m pytest -m cuda tests/test_kernel_cuda.py tests/test_int8_cuda.py -q -n 6 \
  -p no:cacheprovider -rs -k "neg_inf or skip_split or split_tail or forced" > $OUT/tests.log 2>&1
echo "split tests rc $?"; grep -E "^(FAILED|ERROR)" $OUT/tests.log | head; tail -1 $OUT/tests.log
for shape in 32760,12,128 32760,24,64 17408,8,128; do
  echo "clock probe $shape ($(left) s left)"
  [ $(left) -gt 150 ] && timeout 80 python3 tools/clock_probe.py --shape $shape --seconds 3 --kernels dense,skip \
    --variants default,splitskip > $OUT/clock_$shape.log 2>&1; tail -9 $OUT/clock_$shape.log
done
echo "sanitize ($(left) s left)"
[ $(left) -gt 60 ] && LITEATTN_VARIANT=splitskip timeout $(( $(left) - 15 )) python3 tools/sanitize.py \
  --tools racecheck,synccheck,memcheck --parallel > $OUT/sanitize.log 2>&1; echo "sanitize rc $?"; tail -6 $OUT/sanitize.log
cd $OUT && tar czf logs.tgz --exclude output.txt --exclude logs.tgz * && find . -type f ! -name output.txt ! -name logs.tgz -delete; ls $OUT
