"""The CPU reference against plain attention and against a literal, loop-by-loop reading of the
semantics in the README (small shapes only)."""

import math

import pytest
import torch
import torch.nn.functional as F

import liteattn_ops
from liteattn_ops.core.reference import first_tile, range_tiles, sparse_attention_reference
from liteattn_ops.core.state import new_state, pack_bits, unpack_bits
from liteattn_ops.testing import local_qkv

LOG2E = math.log2(math.e)


def literal_reference(q, k, v, state, threshold, must_do=None, must_skip=None, scale=None):
    """The semantics, one (b, h, m) and one tile at a time, with an online softmax."""
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
                    cols = slice(n * bn, min((n + 1) * bn, seqlen_k))
                    s = (qm @ k[b, h, cols].float().T) * scale * LOG2E
                    tile_max = s.max(1).values
                    negligible = bool(((tile_max - row_max) <= threshold[h]).all()) and not bool(do[n])
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
    return out, lse, new_state


def random_state(batch, heads, seqlen_q, seqlen_k, head_dim, live_prob, generator):
    state = new_state(batch, heads, seqlen_q, seqlen_k, head_dim, torch.float32)
    nt = math.ceil(seqlen_k / liteattn_ops.tile_shape(head_dim, torch.float32)[1])
    mask = torch.rand(*state.shape[:3], nt, generator=generator) < live_prob
    return pack_bits(mask)


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(1, 1), (7, 7), (127, 127), (128, 128), (129, 129),
                                               (300, 300), (200, 520), (520, 130)])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_dense_equals_sdpa(seqlen_q, seqlen_k, head_dim):
    g = torch.Generator().manual_seed(seqlen_q * 1000 + seqlen_k + head_dim)
    q = torch.randn(2, 3, seqlen_q, head_dim, generator=g)
    k, v = (torch.randn(2, 3, seqlen_k, head_dim, generator=g) for _ in range(2))
    state = new_state(2, 3, seqlen_q, seqlen_k, head_dim, torch.float32)
    out, lse, after = sparse_attention_reference(q, k, v, state, torch.full((3,), -math.inf))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse, torch.logsumexp(q @ k.transpose(-1, -2) / math.sqrt(head_dim), -1))
    assert torch.equal(after, state)
    assert out.stride() == torch.empty(2, seqlen_q, 3, head_dim).transpose(1, 2).stride()


@pytest.mark.parametrize("case", range(12))
def test_matches_literal_semantics(case):
    """Random states, thresholds per head, ranges and shapes: decisions, output and lse agree."""
    g = torch.Generator().manual_seed(case)
    head_dim = (64, 128)[case % 2]
    seqlen_q = int(torch.randint(1, 1100, (1,), generator=g))
    seqlen_k = seqlen_q if case % 3 else int(torch.randint(1, 1100, (1,), generator=g))
    batch, heads = 1 + case % 2, 2
    q, k, v = local_qkv((1, 1, max(seqlen_q, seqlen_k)), batch, heads, head_dim, length_scale=12.0,
                        sharpness=24.0, generator=g)
    q, k, v = q[:, :, :seqlen_q], k[:, :, :seqlen_k], v[:, :, :seqlen_k]
    state = random_state(batch, heads, seqlen_q, seqlen_k, head_dim, 0.8, g)
    threshold = torch.tensor([-1.0, -4.0]) if case % 4 else torch.tensor([-math.inf, -2.0])
    must_do = torch.tensor([[0, 3]]) if case % 5 == 1 else None
    must_skip = torch.tensor([[128, 256], [300, 310]]) if case % 3 == 2 and seqlen_k > 256 else None
    got = sparse_attention_reference(q, k, v, state, threshold, must_do, must_skip)
    want = literal_reference(q, k, v, state, threshold, must_do, must_skip)
    removed_by_case[case] = int((unpack_bits(state, 64) & ~unpack_bits(got[2], 64)).sum())
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    assert torch.equal(got[2], want[2])


removed_by_case: dict[int, int] = {}


def test_literal_cases_remove_tiles():
    """The cases above are only a strong check if they do remove tiles."""
    if len(removed_by_case) < 12:
        pytest.skip("run with the whole file")
    assert sum(removed_by_case.values()) > 50 and sum(v > 0 for v in removed_by_case.values()) >= 8


def test_visit_order_starts_at_diagonal():
    assert first_tile(128, 128, 1000, 1000).tolist() == list(range(8))
    assert first_tile(128, 128, 256, 1024).tolist() == [0, 4]       # cross-attention: proportional
    assert first_tile(128, 128, 1024, 100).tolist() == [0] * 8


def test_range_tiles():
    r = torch.tensor([[100, 130], [512, 640]])
    assert range_tiles(r, 700, 128, inside=False).tolist() == [True, True, False, False, True, False]
    assert range_tiles(r, 700, 128, inside=True).tolist() == [False, False, False, False, True, False]
    # the partial last tile [640, 700) is inside [600, 700)
    assert range_tiles(torch.tensor([[600, 700]]), 700, 128, inside=True).tolist()[-1] is True
    assert not range_tiles(None, 700, 128, inside=True).any()


def test_rows_without_visited_tiles_give_zero_and_minus_inf():
    q, k, v = (torch.randn(1, 1, 200, 64) for _ in range(3))
    state = torch.zeros(1, 1, 2, 1, dtype=torch.int32)
    out, lse, after = sparse_attention_reference(q, k, v, state, torch.tensor([-5.0]))
    assert torch.equal(out, torch.zeros_like(out)) and bool(torch.isneginf(lse).all())
    assert torch.equal(after, state)


def test_huge_scores_in_skipped_tiles_do_not_overflow():
    """Keys of a must-skip tile score ~1000 nats above the rest: the output ignores them, no NaN."""
    q = torch.ones(1, 1, 256, 64)
    k = torch.randn(1, 1, 256, 64) * 0.01
    k[:, :, 128:] = 150.0
    v = torch.randn(1, 1, 256, 64)
    state = new_state(1, 1, 256, 256, 64, torch.float32)
    out, lse, _ = sparse_attention_reference(q, k, v, state, torch.tensor([-5.0]), must_skip=torch.tensor([[128, 256]]))
    assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(lse).all())
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q[..., :, :], k[:, :, :128], v[:, :, :128]))
