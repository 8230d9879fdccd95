"""compute-sanitizer over the liteattn kernel: one command, a pass/fail table.

    python tools/sanitize.py [--tools memcheck,racecheck,initcheck,synccheck] [--parallel] [--log-dir DIR] [--print-limit N]
                             [--cases dense,split,skipsplit,skip,forced,int8] [--kernel-filter liteattn]

Runs this file again under each tool (`compute-sanitizer --tool T ... python tools/sanitize.py
--worker`); the worker launches small cases of the dense and the skip path that between them cover:
head dims 64 and 128, bf16 and fp16, S not a multiple of the tile, cross-attention (S_q != S_k),
batch > 1, more KV tiles than pipeline stages (ring wrap-around), must-do / must-skip ranges, a
second call that reads the state the first one wrote, forced live sets with empty rows (also with more
rows than SMs), the dense and the skip path's split wave tail, and the device-side query-tile schedule (the op path) as well as natural order (direct
_C calls), and the INT8 Q/K mode (pre-pass + kernel, dense and skip with ranges, both head dims). Each case also checks its output
against the float32 reference (INT8: against the INT8 emulation). Needs a Hopper GPU and the built extension.

--cases runs only some groups of cases (CASE_GROUPS; racecheck of all of them takes minutes); --kernel-filter
instruments only the kernels whose name contains the string (compute-sanitizer's `--kernel-name kns=`), e.g.
`liteattn` for ours and not torch's reference GEMMs.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

TOOLS = ("memcheck", "racecheck", "initcheck", "synccheck")
# The worker's groups of cases, in the order they run (--cases).
CASE_GROUPS = ("dense", "split", "skipsplit", "skip", "forced", "int8")
TOOL_FLAGS = {
    "memcheck": ["--leak-check", "no"],
    "racecheck": ["--racecheck-report", "all"],
    "initcheck": [],
    "synccheck": [],
}


def worker(cases: frozenset[str] = frozenset(CASE_GROUPS)) -> int:
    import torch

    import liteattn_ops  # noqa: F401  (registers torch.ops.liteattn)
    from liteattn_ops.core import reference
    from liteattn_ops.core.extension import extension
    from liteattn_ops.core.state import new_state, pack_bits

    ext = extension()
    gen = torch.Generator(device="cuda").manual_seed(0)
    failures = []

    def qkv(batch, heads, seqlen_q, seqlen_k, head_dim, dtype):
        def make(s):
            return torch.randn(batch, s, heads, head_dim, device="cuda", dtype=dtype, generator=gen).transpose(1, 2)
        return make(seqlen_q), make(seqlen_k), make(seqlen_k)

    def check(name, out, ref):
        out, ref = out.float(), ref.float()
        ok = not torch.isnan(out).any().item()
        err = ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item() if ok else math.nan
        ok = ok and err <= 1e-2
        print(f"case {name}: rel err {err:.2e} {'ok' if ok else 'FAIL'}", flush=True)
        if not ok:
            failures.append(name)

    def direct(q, k, v, state=None, threshold=None):
        """_C.forward with no schedule (natural query-tile order), NaN-poisoned outputs."""
        batch, heads, seqlen_q, head_dim = q.shape
        out = torch.full((batch, seqlen_q, heads, head_dim), math.nan, device="cuda", dtype=q.dtype).transpose(1, 2)
        lse = torch.full((batch, heads, seqlen_q), math.nan, device="cuda")
        ext.forward(q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), out=out.data_ptr(), lse=lse.data_ptr(),
                    batch=batch, heads=heads, seqlen_q=seqlen_q, seqlen_k=k.shape[2], head_dim=head_dim,
                    dtype=str(q.dtype).removeprefix("torch."), q_stride=q.stride()[:3], k_stride=k.stride()[:3],
                    v_stride=v.stride()[:3], out_stride=out.stride()[:3], scale=1 / math.sqrt(head_dim),
                    state=0 if state is None else state.data_ptr(),
                    threshold=0 if threshold is None else threshold.data_ptr(),
                    must_do=0, num_must_do=0, must_skip=0, num_must_skip=0,
                    stream=torch.cuda.current_stream().cuda_stream)
        return out, lse

    # Dense path: cross-attention, partial tiles, batch 2, both head dims and dtypes; the 8-head cases have more
    # query tiles than SMs (192 and 288), so the persistent grid's CTAs take 2-3 tiles each, reusing the Q buffer
    # and running the K/V ring on from one tile into the next.
    for head_dim, dtype, heads, sq, sk in [(64, torch.bfloat16, 2, 129, 300), (128, torch.float16, 2, 7, 129),
                                           (128, torch.bfloat16, 2, 256, 700), (64, torch.bfloat16, 8, 2200, 300),
                                           (128, torch.bfloat16, 8, 2200, 300)] if "dense" in cases else []:
        q, k, v = qkv(2, heads, sq, sk, head_dim, dtype)
        out, _ = direct(q, k, v)
        ref, _ = reference.attention_reference(q, k, v)
        check(f"dense d{head_dim} {str(dtype)[6:]} 2x{heads}x{sq}x{sk}", out, ref)

    # Dense path with the split wave tail (csrc/liteattn.h, SplitTailPlan), through the op (which allocates the
    # scratch), 16-bit and INT8: SMs + 3 query tiles, so the last 3 are cut into key ranges that other CTAs
    # compute into the scratch and the merge kernel reads; S_q and S_k not multiples of the tile.
    from liteattn_ops.core.tiling import tile_shape

    for head_dim in (64, 128) if "split" in cases else ():
        seqlen_q = (ext.device_sm_count() + 3) * tile_shape(head_dim, torch.bfloat16)[0] - 5
        q, k, v = qkv(1, 1, seqlen_q, 1500, head_dim, torch.bfloat16)
        splits = ext.dense_split_workspace_floats(1, 1, seqlen_q, 1500, head_dim, "bfloat16") > 0
        for use_int8 in (False, True) if getattr(ext, "HAS_INT8", False) else (False,):
            out, _ = torch.ops.liteattn.attention(q, k, v, None, use_int8)
            ref, _ = reference.attention_reference(q, k, v, use_int8=use_int8)
            check(f"dense{' int8' if use_int8 else ''} d{head_dim} 1x1x{seqlen_q}x1500"
                  f"{' (split tail)' if splits else ''}", out, ref)

    # Skip path with the split wave tail (KernelVariant::split_skip; where the call's variant has it), through the op:
    # SMs + 3 query-tile rows, 2 calls with must-do / must-skip ranges on the second, so that the tail rows' chunks
    # record tile maxima and the vote kernel writes their state.
    for head_dim in (64, 128) if "skipsplit" in cases else ():
        seqlen_q = (ext.device_sm_count() + 3) * tile_shape(head_dim, torch.bfloat16)[0] - 5
        q, k, v = qkv(1, 1, seqlen_q, 1500, head_dim, torch.bfloat16)
        splits = ext.skip_split_workspace_floats(1, 1, seqlen_q, 1500, head_dim, "bfloat16") > 0
        state = new_state(1, 1, seqlen_q, 1500, head_dim, torch.bfloat16, "cuda")
        threshold = torch.full((1,), -2.0, device="cuda")
        for call, ranges in enumerate([(None, None), (torch.tensor([[0, 10]], device="cuda", dtype=torch.int32),
                                                      torch.tensor([[300, 700]], device="cuda", dtype=torch.int32))]):
            ref, _, ref_state = reference.sparse_attention_reference(q, k, v, state, threshold, *ranges)
            out, _ = torch.ops.liteattn.sparse_attention(q, k, v, state, threshold, *ranges)
            check(f"skip d{head_dim} 1x1x{seqlen_q}x1500 call {call}{' (split tail)' if splits else ''}", out, ref)

    # Skip path through the op (device schedule), 3 calls on one state, with must-do/must-skip
    # ranges on the 2nd and 3rd call. The 8-head case has more query tiles than SMs (288): a persistent skip
    # kernel's CTAs take 2-3 rows each through the state readers' two buffers.
    for head_dim, dtype, heads, sq, sk in [(128, torch.bfloat16, 2, 256, 700), (64, torch.float16, 2, 300, 1000),
                                           (64, torch.bfloat16, 2, 1000, 129), (128, torch.bfloat16, 8, 2200, 300)
                                           ] if "skip" in cases else []:
        q, k, v = qkv(2, heads, sq, sk, head_dim, dtype)
        state = new_state(2, heads, sq, sk, head_dim, dtype, "cuda")
        threshold = torch.tensor([-2.0, -math.inf] * (heads // 2), device="cuda")
        must_do = torch.tensor([[0, 10], [400, 401]], device="cuda", dtype=torch.int32)
        must_skip = torch.tensor([[128, 384], [650, 99999]], device="cuda", dtype=torch.int32)
        for call in range(3):
            ranges = (None, None) if call == 0 else (must_do, must_skip)
            ref, _, ref_state = reference.sparse_attention_reference(q, k, v, state, threshold, *ranges)
            out, _ = torch.ops.liteattn.sparse_attention(q, k, v, state, threshold, *ranges)
            check(f"skip d{head_dim} {str(dtype)[6:]} 2x{heads}x{sq}x{sk} call {call}", out, ref)
            if not torch.equal(state, ref_state):
                print(f"case skip d{head_dim} call {call}: state differs from the reference (rounding?)")

    # Skip path with forced live sets, thr = -inf: one empty row (natural order), and every third query-tile row empty
    # with more rows than SMs (2 x 8 heads x 18 rows; natural order and through the op's schedule), where a persistent
    # skip CTA refills a state buffer after a row that visits no tile and only the TMA thread's own release orders its
    # reads of that row's visit words (wave 13).
    for batch, heads, sq, sk, fraction, empty_rows, paths, name in [
            (1, 2, 700, 900, 0.5, slice(1, 2), ("natural order",), "forced"),
            (2, 8, 2200, 300, 0.6, slice(None, None, 3), ("natural order", "op"), "forced empty rows")
            ] if "forced" in cases else []:
        for head_dim in (64, 128):
            q, k, v = qkv(batch, heads, sq, sk, head_dim, torch.bfloat16)
            block_m, block_n = liteattn_ops.tile_shape(head_dim, torch.bfloat16)
            m_tiles, n_tiles = -(-sq // block_m), -(-sk // block_n)
            seed = head_dim + (heads > 2)
            live = torch.rand(batch, heads, m_tiles, n_tiles, generator=torch.Generator().manual_seed(seed)) < fraction
            live[:, :, empty_rows] = False
            threshold = torch.full((heads,), -math.inf, device="cuda")
            for path in paths:
                state = pack_bits(live).to("cuda")
                ref, _, _ = reference.sparse_attention_reference(q, k, v, state, threshold)
                if path == "op":
                    out, _ = torch.ops.liteattn.sparse_attention(q, k, v, state, threshold)
                else:
                    out, _ = direct(q, k, v, state, threshold)
                check(f"{name} d{head_dim} {path}", out, ref)

    # INT8 Q/K mode (pre-pass + kernel): dense, then 3 skip calls with ranges on the 2nd and 3rd.
    if getattr(ext, "HAS_INT8", False) and "int8" in cases:
        from liteattn_ops.core.int8_cuda import launch_int8

        # Dense, more query tiles than SMs: persistent CTAs of 2-3 tiles, as in the 16-bit dense cases.
        for head_dim in (64, 128):
            q, k, v = qkv(2, 8, 2200, 300, head_dim, torch.bfloat16)
            out, _ = launch_int8(q, k, v, None, None, None, None, None)
            ref, _ = reference.attention_reference(q, k, v, use_int8=True)
            check(f"int8 dense d{head_dim} bfloat16 2x8x2200x300", out, ref)
        for head_dim, dtype, sq, sk in [(64, torch.bfloat16, 129, 300), (128, torch.float16, 256, 700)]:
            q, k, v = qkv(2, 2, sq, sk, head_dim, dtype)
            out, _ = launch_int8(q, k, v, None, None, None, None, None)
            ref, _ = reference.attention_reference(q, k, v, use_int8=True)
            check(f"int8 dense d{head_dim} {str(dtype)[6:]} {sq}x{sk}", out, ref)
            state = new_state(2, 2, sq, sk, head_dim, dtype, "cuda")
            threshold = torch.tensor([-2.0, -math.inf], device="cuda")
            must_do = torch.tensor([[0, 10], [200, 201]], device="cuda", dtype=torch.int32)
            must_skip = torch.tensor([[128, 256], [650, 99999]], device="cuda", dtype=torch.int32)
            for call in range(3):
                ranges = (None, None) if call == 0 else (must_do, must_skip)
                ref, _, _ = reference.sparse_attention_reference(q, k, v, state, threshold, *ranges, use_int8=True)
                out, _ = launch_int8(q, k, v, state, threshold, *ranges, None)
                check(f"int8 skip d{head_dim} {str(dtype)[6:]} {sq}x{sk} call {call}", out, ref)

    torch.cuda.synchronize()
    print(f"worker done: {len(failures)} failing cases", flush=True)
    return 1 if failures else 0


def parse(tool: str, text: str) -> tuple[str, bool]:
    """(summary, passed) from compute-sanitizer's output. racecheck ends with "RACECHECK SUMMARY:
    N hazards displayed (E errors, W warnings)", the other tools with "ERROR SUMMARY: N errors"."""
    worker_ok = "worker done: 0 failing cases" in text
    race = re.findall(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)", text)
    errors = re.findall(r"ERROR SUMMARY: (\d+) error", text)
    if tool == "racecheck" and race:
        hazards, n_errors, warnings = (int(x) for x in race[-1])
        summary = f"{hazards} hazards ({n_errors} errors, {warnings} warnings)"
        clean = hazards == 0 and n_errors == 0
    elif errors:
        summary = f"{errors[-1]} errors"
        clean = int(errors[-1]) == 0
    else:
        summary, clean = "no summary line (see log)", False
    if not worker_ok:
        summary += ", worker failed (see log)"
    return summary, clean and worker_ok


def hazard_sites(text: str, limit: int = 8) -> list[str]:
    """racecheck's displayed hazards grouped by the source lines of their two accesses, most frequent first:
    "N x WAR: Read tile_scheduler.cuh:108 (threads 159, 223, ...) / Write tile_scheduler.cuh:143 (threads 32)"."""
    groups: dict[tuple, list[set]] = {}
    pattern = re.compile(r"Potential (\w+) hazard detected.*?\n=+\s+(\w+) Thread \((\d+),[^)]*\) at .*? in (\S+:\d+)"
                         r"\s*\n=+\s+(\w+) Thread \((\d+),[^)]*\) at .*? in (\S+:\d+)")
    for m in pattern.finditer(text):
        key = (m[1], m[2], os.path.basename(m[4]), m[5], os.path.basename(m[7]))
        entry = groups.setdefault(key, [set(), set(), 0])  # reader threads, writer threads, count
        entry[0].add(int(m[3]))
        entry[1].add(int(m[6]))
        entry[2] += 1
    def few(ts):
        ts = sorted(ts)
        return ", ".join(map(str, ts[:4])) + (", ..." if len(ts) > 4 else "")
    rows = sorted(groups.items(), key=lambda kv: -kv[1][2])[:limit]
    return [f"{n} x {kind}: {a} {site_a} (threads {few(ta)}) / {b} {site_b} (threads {few(tb)})"
            for (kind, a, site_a, b, site_b), (ta, tb, n) in rows]


def finish(proc: subprocess.Popen, timeout: float) -> None:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tools", default=",".join(TOOLS))
    parser.add_argument("--parallel", action="store_true", help="run the tools at the same time")
    parser.add_argument("--log-dir", default=None, help="write each tool's full output here")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per tool")
    parser.add_argument("--print-limit", type=int, default=20, help="errors each tool reports in full")
    parser.add_argument("--cases", default=",".join(CASE_GROUPS), help="comma list of case groups to run")
    parser.add_argument("--kernel-filter", default=None,
                        help="instrument only kernels whose name contains this (e.g. liteattn)")
    args = parser.parse_args(argv)
    cases = args.cases.split(",")
    unknown = sorted(set(cases) - set(CASE_GROUPS))
    if unknown:
        parser.error(f"--cases: unknown group(s) {', '.join(unknown)}; expected a comma list of {', '.join(CASE_GROUPS)}")
    if args.worker:
        return worker(frozenset(cases))

    sanitizer = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    tools = args.tools.split(",")
    if args.log_dir:
        os.makedirs(args.log_dir, exist_ok=True)
    jobs = {}
    for tool in tools:
        kernel_filter = ["--kernel-name", f"kns={args.kernel_filter}"] if args.kernel_filter else []
        cmd = [sanitizer, "--tool", tool, *TOOL_FLAGS[tool], *kernel_filter, "--print-limit", str(args.print_limit),
               sys.executable, os.path.abspath(__file__), "--worker", "--cases", ",".join(cases)]
        log = open(os.path.join(args.log_dir, f"sanitize_{tool}.log"), "w+") if args.log_dir else \
            tempfile.TemporaryFile("w+")
        jobs[tool] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True), log, time.time())
        if not args.parallel:
            finish(jobs[tool][0], args.timeout)
    results, sites = [], []
    for tool, (proc, log, start) in jobs.items():
        finish(proc, max(1.0, args.timeout - (time.time() - start)))
        log.seek(0)
        text = log.read()
        summary, passed = parse(tool, text)
        results.append((tool, summary, passed, time.time() - start))
        if tool == "racecheck":
            sites = hazard_sites(text)
    print(f"\n{'tool':<10} {'result':<6} {'seconds':>8}  summary")
    for tool, summary, passed, seconds in results:
        print(f"{tool:<10} {'PASS' if passed else 'FAIL':<6} {seconds:8.1f}  {summary}")
    if sites:
        print("racecheck hazards displayed, by source line (--print-limit caps how many are displayed):")
        for line in sites:
            print("  " + line)
    return 0 if all(passed for _, _, passed, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
