"""Exact reference of the LiteAttention semantics, in float32 torch ops (any device).

It is the CPU implementation of the op and the oracle the CUDA kernel is tested against. One call,
for each (b, h, query tile m):

1. visited = (live | do_tiles) & ~skip_tiles, where do_tiles overlap a must-do key range and
   skip_tiles lie entirely inside a must-skip key range (must-do wins).
2. Visited tiles are taken in a fixed order: start at n0 = min(Nt-1, m*BM*S_k // (S_q*BN)) (the
   diagonal tile for self-attention), then n0+1, ..., Nt-1, 0, ..., n0-1.
3. A visited tile is negligible when, for every valid query row i, its row max l_i and the
   running max r_i of the tiles visited before it are both finite and l_i - r_i <= thr[h] (both
   in log2 units: score * scale * log2(e)). A tile where any valid row has a non-finite r_i or l_i
   (+-inf or NaN) is never negligible; so the first visited tile (r_i = -inf) never is, and
   must-do tiles never are.
4. The output and the log-sum-exp cover every visited tile. Rows with no visited tile give
   output 0 and lse -inf.
5. New state words: (old | do_bits) & ~(negligible_bits | skip_bits); bits >= Nt unchanged.
6. use_int8=True (INT8 Q/K mode): the scores, in log2 units, are the int8 ones of
   liteattn_ops.core.quant (q per BM-row block, k smoothed by its per-channel mean then per BN-row
   block, int32 dot products times q_scale * k_scale * scale_log2); steps 1-5 apply to them
   unchanged, with exp2 for the softmax. The lse is the true one: the smoothing removes the
   per-row constant scale * q_i . mu from the scores, which softmax ignores, so it is added back,
   as the kernel does: lse = ln2 * ((row max + log2(row sum)) + q_mu_i * scale_log2), float32, with
   q_mu = quant.query_mean_dots(q, mu) (the pre-pass's summation order); rows with no visited tile
   keep lse -inf. v, the probabilities and the output are not quantized.

Nothing here loops over tiles: the running max in visit order is a cumulative max over a rotated
tile axis. Query rows are processed in chunks only to bound memory.
"""

from __future__ import annotations

import math

import torch

from . import quant
from .state import pack_bits, unpack_bits
from .tiling import num_tiles, tile_shape

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
_CHUNK_ELEMENTS = 1 << 24  # scores held at once (B*H*rows*S_k), ~64 MB in float32


def range_tiles(ranges: torch.Tensor | None, seqlen_k: int, block_n: int, *, inside: bool) -> torch.Tensor:
    """bool (Nt,): tiles overlapping any [start, end) key range (inside=False) or lying entirely
    inside one (inside=True). Empty ranges (end <= start) select nothing."""
    n_tiles = num_tiles(seqlen_k, block_n)
    device = ranges.device if ranges is not None else None
    if ranges is None or ranges.shape[0] == 0:
        return torch.zeros(n_tiles, dtype=torch.bool, device=device)
    lo = torch.arange(n_tiles, device=device, dtype=torch.int64) * block_n
    hi = torch.clamp(lo + block_n, max=seqlen_k)
    start, end = ranges[:, :1].long(), ranges[:, 1:].long()
    if inside:
        hit = (start <= lo) & (hi <= end)
    else:
        hit = (lo < end) & (hi > start) & (start < end)
    return hit.any(0)


def resolve_scale(scale, head_dim: int) -> float:
    """The softmax scale of a call: `scale`, or 1/sqrt(head_dim) when it is None (as SDPA)."""
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def first_tile(block_m: int, block_n: int, seqlen_q: int, seqlen_k: int, device=None) -> torch.Tensor:
    """n0 for every query tile m: where the visit order of that query tile starts."""
    m = torch.arange(num_tiles(seqlen_q, block_m), device=device, dtype=torch.int64)
    n_tiles = num_tiles(seqlen_k, block_n)
    return torch.clamp((m * block_m * seqlen_k) // (seqlen_q * block_n), max=n_tiles - 1)


def sparse_attention_reference(q, k, v, state, threshold, must_do=None, must_skip=None, scale=None,
                               use_int8=False, int8_mean=None):
    """Returns (out, lse, new_state); does not modify `state`. use_int8: the INT8 Q/K mode's scores;
    int8_mean: the smoothing mean to quantize with instead of k's (quant.quantize_qk's `mu`).

    out: q.dtype, logical (B, H, S_q, D) in (B, S_q, H, D) memory; lse: float32 (B, H, S_q), natural log.
    """
    batch, heads, seqlen_q, head_dim = q.shape
    seqlen_k = k.shape[2]
    block_m, block_n = tile_shape(head_dim, q.dtype)
    m_tiles, n_tiles = num_tiles(seqlen_q, block_m), num_tiles(seqlen_k, block_n)
    scale = resolve_scale(scale, head_dim)
    device = q.device

    do_tiles = range_tiles(must_do, seqlen_k, block_n, inside=False).to(device)
    skip_tiles = range_tiles(must_skip, seqlen_k, block_n, inside=True).to(device) & ~do_tiles
    live = unpack_bits(state, n_tiles)                                   # (B, H, Mt, Nt)
    visited = (live | do_tiles) & ~skip_tiles

    # Visit order: position j of query tile m holds tile (n0[m] + j) % Nt.
    order = (first_tile(block_m, block_n, seqlen_q, seqlen_k, device)[:, None]
             + torch.arange(n_tiles, device=device)) % n_tiles            # (Mt, Nt)
    thr = threshold.to(device=device, dtype=torch.float32).view(1, heads, 1, 1)

    if use_int8:
        quantized = quant.quantize_qk(q, k, (block_m, block_n), mu=int8_mean)
        keys = quant.padded_keys(quantized.k8, block_n)
        # The LSE correction in log2 units, one float32 multiply (fwd_kernel.cuh: q_mu * scale_log2).
        lse_bias_log2 = quant.query_mean_dots(q, quantized.mu) * torch.tensor(
            quant.scale_log2(scale), dtype=torch.float32, device=device)
        qf = kf = None
    else:
        qf, kf = q.float(), k.float()
    vf = v.float()
    out = torch.empty(batch, seqlen_q, heads, head_dim, dtype=q.dtype, device=device).transpose(1, 2)
    lse = torch.empty(batch, heads, seqlen_q, dtype=torch.float32, device=device)
    negligible = torch.zeros_like(visited)

    rows_per_chunk = max(block_m, _CHUNK_ELEMENTS // max(1, batch * heads * seqlen_k) // block_m * block_m)
    pad_k = n_tiles * block_n - seqlen_k
    for row0 in range(0, seqlen_q, rows_per_chunk):
        row1 = min(seqlen_q, row0 + rows_per_chunk)
        m0, m1 = row0 // block_m, num_tiles(row1, block_m)
        tile_of_row = torch.arange(row0, row1, device=device) // block_m      # (rows,)

        rows = row1 - row0
        if use_int8:   # log2 units, key axis already padded to whole tiles
            scores = quant.tile_scores(quantized, scale, (block_m, block_n), row0, row1, keys)
        else:          # natural units
            scores = torch.matmul(qf[:, :, row0:row1] * scale, kf.transpose(-1, -2))
            if pad_k:
                scores = torch.nn.functional.pad(scores, (0, pad_k), value=-math.inf)
        tiles = scores.view(batch, heads, rows, n_tiles, block_n)                    # a view, no copy
        vis_rows = visited[:, :, tile_of_row]                                         # (B, H, rows, Nt)

        # Per-row tile maxima, unvisited tiles at -inf (in the units of the scores).
        tile_max = tiles.amax(-1).masked_fill_(~vis_rows, -math.inf)

        # Running max (log2 units) before each tile, in visit order.
        order_rows = order[tile_of_row].expand(batch, heads, -1, -1)
        in_order = torch.gather(tile_max, -1, order_rows)
        if not use_int8:
            in_order = in_order * _LOG2E
        running = torch.cummax(in_order, dim=-1).values
        before = torch.nn.functional.pad(running[..., :-1], (1, 0), value=-math.inf)
        # A row vouches for "negligible" only with a finite running max and tile max: an inf or NaN
        # score (e.g. an inf key) must not make later tiles look negligible for good.
        row_negligible_ordered = torch.isfinite(in_order) & torch.isfinite(before) & ((in_order - before) <= thr)
        row_negligible = torch.empty_like(row_negligible_ordered).scatter_(-1, order_rows, row_negligible_ordered)

        # A tile is negligible when every valid row of its query tile says so.
        per_tile = torch.ones(batch, heads, (m1 - m0) * block_m, n_tiles, dtype=torch.bool, device=device)
        per_tile[:, :, row0 - m0 * block_m: row1 - m0 * block_m] = row_negligible
        negligible[:, :, m0:m1] |= per_tile.view(batch, heads, m1 - m0, block_m, n_tiles).all(3)

        # Softmax over the visited tiles, in place on the scores (unvisited tiles masked before the exp,
        # so a huge score there cannot overflow).
        row_max = tile_max.amax(-1)                                                   # (B, H, rows)
        empty = torch.isneginf(row_max)
        row_max = row_max.masked_fill(empty, 0.0)
        tiles.masked_fill_(~vis_rows[..., None], -math.inf).sub_(row_max[..., None, None])
        if use_int8:
            tiles.exp2_()
        else:
            tiles.exp_()
        row_sum = tiles.sum(dim=(-1, -2))
        probs = scores[..., :seqlen_k] if pad_k else scores
        chunk_out = torch.matmul(probs, vf) / row_sum.clamp_min(torch.finfo(torch.float32).tiny)[..., None]
        out[:, :, row0:row1] = chunk_out.masked_fill(empty[..., None], 0.0).to(q.dtype)   # empty rows -> 0
        if use_int8:   # epilogue.cuh: (row_max + log2(sum) + q_mu * scale_log2) * ln2, float32
            chunk_lse = (row_max + torch.log2(row_sum) + lse_bias_log2[:, :, row0:row1]) * _LN2
        else:
            chunk_lse = row_max + torch.log(row_sum)
        lse[:, :, row0:row1] = chunk_lse.masked_fill(empty, -math.inf)

    negligible &= visited & ~do_tiles
    cleared = pack_bits(negligible | skip_tiles, fill=False)
    new_state = torch.bitwise_and(torch.bitwise_or(state, pack_bits(do_tiles, fill=False)), torch.bitwise_not(cleared))
    return out, lse, new_state


def attention_reference(q, k, v, scale=None, use_int8=False):
    """Dense attention with the op's output conventions: (out, lse). use_int8: INT8 Q/K scores."""
    from .state import new_state

    batch, heads, seqlen_q, head_dim = q.shape
    state = new_state(batch, heads, seqlen_q, k.shape[2], head_dim, q.dtype, q.device)
    threshold = torch.full((heads,), -math.inf, device=q.device)
    out, lse, _ = sparse_attention_reference(q, k, v, state, threshold, scale=scale, use_int8=use_int8)
    return out, lse
