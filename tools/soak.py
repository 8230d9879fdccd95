"""Soak test: many consecutive calls of the stateful op and of a routed model, with resets in between.

    python tools/soak.py                                 # CPU: 200 calls each, a minute or so
    python tools/soak.py --device cuda --calls 10000     # H200: the 10,000-call run
    python tools/soak.py --device cuda --calls 10000 --compile --json out/soak.json

What it checks, over `--calls` calls with a reset every `--reset-every` calls (a "video"):
  op      the live set of `torch.ops.liteattn.sparse_attention` only shrinks between resets, and
          each video's live fractions repeat the first video's exactly (the inputs of step i are
          the same in every video): the state carries nothing across a reset;
  model   two twin copies of a small DiT (same weights), routed with liteattn_ops.enable (and
          compiled with backend="liteattn" under --compile), give bit-identical outputs and skip
          states on every call, and their live sets only shrink between resets;
  memory  host RSS and device memory (allocated / reserved) after each video: reported, and
          flat after the first video (growth beyond --max-host-growth-mb or any growth of the
          allocated device memory fails);
  compile no recompiles after the first video (Dynamo's unique graph count, --compile only).
Device-side checks accumulate in device flags (no host sync per call); the host reads them once
per video. Prints a table; exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import liteattn_ops
from liteattn_ops.core.state import live_mask, new_state, reset_state
from liteattn_ops.testing import local_qkv


def host_rss_mb() -> float:
    """Resident set size of this process (Linux /proc), in MiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def device_mb(device) -> tuple[float, float]:
    if device.type != "cuda":
        return 0.0, 0.0
    return torch.cuda.memory_allocated(device) / 2**20, torch.cuda.memory_reserved(device) / 2**20


class Block(nn.Module):
    """A DiT-like block whose q = k = the normalised tokens (local attention on positional
    features), so tiles become negligible and the skip state evolves."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        with torch.no_grad():
            self.qkv.weight[: 2 * dim].copy_(torch.cat([torch.eye(dim), torch.eye(dim)]) * 1.5)
            self.qkv.bias[: 2 * dim].zero_()
            self.proj.weight.mul_(0.1)

    def forward(self, x):
        b, s, c = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, s, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(y.transpose(1, 2).reshape(b, s, c))


class SmallDiT(nn.Module):
    def __init__(self, dim: int, heads: int, depth: int):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def positional_tokens(seq: int, heads: int, head_dim: int, device, dtype, step: int, steps: int,
                      gen: torch.Generator) -> torch.Tensor:
    """Token features of one denoising step: per head [cos, sin] of the position at head_dim / 2
    frequencies (so q.k is a shift-invariant kernel of the token distance: local attention), plus
    noise that shrinks with the step, as latents get cleaner."""
    pos = torch.arange(seq, dtype=torch.float32)[:, None]
    freq = torch.arange(head_dim // 2, dtype=torch.float32)[None] * math.pi / seq * 2
    per_head = torch.cat([torch.cos(pos * freq), torch.sin(pos * freq)], -1)
    x = per_head.repeat(1, heads)[None]
    sigma = 0.5 * (1 - step / steps)
    return (x + sigma * torch.randn(x.shape, generator=gen)).to(device, dtype)


def unique_graphs() -> int:
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


class Video:
    """Checks of one video (between two resets), accumulated on the device."""

    def __init__(self, device):
        self.grew = torch.zeros((), dtype=torch.bool, device=device)      # a removed tile came back
        self.differ = torch.zeros((), dtype=torch.bool, device=device)    # twins differ
        self.fractions: list[torch.Tensor] = []


def soak_op(args, device, dtype, report) -> bool:
    seq, heads, head_dim = args.seq, args.heads, args.head_dim
    gen = torch.Generator().manual_seed(0)
    q0, k0, v0 = local_qkv((1, 1, seq), 1, heads, head_dim, length_scale=seq / 64, sharpness=30.0, generator=gen)
    # Noisy early steps, cleaner later ones: the live set keeps shrinking within a video.
    steps = [tuple((t + 0.5 * (1 - i / args.reset_every) * torch.randn(t.shape, generator=gen)).to(device, dtype)
                   for t in (q0, k0, v0)) for i in range(args.reset_every)]
    state = new_state(1, heads, seq, seq, head_dim, dtype, device)
    threshold = torch.full((heads,), args.threshold, device=device)
    ok, first_video, rows = True, None, []
    video, previous = Video(device), live_mask(state, seq, head_dim, dtype)
    start = time.perf_counter()
    for call in range(args.calls):
        i = call % args.reset_every
        q, k, v = steps[i]
        torch.ops.liteattn.sparse_attention(q, k, v, state, threshold)
        current = live_mask(state, seq, head_dim, dtype)
        video.grew |= (current & ~previous).any()
        video.fractions.append(current.float().mean())
        previous = current
        if i == args.reset_every - 1 or call == args.calls - 1:
            fractions = torch.stack(video.fractions).tolist()          # one host sync per video
            grew = bool(video.grew)
            if first_video is None:
                first_video = fractions
            repeats = fractions == first_video[: len(fractions)]
            host, (alloc, reserved) = host_rss_mb(), device_mb(device)
            rows.append(dict(call=call + 1, live_first=fractions[0], live_last=fractions[-1], shrinks=not grew,
                             repeats_first_video=repeats, host_mb=host, device_alloc_mb=alloc, device_reserved_mb=reserved))
            ok &= (not grew) and repeats
            reset_state(state)
            video, previous = Video(device), live_mask(state, seq, head_dim, dtype)
    elapsed = time.perf_counter() - start
    ok &= check_memory(rows, args, "op", report)
    report["op"] = dict(calls=args.calls, seconds=elapsed, videos=rows)
    print_table("op", rows, elapsed, args.calls)
    return ok


def soak_model(args, device, dtype, report) -> bool:
    torch.manual_seed(0)
    model = SmallDiT(args.heads * args.head_dim, args.heads, args.depth).to(device, dtype).eval()
    twin = copy.deepcopy(model)
    for m in (model, twin):
        liteattn_ops.enable(m, threshold=args.threshold)
    run_a, run_b = model, twin
    if args.compile:
        run_a = torch.compile(model, backend="liteattn", fullgraph=True, mode=args.mode)
        run_b = torch.compile(twin, backend="liteattn", fullgraph=True, mode=args.mode)
    gen = torch.Generator().manual_seed(1)
    steps = [positional_tokens(args.seq, args.heads, args.head_dim, device, dtype, i, args.reset_every, gen)
             for i in range(args.reset_every)]
    sites_a = [site for _, site in liteattn_ops.attention_sites(model)]
    sites_b = [site for _, site in liteattn_ops.attention_sites(twin)]

    def states(sites):
        # Skip-state buffers: int32 (B, H, Mt, W) (a site may keep other buffers, e.g. call counters).
        return [t for site in sites for name, t in site.named_buffers()
                if name.startswith("state") and t.dtype == torch.int32 and t.dim() == 4]

    ok, rows, graphs_after_first = True, [], None
    video, previous, first_video = Video(device), None, None
    start = time.perf_counter()
    with torch.no_grad():
        for call in range(args.calls):
            i = call % args.reset_every
            out_a, out_b = call_model(run_a, steps[i], args), call_model(run_b, steps[i], args)
            sa, sb = states(sites_a), states(sites_b)
            video.differ |= (out_a != out_b).any()
            for x, y in zip(sa, sb, strict=True):
                video.differ |= (x != y).any()
            masks = [live_mask(s, args.seq, args.head_dim, dtype) for s in sa]
            if previous is not None:
                for cur, prev in zip(masks, previous):
                    video.grew |= (cur & ~prev).any()
            video.fractions.append(torch.stack([m.float().mean() for m in masks]).mean())
            previous = masks
            if i == args.reset_every - 1 or call == args.calls - 1:
                fractions = torch.stack(video.fractions).tolist()
                grew, differ = bool(video.grew), bool(video.differ)
                if first_video is None:
                    first_video = fractions
                    graphs_after_first = unique_graphs()
                repeats = fractions == first_video[: len(fractions)]
                host, (alloc, reserved) = host_rss_mb(), device_mb(device)
                rows.append(dict(call=call + 1, live_first=fractions[0], live_last=fractions[-1], shrinks=not grew,
                                 twins_identical=not differ, repeats_first_video=repeats, graphs=unique_graphs(),
                                 host_mb=host, device_alloc_mb=alloc, device_reserved_mb=reserved))
                ok &= (not grew) and (not differ) and repeats
                liteattn_ops.reset(model)
                liteattn_ops.reset(twin)
                video, previous = Video(device), None
    elapsed = time.perf_counter() - start
    recompiles = unique_graphs() - graphs_after_first
    if args.compile and recompiles:
        print(f"FAIL model: {recompiles} graphs compiled after the first video (recompiles)")
        ok = False
    ok &= check_memory(rows, args, "model", report)
    report["model"] = dict(calls=args.calls, seconds=elapsed, videos=rows, recompiles_after_first_video=recompiles,
                           compiled=args.compile, mode=args.mode)
    print_table("model", rows, elapsed, args.calls)
    return ok


def call_model(run, x, args):
    """One model call; under CUDA graphs (reduce-overhead) each call is a new step and its output
    is copied out before the next replay can overwrite it."""
    if args.mode == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()
        return run(x).clone()
    return run(x)


def check_memory(rows, args, what, report) -> bool:
    """Flat after the first video: device allocated memory never grows, host RSS within a margin."""
    if len(rows) < 2:
        return True
    host_growth = max(r["host_mb"] for r in rows[1:]) - rows[0]["host_mb"]
    alloc_growth = max(r["device_alloc_mb"] for r in rows[1:]) - rows[0]["device_alloc_mb"]
    report.setdefault("memory", {})[what] = dict(host_growth_mb=host_growth, device_alloc_growth_mb=alloc_growth)
    ok = True
    if host_growth > args.max_host_growth_mb:
        print(f"FAIL {what}: host RSS grew by {host_growth:.1f} MiB after the first video")
        ok = False
    if alloc_growth > 0:
        print(f"FAIL {what}: device allocated memory grew by {alloc_growth:.3f} MiB after the first video")
        ok = False
    return ok


def print_table(what, rows, elapsed, calls):
    keys = [k for k in rows[0] if k != "call"]
    print(f"\n{what}: {calls} calls in {elapsed:.1f} s ({1e3 * elapsed / calls:.3f} ms per call)")
    shown = rows if len(rows) <= 12 else rows[:5] + [None] + rows[-5:]
    header = ["after call"] + keys
    print(" | ".join(header))
    for row in shown:
        if row is None:
            print("...")
            continue
        cells = [str(row["call"])] + [f"{row[k]:.4f}" if isinstance(row[k], float) else str(row[k]) for k in keys]
        print(" | ".join(cells))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--calls", type=int, default=None, help="calls of each part (default: 200 CPU, 10000 CUDA)")
    parser.add_argument("--reset-every", type=int, default=20, help="calls per video (between resets)")
    parser.add_argument("--seq", type=int, default=None, help="tokens (default: 1024 CPU, 8192 CUDA)")
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64, choices=liteattn_ops.supported_head_dims())
    parser.add_argument("--depth", type=int, default=2, help="blocks of the routed model")
    parser.add_argument("--threshold", type=float, default=-6.0)
    parser.add_argument("--compile", action="store_true", help="compile the twins with backend='liteattn'")
    parser.add_argument("--mode", default=None, help="torch.compile mode, e.g. reduce-overhead")
    parser.add_argument("--max-host-growth-mb", type=float, default=64.0)
    parser.add_argument("--only", choices=["op", "model"], default=None)
    parser.add_argument("--json", default=None, help="write the report here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.calls is None:
        args.calls = 10000 if device.type == "cuda" else 200
    if args.seq is None:
        args.seq = 8192 if device.type == "cuda" else 512
    if args.calls < 1 or args.reset_every < 2:
        parser.error("--calls must be >= 1 and --reset-every >= 2")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    report = {"args": vars(args), "device": str(device), "torch": torch.__version__}
    ok = True
    if args.only in (None, "op"):
        ok &= soak_op(args, device, dtype, report)
    if args.only in (None, "model"):
        ok &= soak_model(args, device, dtype, report)
    report["ok"] = bool(ok)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    print("\nsoak:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
