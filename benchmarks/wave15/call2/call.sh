# Wave 15, call 2: the split wave tail (kVariantSplitTail, the new default at both head dims) against the same
# kernels without it (A/B build: 31747@128, 7169@64 = the wave-14 defaults). Build; the split tests; the A/B at
# shapes with a tail (32760x12x128 / 16384x24x128: 23 rounds + 36 tiles, 3 ranges; 32760x24x64: 31 + 12, 11
# ranges; 17408x8x128: 8 + 32, 4 ranges) and a control without a split (16384x4x64 graph-replayed: 80 tail
# tiles); then the GPU suite beside memcheck + racecheck in what is left. Run as
#   mkdir -p $OUT && BUDGET=490 bash benchmarks/wave15/call2/call.sh 2>&1 | tee $OUT/output.txt | tail -60   (carry [".whl"])
set -u
START=$(date +%s)
left() { echo $(( ${BUDGET:-490} - ($(date +%s) - START) )); }
export CMAKE_ARGS='-DLITEATTN_AB_VARIANTS=31747@128;7169@64'
OUT=$OUT bash tools/gpu_suite.sh build || exit 1
rm -f $OUT/build.log
export LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
echo "split tests ($(left) s left)"
timeout 150 python3 -m pytest -q -p no:cacheprovider -n 4 -k "split" tests/test_kernel_cuda.py tests/test_int8_cuda.py \
  > $OUT/split_tests.log 2>&1; echo "split tests rc $?"; grep -E "^(FAILED|ERROR)" $OUT/split_tests.log | head; tail -1 $OUT/split_tests.log
echo "ab ($(left) s left)"
AB_VARIANTS=default,nosplittail AB_SHAPES="32760,12,128 16384,24,128 32760,24,64 17408,8,128 16384,4,64" \
  OUT=$OUT bash tools/gpu_suite.sh ab
L=$(( $(left) - 15 ))
echo "suite + memcheck/racecheck (${L} s left)"
# Under ~200 s the whole suite (~170 s with -n 6) would be cut off: then the kernel files only.
TESTS=tests/; SAN_TOOLS=memcheck,racecheck
[ $L -lt 200 ] && { TESTS="tests/test_kernel_cuda.py tests/test_int8_cuda.py"; SAN_TOOLS=memcheck; }
timeout $L python3 tools/sanitize.py --tools $SAN_TOOLS --parallel > $OUT/sanitize.log 2>&1 &
SAN=$!
timeout $L python3 -m pytest -m cuda $TESTS -q -n 6 -p no:cacheprovider > $OUT/tests.log 2>&1; echo "tests ($TESTS) rc $?"
wait $SAN; echo "sanitize rc $?"
grep -E "^(FAILED|ERROR)" $OUT/tests.log | head -20; tail -1 $OUT/tests.log
tail -8 $OUT/sanitize.log
# One archive (the device returns at most a few files): everything but output.txt, which tee still writes.
cd $OUT && tar czf logs.tgz --exclude output.txt --exclude logs.tgz * && find . -type f ! -name output.txt ! -name logs.tgz -delete; ls $OUT
