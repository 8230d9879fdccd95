"""Calibration-mode attention: one pass over a call's scores gives every visited tile's margin and
the error that any candidate threshold would cause, without one attention call per candidate.

Margin. For a visited KV tile n of query tile m, with r_i the op's running row max before the
tile (in the op's visit order, over the tiles visited before it) and l_i the tile's row max, both
in log2 units, the op removes the tile exactly when max_i (l_i - r_i) <= thr. So

    margin[b, h, m, n] = max over valid rows i of (l_i - r_i)

is the smallest threshold at which this call removes the tile; +inf for tiles this call can never
remove (not visited, the first visited tile, must-do tiles, a tile where some valid row has a
non-finite running or tile max). The arithmetic is the reference's
(float32 scores, the same visit order, the same cumulative max), so `margin <= thr` predicts the
op's decision at `thr` exactly (tests/test_calibration.py checks it against the op).

Error curve. Removing the tiles with margin <= thr from the live set leaves, for each query tile,
the visited tiles minus a prefix of them sorted by margin. With the per-tile partial outputs
T[i, n] = sum_j in tile n exp(s_ij - m_i) v_j and sums Z[i, n], the output after removing the k
smallest-margin tiles is a suffix sum over the sorted tiles; its error against dense attention
(all tiles) is summed per query tile for every k, then looked up at k_m(thr) = #(margin <= thr)
for every candidate threshold. The cost is one score matmul, one per-tile PV product (the FLOPs of
a dense PV) and O(S * Nt * D) more; memory is bounded by processing query tiles in chunks.

Everything is torch on the inputs' device (CPU or CUDA), float32 throughout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..core.reference import first_tile, range_tiles, resolve_scale
from ..core.tiling import num_tiles, tile_shape

_LOG2E = math.log2(math.e)
METRICS = ("l1", "rmse", "cosine")
CRITERIA = ("max", "mass")

# Elements of the largest per-chunk tensor (rows x Nt x D per batch-head); ~64 MB in float32.
CHUNK_ELEMENTS = 1 << 24


def threshold_grid(step: float = 1.0 / 16, lowest: float = -64.0, device=None) -> Tensor:
    """Candidate thresholds, ascending: -inf, then `lowest` .. 0 in steps of `step` (log2 units)."""
    n = int(round(-lowest / step))
    grid = torch.arange(-n, 1, device=device, dtype=torch.float64) * step
    return torch.cat([torch.tensor([-math.inf], device=device, dtype=torch.float64), grid]).float()


@dataclass
class CallAnalysis:
    """What one attention call tells the calibration.

    margin:   float32 (B, H, Mt, Nt): smallest threshold at which this call removes the tile
              (+inf: never, e.g. not visited, first visited, must-do).
    visited:  bool (B, H, Mt, Nt): tiles this call computes.
    err_num:  float32 (B, H, G) (l1, rmse) or (B, H, 2, G) (cosine: dot, squared norm): additive
              error terms of each head's output over the batch element if the tiles with
              margin <= grid[g] were removed; grid[0] = -inf gives the call's own error.
    err_ref:  float32 (B, H): the matching dense-output term (sum |O|, sum O^2).
    out:      float32 (B, H, S_q, D): this call's output over its visited tiles (what the op returns).
    do_tiles, skip_tiles: bool (Nt,): must-do / must-skip tiles (as the op resolves them).
    """

    margin: Tensor
    visited: Tensor
    err_num: Tensor
    err_ref: Tensor
    out: Tensor
    do_tiles: Tensor
    skip_tiles: Tensor
    metric: str


def relative_error(num: Tensor, ref: Tensor, metric: str) -> Tensor:
    """Relative error from additive terms; `num` (..., G) or cosine (..., 2, G), `ref` (...)."""
    tiny = torch.finfo(torch.float32).tiny
    if metric == "l1":
        return num / ref.clamp_min(tiny)[..., None]
    if metric == "rmse":
        return (num / ref.clamp_min(tiny)[..., None]).sqrt()
    dot, sq = num[..., 0, :], num[..., 1, :]
    cos = dot / (sq * ref[..., None]).sqrt().clamp_min(tiny)
    return (1.0 - cos).clamp_min(0.0)


def analyse_call(q: Tensor, k: Tensor, v: Tensor, live: Tensor, *, must_do: Optional[Tensor] = None,
                 must_skip: Optional[Tensor] = None, scale: Optional[float] = None, metric: str = "l1",
                 grid: Optional[Tensor] = None, chunk_elements: int = CHUNK_ELEMENTS,
                 criterion: str = "max", removal_key: Optional[Tensor] = None) -> CallAnalysis:
    """Analyse one call of the stateful op on q, k, v (B, H, S, D) with live set `live` (bool
    (B, H, Mt, Nt), the state before the call). See the module docstring.

    criterion "max" is the op's rule. "mass" is the error-aware prototype (not in the op): the
    tiles removed at `thr` are, per query tile, the longest prefix of the removable tiles sorted by
    their worst-row softmax mass w_n = max_i Z_in / Z_i (Z_i: the row's sum over the visited tiles)
    whose masses add up to <= 2^thr; `margin` is then the smallest thr that removes the tile.

    removal_key: float (B, H, Mt, Nt) or None. None: the error curve is that of removing, on top of
    what is already gone, the tiles with margin <= grid[g] (this call's margins). Given, it is that
    of removing the visited tiles with removal_key <= grid[g] instead (must-do tiles never). The
    calibration's profile pass uses it on a dense trajectory with removal_key = the running minimum
    of each tile's margins over the site's earlier calls: a tile is gone at this call under a
    uniform threshold thr exactly when some earlier call's margin was <= thr, so the curve is then
    the error this call has under every candidate threshold with the skips accumulated."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    batch, heads, seqlen_q, head_dim = q.shape
    seqlen_k = k.shape[2]
    block_m, block_n = tile_shape(head_dim, q.dtype)
    m_tiles, n_tiles = num_tiles(seqlen_q, block_m), num_tiles(seqlen_k, block_n)
    if tuple(live.shape) != (batch, heads, m_tiles, n_tiles):
        raise ValueError(f"live must have shape {(batch, heads, m_tiles, n_tiles)}, got {tuple(live.shape)}")
    if removal_key is not None and tuple(removal_key.shape) != (batch, heads, m_tiles, n_tiles):
        raise ValueError(f"removal_key must have shape {(batch, heads, m_tiles, n_tiles)}, got {tuple(removal_key.shape)}")
    scale = resolve_scale(scale, head_dim)
    device = q.device
    grid = threshold_grid(device=device) if grid is None else grid.to(device=device, dtype=torch.float32)
    if grid.dim() != 1 or bool((grid > 0).any()) or bool((grid[1:] < grid[:-1]).any()):
        raise ValueError("grid must be a 1-D ascending tensor of candidate thresholds <= 0")
    n_grid = grid.shape[0]

    do_tiles = range_tiles(must_do, seqlen_k, block_n, inside=False).to(device)
    skip_tiles = range_tiles(must_skip, seqlen_k, block_n, inside=True).to(device) & ~do_tiles
    visited = (live.to(device) | do_tiles) & ~skip_tiles
    order = (first_tile(block_m, block_n, seqlen_q, seqlen_k, device)[:, None]
             + torch.arange(n_tiles, device=device)) % n_tiles                      # (Mt, Nt)

    qf, kf, vf = q.float(), k.float(), v.float()
    pad_k = n_tiles * block_n - seqlen_k
    vt = torch.nn.functional.pad(vf, (0, 0, 0, pad_k)).view(batch, heads, n_tiles, block_n, head_dim)

    margin = torch.full((batch, heads, m_tiles, n_tiles), math.inf, device=device)
    out = torch.empty(batch, heads, seqlen_q, head_dim, device=device)
    cos = metric == "cosine"
    err_num = torch.zeros((batch, heads, 2, n_grid) if cos else (batch, heads, n_grid), device=device)
    err_ref = torch.zeros(batch, heads, device=device)

    # Whole query tiles per chunk; the largest tensor is (B, H, rows, Nt, D).
    per_row = batch * heads * max(seqlen_k + n_tiles, (n_tiles + 1) * head_dim)
    tiles_per_chunk = max(1, chunk_elements // max(1, per_row * block_m))
    for m0 in range(0, m_tiles, tiles_per_chunk):
        m1 = min(m_tiles, m0 + tiles_per_chunk)
        row0, row1 = m0 * block_m, min(seqlen_q, m1 * block_m)
        rows, mc = row1 - row0, m1 - m0
        tile_of_row = torch.arange(row0, row1, device=device) // block_m             # absolute m
        local = tile_of_row - m0

        # Scores exactly as the reference computes them (natural units, float32).
        scores = torch.matmul(qf[:, :, row0:row1] * scale, kf.transpose(-1, -2))
        if pad_k:
            scores = torch.nn.functional.pad(scores, (0, pad_k), value=-math.inf)
        tiles = scores.view(batch, heads, rows, n_tiles, block_n)
        vis_rows = visited[:, :, tile_of_row]                                         # (B, H, rows, Nt)
        tile_max = tiles.amax(-1)                                                     # all tiles
        tile_max_vis = tile_max.masked_fill(~vis_rows, -math.inf)

        # Margins: the op's running max in visit order.
        order_rows = order[tile_of_row].expand(batch, heads, -1, -1)
        in_order = torch.gather(tile_max_vis, -1, order_rows) * _LOG2E
        running = torch.cummax(in_order, dim=-1).values
        before = torch.nn.functional.pad(running[..., :-1], (1, 0), value=-math.inf)
        # A row with a non-finite running or tile max never vouches for "negligible" (the op's rule).
        diff = torch.where(torch.isfinite(in_order) & torch.isfinite(before), in_order - before, math.inf)
        diff = torch.empty_like(diff).scatter_(-1, order_rows, diff)
        padded = torch.full((batch, heads, mc * block_m, n_tiles), -math.inf, device=device)
        padded[:, :, :rows] = diff                                                    # rows past S_q: -inf
        chunk_margin = padded.view(batch, heads, mc, block_m, n_tiles).amax(3)
        removable = visited[:, :, m0:m1] & ~do_tiles
        chunk_margin = chunk_margin.masked_fill(~removable, math.inf)

        # Per-tile partial outputs with the dense row max (unvisited tiles are in the dense output).
        row_max = tile_max.amax(-1, keepdim=True)                                     # (B, H, rows, 1)
        probs = (tiles - row_max[..., None]).exp_()                                   # (B, H, rows, Nt, BN)
        z = probs.sum(-1)                                                             # (B, H, rows, Nt)
        part = torch.matmul(probs.permute(0, 1, 3, 2, 4), vt).permute(0, 1, 3, 2, 4)  # (B, H, rows, Nt, D)
        del probs, scores, tiles
        dense = part.sum(3) / z.sum(3, keepdim=True)                                  # (B, H, rows, D)
        if criterion == "mass":
            # (the max test's never-removed tiles, e.g. the first visited one, stay so here)
            chunk_margin = _mass_cost(z, vis_rows, torch.isfinite(chunk_margin), local, mc)
        margin[:, :, m0:m1] = chunk_margin
        if removal_key is None:
            chunk_key = chunk_margin
        else:
            chunk_key = removal_key[:, :, m0:m1].to(device=device, dtype=torch.float32).masked_fill(~removable, math.inf)

        # Visited tiles sorted by key (the margin), largest first (the never-removed +inf ones lead):
        # the output after removing the k smallest-key tiles is a prefix sum over the first Nt - k
        # of them. No allowed threshold exceeds 0, so only k <= k_max (the most keys <= 0 of any
        # query tile of the chunk) is ever looked up.
        desc_margin, idx = chunk_key.sort(-1, descending=True)                        # (B, H, mc, Nt)
        sorted_margin = desc_margin.flip(-1)                                          # ascending
        k_max = int((chunk_key <= 0).sum(-1).max())
        idx_rows = idx[:, :, local]                                                   # (B, H, rows, Nt)
        vis_f = vis_rows.float()
        z_sorted = torch.gather(z * vis_f, -1, idx_rows)
        part_sorted = torch.gather(part * vis_f[..., None], 3, idx_rows[..., None].expand(-1, -1, -1, -1, head_dim))
        del part
        first = n_tiles - 1 - k_max            # prefix lengths first+1 .. Nt, i.e. k = k_max .. 0
        z_cum = torch.cumsum(z_sorted, -1)[..., first:].flip(-1)                      # (B, H, rows, k_max + 1)
        part_cum = torch.cumsum(part_sorted, 3)[:, :, :, first:].flip(3)             # (B, H, rows, k_max + 1, D)
        del part_sorted
        empty = z_cum <= 0
        kept = part_cum.div_(z_cum.masked_fill(empty, 1.0)[..., None])               # k = 0 .. k_max
        kept.masked_fill_(empty[..., None], 0.0)                                      # no visited tile: 0
        out[:, :, row0:row1] = kept[:, :, :, 0]

        if cos:
            terms = torch.stack([(kept * dense[:, :, :, None]).sum(-1), kept.square().sum(-1)], 2)
            ref_rows = dense.square().sum(-1)
        elif metric == "l1":
            terms = (kept - dense[:, :, :, None]).abs_().sum(-1)[:, :, None]          # (B, H, 1, rows, k_max+1)
            ref_rows = dense.abs().sum(-1)
        else:
            terms = (kept - dense[:, :, :, None]).square_().sum(-1)[:, :, None]
            ref_rows = dense.square().sum(-1)
        del kept
        # Sum the rows of each query tile: (B, H, T, mc, k_max + 1).
        per_tile = torch.zeros(*terms.shape[:3], mc, k_max + 1, device=device)
        per_tile.index_add_(3, local, terms)
        err_ref += ref_rows.sum(-1)

        # For each candidate threshold, how many tiles each query tile removes.
        counts = torch.searchsorted(sorted_margin.contiguous(),
                                    grid.expand(batch, heads, mc, n_grid).contiguous(), right=True)
        looked_up = torch.gather(per_tile, 4, counts[:, :, None].expand(-1, -1, per_tile.shape[2], -1, -1))
        chunk_err = looked_up.sum(3)                                                  # (B, H, T, G)
        err_num += chunk_err if cos else chunk_err[:, :, 0]

    return CallAnalysis(margin=margin, visited=visited, err_num=err_num, err_ref=err_ref, out=out,
                        do_tiles=do_tiles, skip_tiles=skip_tiles, metric=metric)


def _mass_cost(z: Tensor, vis_rows: Tensor, removable: Tensor, local: Tensor, mc: int) -> Tensor:
    """Prototype criterion: log2 of the cumulative worst-row mass at each removable tile's place in
    the ascending order of worst-row masses (+inf for tiles that are not removable)."""
    batch, heads, rows, n_tiles = z.shape
    zv = z * vis_rows
    mass = zv / zv.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)    # (B, H, rows, Nt)
    worst = torch.zeros(batch, heads, mc, n_tiles, device=z.device)
    worst.scatter_reduce_(2, local.view(1, 1, -1, 1).expand_as(mass), mass, reduce="amax")
    worst = worst.masked_fill(~removable, math.inf)
    order = worst.sort(-1)
    cost = torch.cumsum(order.values.masked_fill(torch.isinf(order.values), 0.0), -1).log2()
    cost = cost.masked_fill(torch.isinf(order.values), math.inf)
    return torch.empty_like(cost).scatter_(-1, order.indices, cost)


def removed_tiles(analysis: CallAnalysis, threshold: Tensor) -> Tensor:
    """bool (B, H, Mt, Nt): the tiles the op removes at this call with per-head `threshold` (H,)."""
    thr = threshold.to(device=analysis.margin.device, dtype=torch.float32).view(1, -1, 1, 1)
    return analysis.margin <= thr


def next_live(live: Tensor, analysis: CallAnalysis, threshold: Tensor) -> Tensor:
    """The live set after the call, as the op updates its state: (live | do) & ~(removed | skip)."""
    return (live | analysis.do_tiles) & ~(removed_tiles(analysis, threshold) | analysis.skip_tiles)
