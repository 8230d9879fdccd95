# Wave 16, call 2: the skip path's split wave tail (kVariantSplitSkip, "splitskip") as an A/B variant
# (130051@128 = the d128 default + splitskip, 105473@64 = the d64 default + splitskip). ~8 min, in order of need, each step only
# while the budget lasts: build, the kernel and INT8 skip/split tests under LITEATTN_VARIANT=splitskip, check_variants
# (state words vs the default on structured inputs) and the A/B timing (default vs splitskip, 3 interleaved repeats,
# cuDNN in the same run), memcheck with the variant, the rest of the GPU suite under the variant. One archive comes back. Run as
#   mkdir -p $OUT && BUDGET=560 bash benchmarks/wave16/call2.sh 2>&1 | tee $OUT/output.txt | tail -60   (carry [".whl"])
set -u
START=$(date +%s)
left() { echo $(( ${BUDGET:-560} - ($(date +%s) - START) )); }
export CMAKE_ARGS='-DLITEATTN_AB_VARIANTS=130051@128;105473@64'
OUT=$OUT bash tools/gpu_suite.sh build || exit 1
rm -f $OUT/build.log
export LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
echo "split tests ($(left) s left)"
LITEATTN_VARIANT=splitskip timeout 150 python3 -m pytest -m cuda tests/test_kernel_cuda.py tests/test_int8_cuda.py -q -n 6 \
  -p no:cacheprovider -rs -k "split or skip or state or schedule or forced or must or nan or graph" > $OUT/split_tests.log 2>&1
echo "split tests rc $?"
grep -E "^(FAILED|ERROR)" $OUT/split_tests.log | head -20; echo "split tests skipped: $(grep -c "does not split" $OUT/split_tests.log)"; tail -1 $OUT/split_tests.log
echo "ab ($(left) s left)"
[ $(left) -gt 150 ] && AB_SHAPES="16384,4,64 16384,24,128 32760,12,128 32760,24,64 17408,8,128" AB_VARIANTS=default,splitskip OUT=$OUT bash tools/gpu_suite.sh ab
echo "memcheck ($(left) s left)"
[ $(left) -gt 50 ] && LITEATTN_VARIANT=splitskip timeout $(( $(left) - 30 )) python3 tools/sanitize.py --tools memcheck > $OUT/sanitize.log 2>&1
echo "memcheck rc $?"; grep -E "split|FAIL" $OUT/sanitize.log | head; tail -3 $OUT/sanitize.log
echo "rest of the suite ($(left) s left)"
[ $(left) -gt 100 ] && LITEATTN_VARIANT=splitskip timeout $(( $(left) - 25 )) python3 -m pytest -m cuda tests/ -q -n 6 \
  -p no:cacheprovider --ignore=tests/test_kernel_cuda.py --ignore=tests/test_int8_cuda.py > $OUT/rest_tests.log 2>&1
echo "rest rc $?"; grep -E "^(FAILED|ERROR)" $OUT/rest_tests.log | head; tail -1 $OUT/rest_tests.log
cd $OUT && tar czf logs.tgz --exclude output.txt --exclude logs.tgz * && find . -type f ! -name output.txt ! -name logs.tgz -delete; ls $OUT
