"""The CPU reference against plain attention and against a literal, loop-by-loop reading of the
semantics in the README (small shapes only)."""

import math

import pytest
import torch
import torch.nn.functional as F

import liteattn_ops
from liteattn_ops.core.reference import first_tile, range_tiles, sparse_attention_reference
from liteattn_ops.core.tiling import tile_shape
from liteattn_ops.core.state import new_state, pack_bits, unpack_bits
from liteattn_ops.testing import assert_lse_close, local_qkv

from literal_reference import literal_reference, masked_attention, random_state


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


N_LITERAL_CASES = 12


def literal_case(case):
    """Inputs of one literal case: random states, thresholds per head, ranges and shapes."""
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
    return q, k, v, state, threshold, must_do, must_skip


@pytest.mark.parametrize("case", range(N_LITERAL_CASES))
def test_matches_literal_semantics(case):
    """Decisions, output and lse of the vectorised reference agree with the literal loops."""
    args = literal_case(case)
    got = sparse_attention_reference(*args)
    want = literal_reference(*args)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    assert torch.equal(got[2], want[2])


def test_literal_cases_remove_tiles():
    """The literal cases are only a strong check if they do remove tiles (computed here, on its
    own, with the vectorised reference: no dependence on which other tests ran)."""
    removed = []
    for case in range(N_LITERAL_CASES):
        q, k, v, state, threshold, must_do, must_skip = literal_case(case)
        after = sparse_attention_reference(q, k, v, state, threshold, must_do, must_skip)[2]
        removed.append(int((unpack_bits(state, 64) & ~unpack_bits(after, 64)).sum()))
    assert sum(removed) > 50 and sum(r > 0 for r in removed) >= 8, removed


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


def test_must_do_wins_over_must_skip():
    """A tile inside a must-skip range that also overlaps a must-do range is visited and stays
    live; the must-skip tile next to it is not visited. Oracle: masked float64 attention."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 384, 64, generator=g) for _ in range(3))
    state = new_state(1, 2, 384, 384, 64, torch.float32)
    must_do, must_skip = torch.tensor([[100, 101]]), torch.tensor([[0, 256]])   # tile 0: both; tile 1: skip
    out, lse, after = sparse_attention_reference(q, k, v, state, torch.full((2,), -math.inf), must_do, must_skip)
    m_tiles = math.ceil(384 / tile_shape(64, torch.float32)[0])
    visited = torch.tensor([True, False, True]).expand(1, 2, m_tiles, 3)
    assert torch.equal(unpack_bits(after, 3), visited)
    want_out, want_lse = masked_attention(q, k, v, visited)
    torch.testing.assert_close(out, want_out.float(), atol=1e-5, rtol=1e-4)
    assert_lse_close(lse, want_lse, atol=1e-5)


def test_non_finite_scores_never_make_a_tile_negligible():
    """The rule for +-inf / NaN scores (README, Semantics 3): a tile where a valid row has a
    non-finite running max or tile max is never negligible. q >= 0 and one +inf key put +inf into
    every row's scores of that tile, so the running max is +inf for every tile visited after it:
    none of those may be dropped (before the rule, l - r = -inf <= thr dropped them all)."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 640, 64, generator=g) for _ in range(3))
    q = q.abs()
    k[:, :, 5] = math.inf                   # in tile 0
    state = new_state(1, 2, 640, 640, 64, torch.float32)
    threshold = torch.full((2,), -8.0)
    _, _, after = sparse_attention_reference(q, k, v, state, threshold)
    bm, bn = tile_shape(64, torch.float32)
    nt = 640 // bn
    live = unpack_bits(after, nt)
    n0 = first_tile(bm, bn, 640, 640).tolist()
    for m in range(math.ceil(640 / bm)):
        order = [(n0[m] + j) % nt for j in range(nt)]
        assert bool(live[:, :, m, order[order.index(0):]].all()), f"query tile {m}: a tile after the +inf key was dropped"
    assert torch.equal(after, literal_reference(q, k, v, state, threshold)[2])
    # NaN scores: the same rule, in both implementations.
    k2 = k.clone()
    k2[:, :, 5] = 0.0
    k2[:, 1, 400] = math.nan
    state2 = new_state(1, 2, 640, 640, 64, torch.float32)
    got = sparse_attention_reference(q, k2, v, state2, torch.full((2,), 0.0))[2]
    assert torch.equal(got, literal_reference(q, k2, v, state2, torch.full((2,), 0.0))[2])
    assert bool(unpack_bits(got, 5)[:, 1, :, 3].all()), "the tile with a NaN key was dropped"


def test_lse_check_catches_one_missing_tile_of_32():
    """The LSE comparison used by the op tests is tight enough to see one key tile of 32 missing."""
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 2, 128, 64, generator=g)
    k, v = (torch.randn(1, 2, 32 * 128, 64, generator=g) for _ in range(2))
    state = new_state(1, 2, 128, 32 * 128, 64, torch.float32)
    thr = torch.full((2,), -math.inf)
    _, full = sparse_attention_reference(q, k, v, state, thr)[:2]
    _, missing = sparse_attention_reference(q, k, v, state, thr, must_skip=torch.tensor([[1280, 1408]]))[:2]
    assert_lse_close(full, full.clone())
    with pytest.raises(AssertionError, match="lse differs"):
        assert_lse_close(missing, full)


def test_forced_state_packs_a_forced_live_set():
    """forced_state (the GPU tools' --forced F:KIND) packs a forced live set of bench.py's kinds: per-row live
    counts of the kind around the fraction, at the tile table's tiles, the same set on every call; a bad spec
    names itself."""
    from liteattn_ops.core.state import live_mask
    from liteattn_ops.testing import forced_state

    seqlen, heads, head_dim = 4000, 3, 128
    bm, bn = tile_shape(head_dim, torch.bfloat16)
    m_tiles, n_tiles = -(-seqlen // bm), -(-seqlen // bn)
    state = forced_state(seqlen, heads, head_dim, "0.5:heavy-first", device="cpu")
    assert state.shape[:3] == (1, heads, m_tiles)
    live = unpack_bits(state, n_tiles)
    counts = live.sum(-1)                                       # (1, H, Mt)
    assert bool((counts[..., :-1] >= counts[..., 1:]).all())    # heavy first: counts fall over the query tiles
    assert counts[0, 0, 0] == n_tiles and counts[0, 0, -1] == 1
    assert abs(live.float().mean().item() - 0.5) < 0.05
    assert torch.equal(state, forced_state(seqlen, heads, head_dim, "0.5:heavy-first", device="cpu"))
    balanced = unpack_bits(forced_state(seqlen, heads, head_dim, "0.25:balanced", device="cpu"), n_tiles).sum(-1)
    assert bool((balanced == round(0.25 * n_tiles)).all())
    assert live_mask(state, seqlen, head_dim, torch.bfloat16).shape[-1] == n_tiles
    for spec in ("0.5", "0.5:heavy", "0:balanced", "1.5:balanced", "x:balanced"):
        with pytest.raises(ValueError, match="F:KIND"):
            forced_state(seqlen, heads, head_dim, spec, device="cpu")
