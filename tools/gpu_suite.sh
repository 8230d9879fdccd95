#!/usr/bin/env bash
# Every GPU check of the project on one H200, in as few device calls as possible:
#
#   bash tools/gpu_suite.sh build tests soak parallel     # ~6 min: build, all `cuda` tests, soak, P=1 Ulysses
#   bash tools/gpu_suite.sh build demo                    # ~8 min: tools/demo_gpu.py (demo, sweep, Wan preset)
#   bash tools/gpu_suite.sh build sanitize bench          # compute-sanitizer (4 tools), the kernel benchmark
#   NCU_SHAPE=16896,8,128 bash tools/gpu_suite.sh build ncu  # ncu of the dense and skip kernels (NCU_MODES)
#   CMAKE_ARGS='-DLITEATTN_AB_VARIANTS=1027@128' AB_VARIANTS=default,notreemax bash tools/gpu_suite.sh build ab
#                                                         # ~4 min: a kernel-variant A/B (NOTES.md's method)
#
# Parts run in the order given; logs and short summaries go to $OUT (default ./out), and the last
# lines printed are one status line per part. Wheels the GPU image lacks (nvidia-cutlass for the
# build, diffusers/expecttest/importlib_metadata for the tests) are taken from .whl/ when present
# (see the device tool's notes). The build is an editable install whose CMake tree (build/) stays
# on a warm machine, so a second call rebuilds nothing.
set -u
export PYTHONUNBUFFERED=1
# AOTInductor packages segfault at load on that image unless the compiler's libstdc++ is preloaded.
export LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6)
OUT=${OUT:-./out}
mkdir -p "$OUT"
STATUS=()
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_suite: installing .whl/ failed"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }

part_build() {
  python3 -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; return 1; }
  python3 -c "import liteattn_ops, torch; assert liteattn_ops.is_available(); print(torch.__version__, torch.cuda.get_device_name())"
}
part_tests() {
  timeout 420 python3 -m pytest -m cuda tests/ -q -n 6 -p no:cacheprovider > "$OUT/tests.log" 2>&1
  local rc=$?
  grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -20
  tail -1 "$OUT/tests.log"
  return $rc
}
part_soak() {
  timeout 240 python3 tools/soak.py --device cuda --json "$OUT/soak.json" > "$OUT/soak.log" 2>&1
  local rc=$?
  tail -12 "$OUT/soak.log"
  return $rc
}
part_parallel() {
  # P = 1 through the NCCL code path of the 2-GPU benchmark (issue 16 needs two GPUs for the rest).
  timeout 180 torchrun --nproc-per-node 1 tools/bench_parallel.py > "$OUT/parallel_p1.log" 2>&1
  local rc=$?
  tail -25 "$OUT/parallel_p1.log"
  return $rc
}
part_sanitize() {
  timeout 480 python3 tools/sanitize.py --parallel > "$OUT/sanitize.log" 2>&1
  local rc=$?
  tail -8 "$OUT/sanitize.log"
  return $rc
}
part_bench() {
  # Issue 10 / 12's table: ours (bf16 and INT8) and cuDNN in the same run, forced fractions, heavy rows.
  timeout 540 python3 tools/bench.py --only ours,ours_int8,sdpa --fractions 0.75,0.5,0.25 \
    --kinds balanced,heavy-first,heavy-last --big-fractions 0.5 --big-kinds balanced --json "$OUT/bench.json" \
    > "$OUT/bench.log" 2>&1
  local rc=$?
  sed -n '/^summary/,$p' "$OUT/bench.log" | tail -40
  return $rc
}
part_ab() {
  # Kernel variants of an A/B build (CMAKE_ARGS='-DLITEATTN_AB_VARIANTS=ids' for the build part), named in
  # AB_VARIANTS (LITEATTN_VARIANT values, comma-separated): each checked against float32 attention and the default's
  # skip decisions (both Q/K modes), then timed in turn, AB_REPEATS times (default 3), with cuDNN in the same run,
  # at AB_SHAPES (space-separated S,H,D; default the five shapes of the wave 8-9 A/Bs).
  local variants=${AB_VARIANTS:-}
  [ -n "$variants" ] || { echo "gpu_suite ab: set AB_VARIANTS, e.g. AB_VARIANTS=default,lazy"; return 1; }
  timeout 120 python3 tools/check_variants.py "$variants" > "$OUT/check.log" 2>&1
  grep -E " FAIL$|Error" "$OUT/check.log" | head -8
  grep -q "^CHECK FAILURES: 0$" "$OUT/check.log" || { tail -5 "$OUT/check.log"; return 1; }
  echo "check: $(grep -c ' ok' "$OUT/check.log") ok, 0 failures"
  timeout 300 python3 tools/bench.py --only ours,ours_int8,sdpa \
    --shapes ${AB_SHAPES:-4096,12,128 16384,4,64 16384,24,128 32760,12,128 32760,24,64} \
    --variants "$variants" --repeats "${AB_REPEATS:-3}" --fractions "" --big-fractions "" --no-structured \
    --json "$OUT/ab.json" > "$OUT/ab.log" 2>&1 || { tail -20 "$OUT/ab.log"; return 1; }
  python3 tools/ab_table.py "$OUT/ab.json"
}
part_retest() {
  # Only the files named in RETEST (after a fix): e.g. RETEST="tests/test_int8_cuda.py tests/test_cuda_graph_state.py".
  timeout 300 python3 -m pytest -m cuda ${RETEST:-tests/} -q -n 6 -p no:cacheprovider > "$OUT/retest.log" 2>&1
  local rc=$?
  grep -E "^(FAILED|ERROR)" "$OUT/retest.log" | head -20
  tail -1 "$OUT/retest.log"
  return $rc
}
part_graphtest() {
  timeout 120 python3 -m pytest -m cuda tests/test_cuda_graph_state.py -q -p no:cacheprovider 2>&1 | tail -3
}
part_ncu() {
  # ncu of our kernels (NCU_MODES: tools/ncu_worker.py's modes, default "dense skip") at NCU_SHAPE (S,H,D; default
  # 16896,8,128: 8 whole rounds of 132 SMs): the details page, and the per-SASS-line source counters for
  # tools/ncu_stalls.py. The reports themselves are not kept (too big to come back).
  local M=sm__cycles_active.avg,smsp__inst_executed.sum,sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active
  local rc=0 V
  for V in ${NCU_MODES:-dense skip}; do
    timeout 90 ncu -k regex:fwd_kernel --launch-skip 3 --launch-count 1 --section SpeedOfLight --section WarpStateStats \
      --section SchedulerStats --section SourceCounters --metrics $M -o "$OUT/ncu_$V" -f \
      python3 tools/ncu_worker.py $V ${NCU_SHAPE:-16896,8,128} > "$OUT/ncu_$V.log" 2>&1 || rc=$?
    ncu -i "$OUT/ncu_$V.ncu-rep" --page details > "$OUT/ncu_${V}_details.txt" 2>&1
    ncu -i "$OUT/ncu_$V.ncu-rep" --page source --csv --print-source sass 2>&1 | gzip > "$OUT/ncu_${V}_sass.csv.gz"
    rm -f "$OUT/ncu_$V.ncu-rep"
    echo "ncu $V:"
    grep -E "^ +(Duration|Elapsed Cycles|Issued Warp Per|No Eligible|sm__cycles_active|smsp__inst_executed.sum|sm__pipe_tensor)" \
      "$OUT/ncu_${V}_details.txt" | tr -s ' ' | head -8
  done
  return $rc
}
part_demo() {
  DEMO_GPU_BUDGET_S=${DEMO_GPU_BUDGET_S:-300} timeout 420 python3 tools/demo_gpu.py
}

for part in "$@"; do
  stamp "$part ..."
  if "part_$part"; then STATUS+=("$part: ok"); else STATUS+=("$part: FAILED (rc $?)"); fi
  stamp "$part done"
  [ "$part" = build ] && [[ "${STATUS[-1]}" == *FAILED* ]] && break
done
echo "== gpu_suite $(date -u '+%Y-%m-%d %H:%M UTC')"
printf '%s\n' "${STATUS[@]}"
