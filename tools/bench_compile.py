"""Time a DiT-like stack under the liteattn backend: eager SDPA, eager enable(), torch.compile
(default and mode="reduce-overhead"), and whether CUDA graphs captured the op.

    python tools/bench_compile.py [--seq 4096] [--depth 8] [--steps 10]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import liteattn_ops
from liteattn_ops.demo.timing import cuda_graphs_info


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))

    def forward(self, x):
        b, s, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(y.transpose(1, 2).reshape(b, s, c))
        return x + self.mlp(self.norm2(x))


class Stack(nn.Module):
    def __init__(self, depth, dim, heads):
        super().__init__()
        self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(depth)])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def time_steps(model, x, steps, reset=None) -> float:
    """Median ms per call over `steps` calls (after 3 warm-up calls)."""
    with torch.no_grad():
        for _ in range(3):
            model(x)
        if reset:
            reset()
        times = []
        for _ in range(steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(x)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    torch.manual_seed(0)
    base = Stack(args.depth, args.dim, args.heads).eval().to("cuda", torch.bfloat16)
    x = torch.randn(1, args.seq, args.dim, device="cuda", dtype=torch.bfloat16)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, seq {args.seq}, depth {args.depth}, "
          f"dim {args.dim}, heads {args.heads}")
    print(f"  eager SDPA                          {time_steps(base, x, args.steps):8.3f} ms")
    for thr in (float("-inf"), -6.0):
        model = copy.deepcopy(base)
        liteattn_ops.enable(model, threshold=thr)
        print(f"  eager enable(thr={thr})              {time_steps(model, x, args.steps):8.3f} ms")
        for mode in ("default", "reduce-overhead"):
            torch._dynamo.reset()
            counters.clear()
            model = copy.deepcopy(base)
            liteattn_ops.enable(model, threshold=thr)
            compiled = torch.compile(model, backend="liteattn", mode=mode, fullgraph=True)
            ms = time_steps(compiled, x, args.steps)
            live = [s["live_fraction"] for s in liteattn_ops.stats(model).values() if s["live_fraction"] is not None]
            # cudagraph_skips == 0 also holds when no graph was attempted: count the recorded graphs
            graphs = cuda_graphs_info(torch.device("cuda"), mode)
            print(f"  compiled {mode:16s} thr={thr:5}  {ms:8.3f} ms   rewritten={counters['liteattn']['rewritten']} "
                  f"cudagraph_skips={counters['inductor']['cudagraph_skips']} cuda_graphs_recorded={graphs['recorded']} "
                  f"live={sum(live) / max(len(live), 1):.3f}")
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(base), mode="reduce-overhead", fullgraph=True)
    print(f"  compiled inductor SDPA reduce-overhead {time_steps(compiled, x, args.steps):8.3f} ms")


if __name__ == "__main__":
    start = time.time()
    main()
    print(f"total {time.time() - start:.1f} s")
