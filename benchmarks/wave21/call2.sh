# Wave 21, call 2: the call's kernel chain as programmatic dependent launches (csrc/dependent_launch.cuh) and the
# split tail's vote / combine kernels with their loads in flight. Cut to ~430 s (the session's device time left after
# refused starts): (1) build; (2) the kernel's GPU tests (tests/test_kernel_cuda.py: the split tails against the
# reference and bit for bit against the unsplit kernel, the new misaligned-output case) and the CUDA-graph state
# tests; (3) kernel_times with PDL off (each small kernel's own time) and on (the span), 32760x12x128 forced
# 0.5:balanced; (4) the clock probe, PDL on / off in one process, at 4096x12x128 skip f = 1 and, time permitting,
# 32760x12x128. The rest of the suite and the sanitizer: next session.
# Run as  mkdir -p $OUT && BUDGET=430 bash benchmarks/wave21/call2.sh 2>&1 | tee $OUT/output.txt | tail -60  (carry [".whl"])
set -u
START=$(date +%s)
left() { echo $(( ${BUDGET:-430} - ($(date +%s) - START) )); }
OUT=$OUT bash tools/gpu_suite.sh build > $OUT/build_part.log 2>&1 || { tail -30 $OUT/build_part.log; exit 1; }
tail -2 $OUT/build_part.log; echo "($(left) s left)"
export LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
timeout $(( $(left) - 150 )) python3 -m pytest -m cuda tests/test_kernel_cuda.py tests/test_cuda_graph_state.py -q -n 8 -p no:cacheprovider > $OUT/tests.log 2>&1
echo "tests rc $? ($(left) s left): $(tail -1 $OUT/tests.log)"; grep -E '^(FAILED|ERROR)' $OUT/tests.log | head -20
for pdl in 0 1; do
  LITEATTN_PDL=$pdl timeout 35 python3 tools/kernel_times.py --shape 32760,12,128 --calls 5 --modes dense,skip --forced 0.5:balanced > $OUT/kt_pdl$pdl.log 2>&1
  echo "kernel_times PDL=$pdl rc $?"; grep -v '^$' $OUT/kt_pdl$pdl.log | tail -12
done
timeout 40 python3 tools/clock_probe.py --shape 4096,12,128 --seconds 1 --kernels dense,skip --pdl-ab > $OUT/probe_4096.log 2>&1
echo "probe 4096 rc $?"; tail -9 $OUT/probe_4096.log
[ $(left) -gt 60 ] && { timeout $(( $(left) - 12 )) python3 tools/clock_probe.py --shape 32760,12,128 --seconds 1 --kernels skip --forced 0.5:balanced --pdl-ab > $OUT/probe_32760.log 2>&1; echo "probe 32760 rc $?"; tail -5 $OUT/probe_32760.log; }
nvidia-smi --query-gpu=name --format=csv,noheader; echo "($(left) s left)"
cd $OUT && tar czf logs.tgz --exclude output.txt --exclude logs.tgz * && find . -type f ! -name output.txt ! -name logs.tgz -delete
