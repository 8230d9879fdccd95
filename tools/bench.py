"""Benchmark of the liteattn kernel against its peers on one GPU (H200).

    python tools/bench.py [--shapes S,H,D ...] [--only ours,ours_int8,sdpa,flex] [--json bench.json] [--ceilings]
                          [--variants default,nopp,...] [--graph-shapes S,H,D ...]

For each (S, H, D) at B = 1, bf16, q/k/v in the (B, S, H, D) memory layout of a DiT:
  ours dense                 torch.ops.liteattn.attention
  ours state f=1.00          sparse op, fresh state, thr = -inf (the cost of the skip logic)
  ours forced f, balanced    every query tile keeps the same number of random live tiles
  ours forced f, heavy-first live counts fall linearly over the query tiles (mean f)
  ours forced f, heavy-last  ... rise linearly
  ours structured            local (3-D grid) q/k, thr = -10, state settled over 4 calls
  ours_int8 ...              the same rows in INT8 Q/K mode (issue 12; liteattn_ops.core.int8_cuda.launch_int8,
                             what the ops call with use_int8=True): every time includes the pre-pass;
  ours_int8 prepass          the pre-pass alone (K mean + quantization of q and k)
  sdpa FLASH / CUDNN         F.scaled_dot_product_attention with one backend
  flex dense / flex forced   FlexAttention (compiled), dense and with the block mask of the
                             forced 50 % balanced state
Forced masks use thr = -inf, so the same tiles are live at every timed call. Shapes listed in
--graph-shapes (default: the two small ones of issue 10) are timed as CUDA-graph replays of
GRAPH_CALLS calls (per-call time = replay time / GRAPH_CALLS), ours and SDPA alike.
--variants (A/B builds, cmake -DLITEATTN_AB_VARIANTS="ids") times "ours" once per value of the
environment variable LITEATTN_VARIANT (csrc/forward.cu): names joined by '+', e.g. default, nopp, lazy,
early, lazy+early, bn176, nolpt; a variant with its own BN (bnN) times the bf16 dense row only (the INT8
mode's k_scale blocks are the table's BN).
--repeats R times the variants R times in turn (A B A B ...), so drift between them shows.
--paired R times each sparse row R times alternating with its mode's dense call (dense, sparse, dense, ...) and
reports the median of the R ratios of neighbouring times ("paired" in the summary): on a power-capped GPU the clock
drifts by several % between rows timed seconds apart (NOTES.md wave 20), and a ratio of neighbours cancels most of it.
TFLOP/s = 4 * B * H * S^2 * D / t (dense-equivalent for the sparse rows); times are the median of
triton.testing.do_bench. Prints every row, then a summary against the targets of issue 10, and
writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys

import torch
import torch.nn.functional as F

import liteattn_ops  # noqa: F401  (registers torch.ops.liteattn)
from liteattn_ops.core.state import live_mask, new_state, pack_bits
from liteattn_ops.core.tiling import num_tiles, tile_shape
from liteattn_ops.testing import forced_live, local_qkv

# The six shapes of issue 10, with its FA3 column (TFLOP/s, H200, 2026-12-01) for the ratios.
DEFAULT_SHAPES = [(32760, 12, 128), (16384, 24, 128), (32760, 24, 64), (75600, 40, 128), (4096, 12, 128),
                  (16384, 4, 64)]
FA3_TFLOPS = {(32760, 12, 128): 658, (16384, 24, 128): 596, (32760, 24, 64): 471, (75600, 40, 128): 613,
              (4096, 12, 128): 628, (16384, 4, 64): 463}
GRAPH_SHAPES = [(4096, 12, 128), (16384, 4, 64)]
GRAPH_CALLS = 20
GRIDS = {32760: (21, 30, 52), 16384: (16, 32, 32)}  # Wan-style (t, h, w) token grids


def do_bench(fn, flop_hint: float) -> float:
    """Median milliseconds: triton.testing.do_bench, except for calls of about a second or
    more (flop_hint > 2e14), which take one warm-up and the median of 3 event-timed calls."""
    from triton.testing import do_bench as triton_bench

    if flop_hint <= 2e14:
        return triton_bench(fn, warmup=25, rep=200, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[1]


def graph_bench(fn, flop_hint: float) -> float:
    """Per-call milliseconds of fn replayed from a CUDA graph of GRAPH_CALLS calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GRAPH_CALLS):
            fn()
    return do_bench(graph.replay, flop_hint * GRAPH_CALLS) / GRAPH_CALLS


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="*", default=None, help="S,H,D triples (default: the six of issue 10)")
    parser.add_argument("--graph-shapes", nargs="*", default=None,
                        help="S,H,D triples timed as CUDA-graph replays (default: the two small ones)")
    parser.add_argument("--only", default="ours,sdpa,flex", help="comma list of ours, ours_int8, sdpa, flex")
    parser.add_argument("--fractions", default="0.75,0.5,0.25")
    parser.add_argument("--kinds", default="balanced,heavy-first,heavy-last")
    parser.add_argument("--no-structured", action="store_true")
    parser.add_argument("--flex-shapes", nargs="*", default=None, help="S,H,D triples to run FlexAttention on (default: all)")
    parser.add_argument("--big-fractions", default="0.5", help="forced fractions for shapes of > 2e14 FLOP (slow)")
    parser.add_argument("--big-kinds", default="balanced", help="forced-mask kinds for shapes of > 2e14 FLOP (slow)")
    parser.add_argument("--variants", default="default", help="comma list of LITEATTN_VARIANT values (A/B builds)")
    parser.add_argument("--repeats", type=int, default=1, help="time the variants this many times in turn")
    parser.add_argument("--paired", type=int, default=0, metavar="R",
                        help="time each sparse row R times in turn with its dense call; report the median ratio")
    parser.add_argument("--ceilings", action="store_true", help="also time a bf16 GEMM and a D2D copy")
    parser.add_argument("--json", default="bench.json")
    args = parser.parse_args(argv)

    def triples(values):
        return [tuple(int(x) for x in s.split(",")) for s in values]

    shapes = triples(args.shapes) if args.shapes else DEFAULT_SHAPES
    graph_shapes = set(triples(args.graph_shapes)) if args.graph_shapes is not None else set(GRAPH_SHAPES)
    only = set(args.only.split(","))
    fractions = [float(f) for f in args.fractions.split(",")] if args.fractions else []
    kinds = args.kinds.split(",") if args.kinds else []
    variants = args.variants.split(",")
    dev = "cuda"
    dtype = torch.bfloat16
    rows = []
    gen = torch.Generator().manual_seed(0)

    def each_variant():
        """The --variants in turn, --repeats times, with LITEATTN_VARIANT set; yields the row tag (None for
        a run of the default only) and whether the variant has the skip path (a bnN variant is dense-only)."""
        for variant in [v for _ in range(args.repeats) for v in variants]:
            os.environ["LITEATTN_VARIANT"] = variant
            yield (None if variants == ["default"] else variant), "bn" not in variant
        os.environ.pop("LITEATTN_VARIANT", None)

    def record(shape, name, ms, fraction=1.0, variant=None, paired=None):
        seqlen, heads, head_dim = shape
        tflops = 4 * heads * seqlen * seqlen * head_dim / (ms * 1e-3) / 1e12
        rows.append(dict(S=seqlen, H=heads, D=head_dim, name=name, variant=variant, ms=ms, live=fraction,
                         tflops=tflops, **({} if paired is None else {"paired_ratio": paired})))
        label = name if variant is None else f"{name} [{variant}]"
        extra = "" if paired is None else f"  paired t / t_dense {paired:.3f}"
        print(f"  {label:<42} {ms:9.4f} ms  live {fraction:5.3f}  {tflops:7.1f} TFLOP/s{extra}", flush=True)

    def sparse_time(timer, dense_fn, fn, flop):
        """(ms, paired ratio): the sparse call's median time and, with --paired R, the median over R turns of its
        time over the dense call's time measured just before it (None without --paired)."""
        if args.paired <= 0:
            return timer(fn, flop), None
        times, ratios = [], []
        for _ in range(args.paired):
            dense_ms = timer(dense_fn, flop)
            times.append(timer(fn, flop))
            ratios.append(times[-1] / dense_ms)
        return statistics.median(times), statistics.median(ratios)

    if args.ceilings:
        a = torch.randn(8192, 8192, device=dev, dtype=dtype)
        b = torch.randn(8192, 8192, device=dev, dtype=dtype)
        ms = do_bench(lambda: a @ b, 1e12)
        print(f"bf16 GEMM 8192^3: {2 * 8192**3 / ms / 1e9:.0f} TFLOP/s")
        rows.append(dict(name="ceiling bf16 gemm 8192^3", ms=ms, tflops=2 * 8192**3 / ms / 1e9))
        x = torch.empty(2 * 1024**3, device=dev, dtype=torch.uint8)
        y = torch.empty_like(x)
        ms = do_bench(lambda: y.copy_(x), 1e12)
        print(f"D2D copy 2 GiB: {2 * x.numel() / ms / 1e9:.2f} TB/s (read + write)")
        rows.append(dict(name="ceiling d2d copy 2GiB", ms=ms, tbps=2 * x.numel() / ms / 1e9))
        del a, b, x, y

    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                gpu=torch.cuda.get_device_name(), torch=torch.__version__, command=" ".join(sys.argv))

    def write_json():
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)

    flex_shapes = triples(args.flex_shapes) if args.flex_shapes is not None else shapes
    for shape in shapes:
        seqlen, heads, head_dim = shape
        flop = 4 * heads * seqlen * seqlen * head_dim
        big = flop > 2e14
        timer = graph_bench if shape in graph_shapes else do_bench
        shape_fractions = [float(f) for f in args.big_fractions.split(",") if f] if big else fractions
        shape_kinds = (args.big_kinds.split(",") if args.big_kinds else []) if big else kinds
        print(f"S={seqlen} H={heads} D={head_dim} (B=1, bf16){' [CUDA-graph replay]' if timer is graph_bench else ''}",
              flush=True)
        q, k, v = (torch.randn(1, seqlen, heads, head_dim, device=dev, dtype=dtype).transpose(1, 2) for _ in range(3))
        block_m, block_n = tile_shape(head_dim, dtype)
        m_tiles, n_tiles = num_tiles(seqlen, block_m), num_tiles(seqlen, block_n)
        no_thr = torch.full((heads,), -math.inf, device=dev)

        def structured(mode, call):
            """The structured case (local q/k on the token grid, thr = -10, state settled over 4 calls), once per
            variant with a skip path: `call(q, k, v, state, thr)` runs the mode's sparse attention."""
            if args.no_structured or seqlen not in GRIDS:
                return
            sq, sk, sv = (t.to(dev, dtype) for t in local_qkv(GRIDS[seqlen], 1, heads, head_dim, generator=gen))
            thr = torch.full((heads,), -10.0, device=dev)
            for tag, has_skip_path in each_variant():
                if not has_skip_path:
                    continue
                state = new_state(1, heads, seqlen, seqlen, head_dim, dtype, dev)
                for _ in range(4):
                    call(sq, sk, sv, state, thr)
                ms = do_bench(lambda: call(sq, sk, sv, state, thr), flop)
                fraction = live_mask(state, seqlen, head_dim, dtype).float().mean().item()
                record(shape, f"{mode} structured thr=-10", ms, fraction, variant=tag)

        forced = []
        if "ours" in only or "ours_int8" in only:
            for fraction in shape_fractions:
                for kind in shape_kinds:
                    live = forced_live(1, heads, m_tiles, n_tiles, fraction, kind, gen)
                    forced.append((kind, fraction, pack_bits(live).to(dev), live.float().mean().item()))
        if "ours" in only:
            for tag, has_skip_path in each_variant():
                def dense_call():
                    return torch.ops.liteattn.attention(q, k, v)

                record(shape, "ours dense", timer(dense_call, flop), variant=tag)
                if not has_skip_path:
                    continue
                state = new_state(1, heads, seqlen, seqlen, head_dim, dtype, dev)
                ms, paired = sparse_time(timer, dense_call,
                                         lambda: torch.ops.liteattn.sparse_attention(q, k, v, state, no_thr), flop)
                record(shape, "ours state f=1.00", ms, variant=tag, paired=paired)
                for kind, fraction, state, actual in forced:
                    ms, paired = sparse_time(timer, dense_call,
                                             lambda: torch.ops.liteattn.sparse_attention(q, k, v, state, no_thr), flop)
                    record(shape, f"ours forced {kind} f={fraction:.2f}", ms, actual, variant=tag, paired=paired)
            structured("ours", torch.ops.liteattn.sparse_attention)
        if "ours_int8" in only:
            from liteattn_ops.core.int8_cuda import launch_int8, quantize

            def int8_call(a, b, c, st=None, thr=None):
                return lambda: launch_int8(a, b, c, st, thr, None, None, None)

            record(shape, "ours_int8 prepass", timer(lambda: quantize(q, k), flop))
            for tag, has_skip_path in each_variant():
                if not has_skip_path:  # a bnN variant: 16-bit dense only
                    continue
                record(shape, "ours_int8 dense", timer(int8_call(q, k, v), flop), variant=tag)
                state = new_state(1, heads, seqlen, seqlen, head_dim, dtype, dev)
                ms, paired = sparse_time(timer, int8_call(q, k, v), int8_call(q, k, v, state, no_thr), flop)
                record(shape, "ours_int8 state f=1.00", ms, variant=tag, paired=paired)
                for kind, fraction, state, actual in forced:
                    ms, paired = sparse_time(timer, int8_call(q, k, v), int8_call(q, k, v, state, no_thr), flop)
                    record(shape, f"ours_int8 forced {kind} f={fraction:.2f}", ms, actual, variant=tag, paired=paired)
            structured("ours_int8", lambda a, b, c, st, thr: launch_int8(a, b, c, st, thr, None, None, None))
        del forced
        if "sdpa" in only:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            for backend in ((SDPBackend.CUDNN_ATTENTION,) if big else (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION)):
                try:
                    with sdpa_kernel(backend):
                        ms = timer(lambda: F.scaled_dot_product_attention(q, k, v), flop)
                    record(shape, f"sdpa {backend.name}", ms)
                except Exception as error:  # a backend can refuse a shape
                    print(f"  sdpa {backend.name}: unavailable ({error.__class__.__name__}: {error})"[:200])
        if "flex" in only and shape in flex_shapes:
            try:
                from torch.nn.attention.flex_attention import BlockMask, flex_attention

                flex = torch.compile(flex_attention, dynamic=False)
                record(shape, "flex dense", do_bench(lambda: flex(q, k, v), flop))
                live = forced_live(1, heads, m_tiles, n_tiles, 0.5, "balanced", gen).to(dev)
                counts = live.sum(-1).to(torch.int32)
                indices = torch.argsort(live.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
                mask = BlockMask.from_kv_blocks(counts, indices, BLOCK_SIZE=(block_m, block_n), seq_lengths=(seqlen, seqlen))
                record(shape, "flex forced balanced f=0.50", do_bench(lambda: flex(q, k, v, block_mask=mask), flop),
                       live.float().mean().item())
            except Exception as error:
                print(f"  flex: failed ({error.__class__.__name__}: {error})"[:300])
        del q, k, v
        torch.cuda.empty_cache()
        write_json()  # after every shape, so an interrupted run keeps what it measured

    print(f"\n{meta['date']}  {meta['gpu']}  torch {meta['torch']}")
    print(f"{'S':>6} {'H':>3} {'D':>4}  {'kernel':<42} {'ms':>9} {'live':>6} {'TFLOP/s':>8}")
    for r in rows:
        if "S" in r:
            label = r["name"] if r.get("variant") is None else f"{r['name']} [{r['variant']}]"
            print(f"{r['S']:>6} {r['H']:>3} {r['D']:>4}  {label:<42} {r['ms']:9.4f} {r['live']:6.3f} {r['tflops']:8.1f}")
    print_summary(rows)


INT8_TARGET = {128: 1.2, 64: 1.15}  # issue 12: INT8-QK mode (P.V in bf16) over our bf16 dense


def print_int8_summary(mine, shape):
    """INT8 mode of one shape: its dense time against our bf16 dense and cuDNN (same run), the pre-pass share,
    and each sparse INT8 time over the INT8 dense time (target f + 0.01)."""
    ours = {r["name"]: r for r in mine if r["name"].startswith("ours_int8") and r.get("variant") is None}
    dense = ours.get("ours_int8 dense")
    if dense is None:
        return
    parts = [f"{shape[0]}x{shape[1]}x{shape[2]} INT8", f"dense {dense['tflops']:.0f}"]
    bf16 = next((r for r in mine if r["name"] == "ours dense" and r.get("variant") is None), None)
    if bf16:
        speedup = bf16["ms"] / dense["ms"]
        target = INT8_TARGET.get(shape[2])
        parts.append(f"x bf16 {speedup:.3f}" + ("" if target is None else (" ok" if speedup >= target else " MISS")))
    cudnn = next((r for r in mine if r["name"] == "sdpa CUDNN_ATTENTION"), None)
    if cudnn:
        parts.append(f"/cuDNN {dense['tflops'] / cudnn['tflops']:.3f}")
    prepass = ours.get("ours_int8 prepass")
    if prepass:
        parts.append(f"prepass {prepass['ms'] * 1e3:.0f} us ({100 * prepass['ms'] / dense['ms']:.1f} %)")
    for name, r in ours.items():
        if name in ("ours_int8 dense", "ours_int8 prepass") or "structured" in name:
            continue
        ratio = r.get("paired_ratio", r["ms"] / dense["ms"])
        target = 1.01 if "f=1.00" in name else r["live"] + 0.01
        short = name.replace("ours_int8 ", "").replace("forced ", "").replace("balanced", "bal") \
            .replace("heavy-first", "hf").replace("heavy-last", "hl")
        parts.append(f"{short} {ratio:.3f}{'' if ratio <= target else '!'}")
    print("  " + " | ".join(parts))


def print_summary(rows):
    """Per shape and variant: dense TFLOP/s, its ratio to cuDNN (same run) and to the issue's FA3
    column, and each sparse time over the dense time with the target f + 0.01 (f = 1: <= 1.01)."""
    paired = ", paired: the median ratio of neighbouring times" if any("paired_ratio" in r for r in rows) else ""
    print(f"\nsummary (t / t_dense{paired}; target: f = 1 <= 1.01, forced <= f + 0.01; dense >= 1.05 x FA3; "
          "INT8 dense >= 1.2 x bf16 at d128, 1.15 x at d64)")
    shapes = sorted({(r["S"], r["H"], r["D"]) for r in rows if "S" in r}, key=lambda s: -s[0] * s[0] * s[1] * s[2])
    for shape in shapes:
        mine = [r for r in rows if (r.get("S"), r.get("H"), r.get("D")) == shape]
        print_int8_summary(mine, shape)
        cudnn = next((r for r in mine if r["name"] == "sdpa CUDNN_ATTENTION"), None)
        fa3 = FA3_TFLOPS.get(shape)
        for variant in dict.fromkeys(r.get("variant") for r in mine if r["name"] == "ours dense"):
            ours = {r["name"]: r for r in mine if r.get("variant") == variant and r["name"].startswith("ours ")}
            dense = ours.get("ours dense")
            if dense is None:
                continue
            parts = [f"{shape[0]}x{shape[1]}x{shape[2]}" + (f" [{variant}]" if variant else ""),
                     f"dense {dense['tflops']:.0f}"]
            if cudnn:
                parts.append(f"/cuDNN {dense['tflops'] / cudnn['tflops']:.3f} (cuDNN {cudnn['tflops']:.0f})")
            if fa3:
                verdict = "ok" if dense["tflops"] >= 1.05 * fa3 else "MISS"
                parts.append(f"/FA3 {dense['tflops'] / fa3:.3f} {verdict}")
            for name, r in ours.items():
                if name == "ours dense" or "structured" in name:
                    continue
                ratio = r.get("paired_ratio", r["ms"] / dense["ms"])
                target = 1.01 if "f=1.00" in name else r["live"] + 0.01
                short = name.replace("ours ", "").replace("forced ", "").replace("balanced", "bal") \
                    .replace("heavy-first", "hf").replace("heavy-last", "hl")
                parts.append(f"{short} {ratio:.3f}{'' if ratio <= target else '!'}")
            print("  " + " | ".join(parts))


if __name__ == "__main__":
    main()
