# Wave 11 call 1: the `persistskip` A/B (NOTES.md "Experiment (wave 11 call 1): persistskip"): the skip path with
# at most one CTA per SM, rows handed out by an atomic counter in the schedule's order, the next row's state read
# by the producer's spare warps while the consumers run. 15363 = d128 default | 8192, 15361 = d64 default | 8192
# (the default now has latevote on the 16-bit skip path). Correctness first (check_variants: float32 attention and
# the default's skip decisions, both Q/K modes), then f = 1 and forced fractions (balanced, heavy-last), 2
# interleaved repeats, cuDNN in the same run; last, the kernel tests under the variant.
set -u
export CMAKE_ARGS='-DLITEATTN_AB_VARIANTS=15363@128;15361@64'
OUT=$OUT bash tools/gpu_suite.sh build
export LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6) PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
T0=$(date +%s)
timeout 150 python3 tools/check_variants.py default,persistskip > $OUT/check.log 2>&1
echo "[$(( $(date +%s) - T0 )) s] check rc $?: $(grep -c ' ok' $OUT/check.log) ok; $(grep 'CHECK FAILURES' $OUT/check.log)"
grep -E " FAIL$|Error" $OUT/check.log | head -8
timeout 330 python3 tools/bench.py --only ours,ours_int8,sdpa \
  --shapes 4096,12,128 16384,4,64 16384,24,128 32760,12,128 32760,24,64 \
  --variants default,persistskip --repeats 2 --fractions 0.5,0.25 --kinds balanced,heavy-last \
  --big-fractions "" --no-structured --json $OUT/ab.json > $OUT/ab.log 2>&1
echo "[$(( $(date +%s) - T0 )) s] bench rc $?"
LITEATTN_VARIANT=persistskip timeout 120 python3 -m pytest -m cuda tests/test_kernel_cuda.py tests/test_cuda_graph_state.py \
  -q -n 6 -p no:cacheprovider > $OUT/tests_persistskip.log 2>&1
echo "[$(( $(date +%s) - T0 )) s] kernel tests under persistskip rc $?: $(tail -1 $OUT/tests_persistskip.log)"
grep -E "^(FAILED|ERROR)" $OUT/tests_persistskip.log | head -10
python3 tools/ab_table.py $OUT/ab.json
