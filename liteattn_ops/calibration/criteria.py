"""The error-aware criterion against the max test, on the same inputs, at equal error.

    python -m liteattn_ops.calibration.criteria          # local 3-D-grid inputs, sharp and broad heads

For one call from a fresh state (every tile live), each criterion's threshold is calibrated per
head exactly as `calibrate` does (the largest candidate whose error, and every smaller one's, is
within the budget); the table gives the fraction of tiles each leaves live. "max" is the op's test;
"mass" the prototype of `margins.analyse_call(criterion="mass")`: per query tile, remove the tiles
of smallest worst-row softmax mass while their masses add up to <= 2^thr. The trajectory version
(a whole generation of the demo DiT) is `python -m liteattn_ops.calibration --criterion mass --compare`.

The measurement of calibration against uniform thresholds on the demo DiT (BENCHMARKS.md,
"Calibration") is `python -m liteattn_ops.calibration --compare --budget 0.01,0.03,0.1 [--device cuda]`.
"""

from __future__ import annotations

import argparse
import math

import torch

from ..core.tiling import tile_shape
from .margins import analyse_call, relative_error, threshold_grid


def live_at_budget(q, k, v, budgets, *, metric="l1", criterion="max") -> list[dict]:
    """Per budget: per-head calibrated threshold, live fraction after the call, and error."""
    grid = threshold_grid(device=q.device)
    batch, heads = q.shape[:2]
    bm, bn = tile_shape(q.shape[-1], q.dtype)
    live = torch.ones(batch, heads, math.ceil(q.shape[2] / bm), math.ceil(k.shape[2] / bn), dtype=torch.bool,
                      device=q.device)
    a = analyse_call(q, k, v, live, metric=metric, criterion=criterion, grid=grid)
    rel = relative_error(a.err_num, a.err_ref, metric).amax(0)                     # (H, G)
    envelope = torch.cummax(rel, -1).values
    rows = []
    for budget in budgets:
        idx = (envelope <= budget).sum(-1) - 1
        thr = torch.where(idx >= 0, grid[idx.clamp_min(0)], -math.inf)
        removed = a.margin <= thr.view(1, -1, 1, 1)
        rows.append({"budget": budget, "threshold": thr.tolist(),
                     "live": (1 - removed.float().mean((0, 2, 3))).tolist(),
                     "error": rel.gather(-1, idx.clamp_min(0)[:, None]).squeeze(-1).tolist()})
    return rows


def main(argv=None) -> int:
    from ..testing import local_qkv

    p = argparse.ArgumentParser(prog="python -m liteattn_ops.calibration.criteria")
    p.add_argument("--grid", default="8,16,32", help="frames,height,width of the token grid")
    p.add_argument("--budgets", default="0.01,0.03,0.1")
    p.add_argument("--metric", default="l1")
    p.add_argument("--device", default="cpu", help="where the inputs and the analysis live (cpu, cuda)")
    args = p.parse_args(argv)
    grid = tuple(int(x) for x in args.grid.split(","))
    budgets = [float(b) for b in args.budgets.split(",")]
    print(f"| inputs | budget | max test: threshold, live | mass: threshold, live | live ratio max/mass |")
    print("|---|---|---|---|---|")
    for sharp in (30.0, 15.0, 8.0):
        g = torch.Generator().manual_seed(0)
        q, k, v = local_qkv(grid, batch=1, heads=2, head_dim=64, sharpness=sharp, generator=g, device=args.device)
        res = {c: live_at_budget(q, k, v, budgets, metric=args.metric, criterion=c) for c in ("max", "mass")}
        for i, budget in enumerate(budgets):
            mx, ms = res["max"][i], res["mass"][i]
            lm, ls = sum(mx["live"]) / 2, sum(ms["live"]) / 2
            print(f"| {q.shape[2]} tokens, sharpness {sharp:g} | {budget:g} | "
                  f"{', '.join(f'{t:.2f}' for t in mx['threshold'])}; {lm:.3f} | "
                  f"{', '.join(f'{t:.2f}' for t in ms['threshold'])}; {ls:.3f} | {lm / ls:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
