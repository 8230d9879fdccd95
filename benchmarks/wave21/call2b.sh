# Wave 21, call 2b (call 2 cut again: ~240 s of device time left after refused starts). (1) build; (2) with
# LITEATTN_PDL=1 (the dependent launches are off by default until measured) the kernel tests of the split tails, the
# skip path and the new misaligned-output case, and the CUDA-graph state tests; (3) kernel_times at 32760x12x128
# forced 0.5:balanced with PDL off and on; (4) time permitting, the clock probe at 4096x12x128, PDL on / off.
# Run as  mkdir -p $OUT && BUDGET=235 bash benchmarks/wave21/call2b.sh 2>&1 | tee $OUT/output.txt | tail -50  (carry [".whl"])
set -u
START=$(date +%s)
left() { echo $(( ${BUDGET:-235} - ($(date +%s) - START) )); }
OUT=$OUT bash tools/gpu_suite.sh build > $OUT/build_part.log 2>&1 || { tail -30 $OUT/build_part.log; exit 1; }
tail -1 $OUT/build_part.log; echo "($(left) s left)"
export LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
LITEATTN_PDL=1 timeout $(( $(left) - 75 )) python3 -m pytest -m cuda tests/test_kernel_cuda.py tests/test_cuda_graph_state.py -k "split or skip or graph or forced or misaligned" -q -n 8 -p no:cacheprovider > $OUT/tests.log 2>&1
echo "tests rc $? ($(left) s left): $(tail -1 $OUT/tests.log)"; grep -E '^(FAILED|ERROR)' $OUT/tests.log | head -12
for pdl in 0 1; do
  LITEATTN_PDL=$pdl timeout 30 python3 tools/kernel_times.py --shape 32760,12,128 --calls 5 --modes dense,skip --forced 0.5:balanced > $OUT/kt_pdl$pdl.log 2>&1
  echo "kernel_times PDL=$pdl rc $?"; grep -v '^$' $OUT/kt_pdl$pdl.log | tail -10
done
[ $(left) -gt 40 ] && { timeout $(( $(left) - 8 )) python3 tools/clock_probe.py --shape 4096,12,128 --seconds 0.7 --kernels skip --pdl-ab > $OUT/probe_4096.log 2>&1; echo "probe rc $?"; tail -6 $OUT/probe_4096.log; }
nvidia-smi --query-gpu=name --format=csv,noheader; echo "($(left) s left)"
cd $OUT && tar czf logs.tgz --exclude output.txt --exclude logs.tgz * && find . -type f ! -name output.txt ! -name logs.tgz -delete
