"""Compile time of backend="liteattn" with and without liteattn_ops.enable() first.

A Wan2.1-1.3B-shaped diffusers WanTransformer3DModel (the real configuration: dim 1536, 12 heads
of 128, ffn 8960, text dim 4096; `--layers` of its 30 blocks, random weights), float32 on CPU, a
small latent. Prints the wall time of the first two calls (which include the compiles) and of a
third (steady state) for:

    enabled     liteattn_ops.enable(model), then torch.compile(model, backend="liteattn")
    fallback    torch.compile(model, backend="liteattn") alone (fallback="enable": the first call
                traces a plain-SDPA graph, runs it without Inductor, enables the model; the second
                call retraces and compiles the routed graph with Inductor)

    python tools/bench_fallback_compile.py --layers 2

Each path runs in its own process with its own, empty Inductor cache directory and the FX graph
cache off (the two paths compile the same routed graph: a shared cache would hide a compile).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch

import liteattn_ops

WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=8960, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--frames", type=int, default=2, help="latent frames (a 16 x 16 latent: 64 tokens each)")
    parser.add_argument("--fallback-first", action="store_true", help="run the fallback path first")
    parser.add_argument("--path", choices=("enabled", "fallback"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.path is None:
        rows = []
        for label in (("fallback", "enabled") if args.fallback_first else ("enabled", "fallback")):
            with tempfile.TemporaryDirectory() as cache:
                env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TORCHINDUCTOR_FX_GRAPH_CACHE="0",
                           TORCHINDUCTOR_AUTOGRAD_CACHE="0")
                out = subprocess.run([sys.executable, __file__, "--layers", str(args.layers), "--frames",
                                      str(args.frames), "--path", label], env=env, capture_output=True, text=True,
                                     check=True).stdout
            rows.append((label, *map(float, out.strip().splitlines()[-1].split())))
        _print(sorted(rows), args)
        return
    import diffusers

    torch.manual_seed(0)
    template = diffusers.WanTransformer3DModel(num_layers=args.layers, **WAN_1_3B).eval()
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(1, 16, args.frames, 16, 16, generator=g), torch.tensor([900]),
              torch.randn(1, 32, 4096, generator=g))
    import copy

    model = copy.deepcopy(template)
    if args.path == "enabled":
        liteattn_ops.enable(model, threshold=-10.0)
    compiled = torch.compile(model, backend="liteattn", fullgraph=True)
    times = []
    with torch.no_grad():
        for _ in range(3):
            start = time.perf_counter()
            compiled(*inputs, return_dict=False)
            times.append(time.perf_counter() - start)
    print(" ".join(f"{t:.3f}" for t in times))


def _print(rows, args) -> None:
    print(f"WanTransformer3DModel, Wan2.1-1.3B config, {args.layers} layers, {args.frames * 64} tokens, "
          f"float32 CPU, torch {torch.__version__}")
    print(f"{'path':10s} {'call 1 (s)':>11s} {'call 2 (s)':>11s} {'call 3 (s)':>11s} {'1+2-2x3 (s)':>12s}")
    for label, a, b, c in rows:
        print(f"{label:10s} {a:11.2f} {b:11.2f} {c:11.2f} {a + b - 2 * c:12.2f}")
    extra = (rows[1][1] + rows[1][2]) - (rows[0][1] + rows[0][2])
    print(f"extra compile time of the fallback path (calls 1+2): {extra:.2f} s")


if __name__ == "__main__":
    main()
