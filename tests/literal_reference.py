"""A literal, loop-by-loop reading of the README's semantics: one (b, h, m) and one tile at a time,
with an online softmax. Independent of liteattn_ops.core.reference (it shares only the range ->
tile helper and the bit packing, which tests/test_state.py pins to the documented layout), and
slow: small shapes only. Used by test_reference.py and test_fuzz.py."""

from __future__ import annotations

import math

import torch

import liteattn_ops
from liteattn_ops.core.reference import range_tiles
from liteattn_ops.core.state import new_state, pack_bits, unpack_bits

LOG2E = math.log2(math.e)


def literal_reference(q, k, v, state, threshold, must_do=None, must_skip=None, scale=None):
    """(out, lse, new_state, visited) for one call; `visited` is bool (B, H, Mt, Nt)."""
    batch, heads, seqlen_q, head_dim = q.shape
    seqlen_k = k.shape[2]
    bm, bn = liteattn_ops.tile_shape(head_dim, q.dtype)
    mt, nt = math.ceil(seqlen_q / bm), math.ceil(seqlen_k / bn)
    scale = 1 / math.sqrt(head_dim) if scale is None else scale
    live = unpack_bits(state, nt)
    do = range_tiles(must_do, seqlen_k, bn, inside=False)
    skip = range_tiles(must_skip, seqlen_k, bn, inside=True) & ~do
    out = torch.zeros(batch, heads, seqlen_q, head_dim)
    lse = torch.full((batch, heads, seqlen_q), -math.inf)
    new_live = live.clone()
    visited_tiles = torch.zeros(batch, heads, mt, nt, dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            for m in range(mt):
                rows = slice(m * bm, min((m + 1) * bm, seqlen_q))
                qm = q[b, h, rows].float()
                row_max = torch.full((qm.shape[0],), -math.inf)       # log2 units
                row_sum = torch.zeros(qm.shape[0])
                acc = torch.zeros(qm.shape[0], head_dim)
                n0 = min(nt - 1, (m * bm * seqlen_k) // (seqlen_q * bn))
                for j in range(nt):
                    n = (n0 + j) % nt
                    visited = (bool(live[b, h, m, n]) or bool(do[n])) and not bool(skip[n])
                    if not visited:
                        new_live[b, h, m, n] = False
                        continue
                    visited_tiles[b, h, m, n] = True
                    cols = slice(n * bn, min((n + 1) * bn, seqlen_k))
                    s = (qm @ k[b, h, cols].float().T) * scale * LOG2E
                    tile_max = s.max(1).values
                    finite = bool(torch.isfinite(tile_max).all()) and bool(torch.isfinite(row_max).all())
                    negligible = finite and bool(((tile_max - row_max) <= threshold[h]).all()) and not bool(do[n])
                    new_max = torch.maximum(row_max, tile_max)
                    correction = torch.exp2(row_max - new_max)
                    p = torch.exp2(s - new_max[:, None])
                    acc = acc * correction[:, None] + p @ v[b, h, cols].float()
                    row_sum = row_sum * correction + p.sum(1)
                    row_max = new_max
                    new_live[b, h, m, n] = not negligible
                nonempty = row_sum > 0
                out[b, h, rows][nonempty] = acc[nonempty] / row_sum[nonempty, None]
                lse[b, h, rows][nonempty] = (row_max[nonempty] + torch.log2(row_sum[nonempty])) / LOG2E
    words = pack_bits(new_live, fill=False)
    tail = ~pack_bits(torch.zeros(nt, dtype=torch.bool), fill=True)  # bits >= Nt keep their old value
    new_state = (words & tail) | (state & ~tail)
    return out, lse, new_state, visited_tiles


def random_state(batch, heads, seqlen_q, seqlen_k, head_dim, live_prob, generator):
    state = new_state(batch, heads, seqlen_q, seqlen_k, head_dim, torch.float32)
    nt = math.ceil(seqlen_k / liteattn_ops.tile_shape(head_dim, torch.float32)[1])
    mask = torch.rand(*state.shape[:3], nt, generator=generator) < live_prob
    return pack_bits(mask)


def masked_attention(q, k, v, visited, scale=None, dtype=torch.float64):
    """Plain attention (in `dtype`) of q over the key tiles marked in `visited` (B, H, Mt, Nt): an
    oracle for "the output is attention over the visited tiles" that knows nothing of the op."""
    batch, heads, seqlen_q, head_dim = q.shape
    seqlen_k = k.shape[2]
    bm, bn = liteattn_ops.tile_shape(head_dim, q.dtype)
    scale = 1 / math.sqrt(head_dim) if scale is None else scale
    allowed = visited.repeat_interleave(bm, 2)[:, :, :seqlen_q].repeat_interleave(bn, 3)[..., :seqlen_k]
    scores = (q.to(dtype) @ k.to(dtype).transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(scores, -1)
    empty = torch.isneginf(lse)
    probs = torch.exp(scores - lse.masked_fill(empty, 0.0)[..., None])
    out = (probs @ v.to(dtype)).masked_fill(empty[..., None], 0.0)
    return out, lse
