"""GPU tests of the sm_90a kernel (liteattn_ops._C) against the float32 reference.

Every test is marked `cuda`; conftest.py skips them without a Hopper GPU and a built `_C`.
Most tests call `_C.forward` directly with NaN-poisoned outputs, so an element the kernel
forgets to write shows up; a few go through the torch ops.
"""

from __future__ import annotations

import math

import pytest
import torch

import liteattn_ops  # noqa: F401  (registers torch.ops.liteattn)
from liteattn_ops.core import reference
from liteattn_ops.core.state import live_mask, new_state, pack_bits
from liteattn_ops.testing import local_qkv

pytestmark = pytest.mark.cuda

DTYPES = [torch.bfloat16, torch.float16]
HEAD_DIMS = [64, 128]
TOL = 1e-2  # relative error vs the float32 reference (bf16 and fp16)


def _ext():
    from liteattn_ops.core.extension import extension

    return extension()


def _qkv(batch, heads, seqlen_q, seqlen_k, head_dim, dtype, layout="bhsd", seed=0):
    """Fresh random q, k, v in either the (B, H, S, D) or the (B, S, H, D) memory layout."""
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def make(seqlen):
        if layout == "bhsd":
            return torch.randn(batch, heads, seqlen, head_dim, device="cuda", dtype=dtype, generator=gen)
        return torch.randn(batch, seqlen, heads, head_dim, device="cuda", dtype=dtype, generator=gen).transpose(1, 2)

    return make(seqlen_q), make(seqlen_k), make(seqlen_k)


SCHEDULE_POISON = -7


def run_kernel(q, k, v, state=None, threshold=None, must_do=None, must_skip=None, scale=None, schedule=True,
               split_tail=True, return_scratch=False, skip_split=False):
    """_C.forward with outputs poisoned with NaN. Returns (out, lse). With a state and schedule=True
    (the op's path) the kernel orders the query tiles itself in a poisoned scratch buffer; a tensor
    passed as `schedule` is used as that buffer; schedule=False runs them in natural order.
    split_tail=False: the dense path without the split wave tail (no scratch passed); skip_split=True: the skip
    path with its split tail's scratch (KernelVariant::split_skip; without it the skip path gets none);
    return_scratch=True: (out, lse, the split tail's float32 scratch as the kernel left it)."""
    batch, heads, seqlen_q, head_dim = q.shape
    if state is not None and schedule is True:
        schedule = torch.full(state.shape[:3], SCHEDULE_POISON, device=q.device, dtype=torch.int32)
    schedule_ptr = schedule.data_ptr() if isinstance(schedule, torch.Tensor) and state is not None else 0
    # The persistent skip kernel's work counter, poisoned: the call must zero it (else no row would be computed).
    counter = torch.full((1,), 1 << 30, device=q.device, dtype=torch.int32)
    out = torch.full((batch, seqlen_q, heads, head_dim), math.nan, device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.full((batch, heads, seqlen_q), math.nan, device=q.device, dtype=torch.float32)

    def ranges(r):
        return (0, 0) if r is None else (r.data_ptr(), r.shape[0])

    must_do = None if must_do is None else must_do.to(torch.int32).contiguous()
    must_skip = None if must_skip is None else must_skip.to(torch.int32).contiguous()
    do_ptr, n_do = ranges(must_do)
    skip_ptr, n_skip = ranges(must_skip)
    # The dense path's split-tail scratch (csrc/liteattn.h, SplitTailPlan), poisoned: a partial result the combine
    # reads before the kernel wrote it shows up as NaN.
    if state is None:
        floats = 0 if not split_tail else _ext().dense_split_workspace_floats(
            batch, heads, seqlen_q, k.shape[2], head_dim, str(q.dtype).removeprefix("torch."))
    else:
        floats = 0 if not skip_split else _ext().skip_split_workspace_floats(
            batch, heads, seqlen_q, k.shape[2], head_dim, str(q.dtype).removeprefix("torch."))
    split = torch.full((max(floats, 1),), math.nan, device=q.device, dtype=torch.float32)
    _ext().forward(
        q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), out=out.data_ptr(), lse=lse.data_ptr(),
        batch=batch, heads=heads, seqlen_q=seqlen_q, seqlen_k=k.shape[2], head_dim=head_dim,
        dtype=str(q.dtype).removeprefix("torch."),
        q_stride=q.stride()[:3], k_stride=k.stride()[:3], v_stride=v.stride()[:3], out_stride=out.stride()[:3],
        scale=1.0 / math.sqrt(head_dim) if scale is None else scale,
        state=0 if state is None else state.data_ptr(),
        threshold=0 if threshold is None else threshold.data_ptr(),
        must_do=do_ptr, num_must_do=n_do, must_skip=skip_ptr, num_must_skip=n_skip,
        stream=torch.cuda.current_stream().cuda_stream, schedule=schedule_ptr,
        work_counter=counter.data_ptr() if state is not None else 0,
        split_workspace=split.data_ptr() if floats else 0, split_workspace_size=floats,
    )
    return (out, lse, split) if return_scratch else (out, lse)


def rel_err(x, ref):
    x, ref = x.float(), ref.float()
    assert not torch.isnan(x).any(), "NaN in kernel output (unwritten or broken element)"
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(x), finite), "inf pattern differs from the reference"
    return ((x[finite] - ref[finite]).norm() / ref[finite].norm().clamp_min(1e-30)).item()


def check_against_reference(q, k, v, state=None, threshold=None, must_do=None, must_skip=None):
    dense = state is None
    if dense:
        state = new_state(q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.shape[3], q.dtype, q.device)
        threshold = torch.full((q.shape[1],), -math.inf, device=q.device)
    ref_out, ref_lse, ref_state = reference.sparse_attention_reference(q, k, v, state, threshold, must_do, must_skip)
    kernel_state = None if dense else state.clone()
    out, lse = run_kernel(q, k, v, kernel_state, None if dense else threshold, must_do, must_skip)
    torch.cuda.synchronize()
    assert rel_err(out, ref_out) <= TOL
    assert rel_err(lse, ref_lse) <= TOL
    return out, lse, kernel_state, ref_state


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("seqlen", [1, 7, 127, 128, 129, 1000, 4096])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_dense_matches_reference(dtype, head_dim, seqlen, layout):
    q, k, v = _qkv(2, 3, seqlen, seqlen, head_dim, dtype, layout, seed=seqlen)
    check_against_reference(q, k, v)


@pytest.mark.parametrize("dtype,head_dim", [(torch.bfloat16, 128), (torch.float16, 64)])
def test_dense_long_sequence(dtype, head_dim):
    q, k, v = _qkv(1, 2, 32760, 32760, head_dim, dtype, "bshd", seed=1)
    check_against_reference(q, k, v)


def _split_tail_shape(head_dim, dtype, batch, heads, tail, seqlen_k):
    """seqlen_q (not a multiple of BM) whose B * H * Mt query tiles leave `tail` tiles after whole rounds of the
    device's SMs (tail < 0: -tail tiles in all, fewer than the SMs)."""
    from liteattn_ops.core.tiling import tile_shape

    bm = tile_shape(head_dim, dtype)[0]
    sms = _ext().device_sm_count()
    tiles = -tail if tail < 0 else sms + tail
    assert tiles % (batch * heads) == 0
    return tiles // (batch * heads) * bm - bm // 3, sms


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("batch,heads,tail,seqlen_k", [(2, 3, 6, 4000), (1, 1, 3, 11000), (1, 2, -16, 8000)])
def test_split_tail_matches_reference(dtype, head_dim, batch, heads, tail, seqlen_k):
    # The dense path's last round cut into key ranges merged by their LSEs (SplitTailPlan): one round and a tail of
    # 6 or 3 tiles, or (tail -16) fewer tiles than SMs; S_q and S_k not multiples of the tile, the partial key tile
    # inside one range.
    from liteattn_ops.core.tiling import tile_shape

    seqlen_q, sms = _split_tail_shape(head_dim, dtype, batch, heads, tail, seqlen_k)
    bm, bn = tile_shape(head_dim, dtype)
    tiles = batch * heads * -(-seqlen_q // bm)
    chunks, whole, units, grid = _ext().split_tail_plan(tiles, sms, -(-seqlen_k // bn))
    floats = _ext().dense_split_workspace_floats(batch, heads, seqlen_q, seqlen_k, head_dim,
                                                  str(dtype).removeprefix("torch."))
    if floats == 0:
        pytest.skip("this build's default variant does not split the tail")
    assert chunks >= 2 and units == (tiles - whole) * chunks <= grid <= sms, (chunks, whole, units, grid)
    assert floats == units * bm * (head_dim + 1)
    q, k, v = _qkv(batch, heads, seqlen_q, seqlen_k, head_dim, dtype, "bshd", seed=seqlen_k + tail)
    ref_out, ref_lse = reference.attention_reference(q, k, v)
    out, lse, scratch = run_kernel(q, k, v, return_scratch=True)
    torch.cuda.synchronize()
    assert rel_err(out, ref_out) <= TOL and rel_err(lse, ref_lse) <= TOL
    # The split really ran: every valid row of every tail tile's ranges wrote its partial O and LSE into the
    # NaN-poisoned scratch (a call that fell back to the unsplit loop leaves it all NaN); rows past S_q did not.
    mt = -(-seqlen_q // bm)
    valid_rows = sum(min(bm, seqlen_q - (t % mt) * bm) for t in range(whole, tiles))
    partial_o, partial_lse = scratch[:units * bm * head_dim], scratch[units * bm * head_dim:]
    assert (~partial_lse.isnan()).sum().item() == valid_rows * chunks
    assert (~partial_o.isnan()).sum().item() == valid_rows * chunks * head_dim


def test_split_tail_plan():
    # (tiles, SMs, key tiles) -> (chunks, whole tiles, units, grid): the wave-tail split rule (csrc/liteattn.h).
    plan = _ext().split_tail_plan
    assert plan(3072, 132, 187) == (3, 3036, 108, 132)     # 32760 x 12 x 128: 23 rounds + 36 tiles
    assert plan(4104, 132, 256) == (11, 4092, 132, 132)    # 32760 x 24 x 64: 31 rounds + 12
    assert plan(140, 132, 8) == (2, 132, 16, 132)          # capped by the shortest range (4 key tiles)
    assert plan(16, 132, 46) == (8, 0, 128, 128)           # fewer tiles than SMs
    assert plan(3, 132, 1000)[0] == 16                     # at most 16 ranges
    assert plan(384, 132, 24)[0] == 0                      # 120 tail tiles: nothing to gain
    assert plan(3168, 132, 187)[0] == 0                    # no tail
    assert plan(140, 132, 7)[0] == 0                       # ranges would be shorter than 4 key tiles


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_split_tail_nan_key_reaches_the_output(head_dim):
    # A NaN key in one key range of the split tail: every row of its head is NaN, as without the split (the merge
    # weights that range 0, and 0 x NaN is NaN); the other heads stay finite.
    seqlen_q, _ = _split_tail_shape(head_dim, torch.bfloat16, 2, 3, 6, 4000)
    if _ext().dense_split_workspace_floats(2, 3, seqlen_q, 4000, head_dim, "bfloat16") == 0:
        pytest.skip("this build's default variant does not split the tail")
    q, k, v = _qkv(2, 3, seqlen_q, 4000, head_dim, torch.bfloat16, "bshd", seed=5)
    k[1, 2, 100, 7] = math.nan  # head (1, 2) holds the tail tiles: the last in the linear order
    out, lse = run_kernel(q, k, v)
    unsplit_out, unsplit_lse = run_kernel(q, k, v, split_tail=False)
    torch.cuda.synchronize()
    assert out[1, 2].isnan().all() and unsplit_out[1, 2].isnan().all()
    # LSE of a NaN row: -inf (its row sum is NaN), split or not -- not a finite LSE from the other key ranges.
    assert torch.equal(lse[1, 2], unsplit_lse[1, 2]) and (lse[1, 2] == -math.inf).all()
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[1, :2]).all() and torch.isfinite(lse[0]).all()


def _skip_split_case(head_dim, dtype, rounds):
    """(heads, grid) of a local-attention problem, batch 1, whose B * H * Mt query tiles leave a tail the skip path
    splits (SplitTailPlan) after `rounds` (0 or >= 1) whole rounds of the device's SMs; S = 255 * frames tokens,
    not a multiple of the tile. None when the build's default variant does not split the skip tail."""
    from liteattn_ops.core.tiling import tile_shape

    bm, bn = tile_shape(head_dim, dtype)
    sms = _ext().device_sm_count()
    for heads in (3, 4, 2, 5, 6, 1):
        for frames in range(4, 64):
            seqlen = 255 * frames
            tiles = heads * -(-seqlen // bm)
            if (tiles // sms == 0) != (rounds == 0) or tiles < 2:
                continue
            chunks = _ext().split_tail_plan(tiles, sms, -(-seqlen // bn))[0]
            if chunks >= 2 and _ext().skip_split_workspace_floats(1, heads, seqlen, seqlen, head_dim,
                                                                  str(dtype).removeprefix("torch.")) > 0:
                return heads, (frames, 15, 17)
    return None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("rounds,inputs", [(1, "structured"), (1, "forced"), (0, "structured")])
def test_skip_split_tail_equals_unsplit(dtype, head_dim, rounds, inputs):
    """The skip path's split tail (KernelVariant::split_skip): the tail rows' visit lists cut into chunks whose
    votes split_vote_kernel takes from their recorded tile maxima. The new state must equal the unsplit kernel's
    bit for bit (same maxima, same comparisons, in the contract's visit order), over two calls on structured inputs
    with finite per-head thresholds (tiles really dropped, so the tail rows' lists differ in length) or on random
    live sets with must-do / must-skip ranges and rows with nothing live; outputs within rounding of the unsplit
    ones and of the float32 reference on that state; and the split really ran (the poisoned scratch written)."""
    from liteattn_ops.core.tiling import tile_shape

    case = _skip_split_case(head_dim, dtype, rounds)
    if case is None:
        pytest.skip("this build's default variant does not split the skip path's tail")
    heads, grid = case
    gen = torch.Generator().manual_seed(head_dim + rounds)
    q, k, v = (t.to("cuda", dtype) for t in local_qkv(grid, 1, heads, head_dim, generator=gen))
    seqlen = q.shape[2]
    bm, bn = tile_shape(head_dim, dtype)
    m_tiles, n_tiles = -(-seqlen // bm), -(-seqlen // bn)
    must_do = must_skip = None
    if inputs == "structured":
        state = new_state(1, heads, seqlen, seqlen, head_dim, dtype, "cuda")
        threshold = torch.tensor([-3.0, -8.0, -math.inf, -5.0, -12.0, -6.0][:heads], device="cuda")
        calls = 2
    else:
        fraction = torch.tensor([0.0, 0.3, 0.6, 1.0])[torch.randint(0, 4, (1, heads, m_tiles, 1), generator=gen)]
        state = pack_bits(torch.rand(1, heads, m_tiles, n_tiles, generator=gen) < fraction).to("cuda")
        threshold = torch.full((heads,), -4.0, device="cuda")
        must_do = torch.tensor([[0, 3 * bn], [seqlen - 700, seqlen - 500]], device="cuda")
        must_skip = torch.tensor([[5 * bn - 7, 9 * bn + 3]], device="cuda")
        calls = 1
    sms = _ext().device_sm_count()
    chunks, whole, units, _ = _ext().split_tail_plan(heads * m_tiles, sms, n_tiles)
    split_state, unsplit_state = state.clone(), state.clone()
    for _ in range(calls):
        old = split_state.clone()
        schedule = torch.full((1, heads, m_tiles), SCHEDULE_POISON, device="cuda", dtype=torch.int32)
        out, lse, scratch = run_kernel(q, k, v, split_state, threshold, must_do, must_skip, schedule=schedule,
                                       skip_split=True, return_scratch=True)
        ref_out, ref_lse = run_kernel(q, k, v, unsplit_state, threshold, must_do, must_skip)
        torch.cuda.synchronize()
        assert torch.equal(split_state, unsplit_state), "the split tail's votes differ from the unsplit kernel's"
        assert rel_err(out, ref_out) <= TOL and rel_err(lse, ref_lse) <= TOL
        f_out, f_lse, _ = reference.sparse_attention_reference(q, k, v, old, threshold, must_do, must_skip)
        assert rel_err(out, f_out) <= TOL and rel_err(lse, f_lse) <= TOL
        # The tail rows (the schedule's last ones) wrote their partial LSE rows, chunks each, and one record per
        # valid row and visited tile (finite inputs: no NaN records).
        tail = schedule.flatten()[whole:].long().cpu()
        valid = torch.tensor([min(bm, seqlen - (r % m_tiles) * bm) for r in tail.tolist()])
        partial_lse = scratch[units * bm * head_dim: units * bm * (head_dim + 1)]
        records = scratch[units * bm * (head_dim + 1):]
        assert (~partial_lse.isnan()).sum().item() == valid.sum().item() * chunks
        from liteattn_ops.core.reference import range_tiles
        from liteattn_ops.core.state import unpack_bits
        visit = unpack_bits(old, n_tiles).flatten(0, 2)[tail].cpu()
        if must_do is not None:
            do = range_tiles(must_do.cpu(), seqlen, bn, inside=False)
            visit = (visit | do) & ~(range_tiles(must_skip.cpu(), seqlen, bn, inside=True) & ~do)
        assert (~records.isnan()).sum().item() == (visit.sum(-1) * valid).sum().item()
    assert not torch.equal(split_state, state), "tiles should be dropped here"


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_skip_split_tail_nan_key(head_dim):
    # A NaN key in a tail row's head: the rows that see it keep every tile from it on, split or not (the NaN
    # records); their outputs are NaN and their LSE -inf, as unsplit.
    dtype = torch.bfloat16
    case = _skip_split_case(head_dim, dtype, 1)
    if case is None:
        pytest.skip("this build's default variant does not split the skip path's tail")
    heads, grid = case
    gen = torch.Generator().manual_seed(7)
    q, k, v = (t.to("cuda", dtype) for t in local_qkv(grid, 1, heads, head_dim, generator=gen))
    k[0, heads - 1, k.shape[2] // 2, 3] = math.nan  # the last head: the natural order's tail (LPT keeps heads in order)
    state = new_state(1, heads, q.shape[2], k.shape[2], head_dim, dtype, "cuda")
    threshold = torch.full((heads,), -6.0, device="cuda")
    for _ in range(2):
        split_state, unsplit_state = state.clone(), state.clone()
        out, lse = run_kernel(q, k, v, split_state, threshold, skip_split=True)
        ref_out, ref_lse = run_kernel(q, k, v, unsplit_state, threshold)
        torch.cuda.synchronize()
        assert torch.equal(split_state, unsplit_state)
        assert torch.equal(out.isnan(), ref_out.isnan()) and out[0, heads - 1].isnan().any()
        assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
        state = split_state


def _neg_inf_key_tiles(q, k, block_n):
    """Every score of the key tiles t with t % 4 in (0, 1) becomes -inf (k[..., 0] = -inf against q[..., 0] >= 0.5),
    in place: the dense rows start with two such tiles, many skip rows (from the diagonal) and split key ranges
    with one or two."""
    q[..., 0] = q[..., 0].abs() + 0.5
    k[:, :, torch.arange(k.shape[2], device=k.device) // block_n % 4 < 2, 0] = -math.inf


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("path", ["dense", "dense_split", "skip", "skip_split"])
def test_neg_inf_tiles_at_row_start(head_dim, path):
    """A row (or a split key range) whose first visited tiles have every score -inf: their probabilities are 0 and
    the row goes on as the reference's does -- not exp2(-inf - (-inf)) = NaN from the -inf running max. The skip
    paths on structured inputs with finite thresholds (tiles really dropped after the row's first finite tile):
    the decisions as the reference's (the -inf tiles themselves are never negligible), split or not."""
    from liteattn_ops.core.tiling import tile_shape

    dtype = torch.bfloat16
    bm, bn = tile_shape(head_dim, dtype)
    if path.startswith("dense"):
        split = path == "dense_split"
        seqlen_q, seqlen_k = (_split_tail_shape(head_dim, dtype, 2, 3, 6, 4000)[0], 4000) if split else (1000, 1500)
        if split and _ext().dense_split_workspace_floats(2, 3, seqlen_q, seqlen_k, head_dim, "bfloat16") == 0:
            pytest.skip("this build's default variant does not split the tail")
        q, k, v = _qkv(2, 3, seqlen_q, seqlen_k, head_dim, dtype, "bshd", seed=11)
        _neg_inf_key_tiles(q, k, bn)
        ref_out, ref_lse = reference.attention_reference(q, k, v)
        out, lse = run_kernel(q, k, v, split_tail=split)
        torch.cuda.synchronize()
        assert rel_err(out, ref_out) <= TOL and rel_err(lse, ref_lse) <= TOL
        return
    if path == "skip":
        heads, grid = 2, (6, 10, 25)
    else:
        case = _skip_split_case(head_dim, dtype, 1)
        if case is None:
            pytest.skip("this build's default variant does not split the skip path's tail")
        heads, grid = case
    gen = torch.Generator().manual_seed(head_dim)
    q, k, v = (t.to("cuda", dtype) for t in local_qkv(grid, 1, heads, head_dim, generator=gen))
    _neg_inf_key_tiles(q, k, bn)
    seqlen = q.shape[2]
    fresh = state = new_state(1, heads, seqlen, seqlen, head_dim, dtype, "cuda")
    threshold = torch.tensor([-3.0, -8.0, -5.0, -12.0, -6.0, -4.0][:heads], device="cuda")
    for _ in range(2):
        ref_out, ref_lse, ref_state = reference.sparse_attention_reference(q, k, v, state, threshold)
        kernel_state = state.clone()
        out, lse = run_kernel(q, k, v, kernel_state, threshold, skip_split=path == "skip_split")
        if path == "skip_split":
            unsplit_state = state.clone()
            run_kernel(q, k, v, unsplit_state, threshold)
        torch.cuda.synchronize()
        assert rel_err(out, ref_out) <= TOL and rel_err(lse, ref_lse) <= TOL
        kernel_live = live_mask(kernel_state, seqlen, head_dim, dtype)
        ref_live = live_mask(ref_state, seqlen, head_dim, dtype)
        assert (kernel_live != ref_live).float().mean() <= 0.002, f"{(kernel_live != ref_live).sum().item()} tiles"
        if path == "skip_split":
            assert torch.equal(kernel_state, unsplit_state)
        state = kernel_state
    assert not torch.equal(state, fresh), "tiles should be dropped here"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("seqlen_q,seqlen_k", [(1000, 129), (77, 4096), (128, 1), (1, 300), (4096, 333)])
def test_cross_attention(dtype, head_dim, seqlen_q, seqlen_k):
    q, k, v = _qkv(2, 2, seqlen_q, seqlen_k, head_dim, dtype, "bshd", seed=seqlen_q + seqlen_k)
    check_against_reference(q, k, v)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_state_all_live_equals_dense(dtype, head_dim):
    """A fresh state with thr = -inf computes exactly what the dense path computes (bit for bit: the same loop; the
    dense path's split wave tail, which merges key ranges in float32, off -- test_split_tail_* check it)."""
    q, k, v = _qkv(2, 2, 1000, 1000, head_dim, dtype, seed=3)
    state = new_state(2, 2, 1000, 1000, head_dim, dtype, "cuda")
    before = state.clone()
    out_sparse, lse_sparse = run_kernel(q, k, v, state, torch.full((2,), -math.inf, device="cuda"))
    out_dense, lse_dense = run_kernel(q, k, v, split_tail=False)
    assert torch.equal(out_sparse, out_dense)
    assert torch.equal(lse_sparse, lse_dense)
    assert torch.equal(state, before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_skip_decisions_over_calls(dtype, head_dim, layout):
    """Structured (local) attention over 12 consecutive calls with per-head thresholds: the
    kernel's new state equals the reference's from the same old state, except tiles within
    rounding of the threshold; the output equals the reference on the kernel's own live set."""
    grid = (8, 16, 16)  # 2048 tokens
    batch, heads = 2, 4
    gen = torch.Generator().manual_seed(head_dim)
    q0, k0, v0 = local_qkv(grid, batch, heads, head_dim, sharpness=40.0, dtype=torch.float32, generator=gen)
    threshold = torch.tensor([-4.0, -8.0, -14.0, -math.inf], device="cuda")
    state = new_state(batch, heads, q0.shape[2], k0.shape[2], head_dim, dtype, "cuda")
    disagreements = total = 0
    for step in range(12):
        noise = 0.02 * step
        q, k, v = ((t + noise * torch.randn(t.shape, generator=gen)).to("cuda", dtype) for t in (q0, k0, v0))
        if layout == "bshd":
            q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
        _, _, kernel_state, ref_state = check_against_reference(q, k, v, state, threshold)
        n_k = k.shape[2]
        kernel_live = live_mask(kernel_state, n_k, head_dim, dtype)
        ref_live = live_mask(ref_state, n_k, head_dim, dtype)
        disagreements += (kernel_live != ref_live).sum().item()
        total += kernel_live.numel()
        # Bits >= Nt are untouched (a fresh state has them set).
        nt = kernel_live.shape[-1]
        if nt % 32:
            high = torch.bitwise_right_shift(kernel_state[..., -1], nt % 32)
            assert torch.equal(high, torch.full_like(high, -1))
        state = kernel_state
    live = live_mask(state, k0.shape[2], head_dim, dtype).float()
    assert live[:, 3].all(), "thr = -inf must never remove a tile"
    assert live[:, :3].mean() < 0.9, "structured inputs should let tiles be skipped"
    print(f"skip decisions: {disagreements} / {total} tiles disagree ({100 * disagreements / total:.4f} %)")
    assert disagreements <= 0.002 * total


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("seqlen_q,seqlen_k", [(1000, 4100), (4096, 4096), (300, 129)])
def test_forced_live_sets(head_dim, seqlen_q, seqlen_k):
    """Random live sets per row, from none to all (thr = -inf keeps them): the output is the
    reference's on that set, in the fixed visit order (the consumers get each tile index from
    the producer through the K/V stages); rows with no live tile give O = 0, LSE = -inf; the
    state is unchanged."""
    batch, heads, dtype = 2, 3, torch.bfloat16
    q, k, v = _qkv(batch, heads, seqlen_q, seqlen_k, head_dim, dtype, "bshd", seed=seqlen_q + head_dim)
    block_m, block_n = liteattn_ops.tile_shape(head_dim, dtype)
    m_tiles, n_tiles = -(-seqlen_q // block_m), -(-seqlen_k // block_n)
    gen = torch.Generator().manual_seed(seqlen_k)
    fraction = torch.tensor([0.0, 1 / n_tiles, 0.25, 0.5, 0.75, 1.0])[torch.randint(0, 6, (batch, heads, m_tiles, 1),
                                                                                   generator=gen)]
    live = torch.rand(batch, heads, m_tiles, n_tiles, generator=gen) < fraction
    live[..., 0, :] = False  # one row with nothing live in every head
    state = pack_bits(live).to("cuda")
    threshold = torch.full((heads,), -math.inf, device="cuda")
    _, lse, kernel_state, ref_state = check_against_reference(q, k, v, state, threshold)
    assert torch.equal(kernel_state, state) and torch.equal(ref_state, state)
    assert torch.isneginf(lse[..., :block_m]).all()


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("size", ["small", "large"])
def test_schedule_heaviest_first_and_order_free(head_dim, size):
    """The device schedule lists the query-tile rows (b*H + h)*Mt + m by descending live count (ties:
    ascending row), over the whole grid when the K/V fit in L2 ("small") and within each head
    otherwise ("large"); the query-tile order changes nothing in the outputs or the state (bitwise),
    thresholds finite so that tiles really get dropped."""
    dtype = torch.bfloat16
    batch, heads, grid = (2, 3, (6, 20, 25)) if size == "small" else (1, 2 if head_dim == 128 else 4, (16, 50, 50))
    seqlen = grid[0] * grid[1] * grid[2]
    block_m, block_n = liteattn_ops.tile_shape(head_dim, dtype)
    m_tiles, n_tiles = -(-seqlen // block_m), -(-seqlen // block_n)
    scope = _ext().schedule_scope(batch=batch, heads=heads, num_m_tiles=m_tiles, seqlen_k=seqlen, head_dim=head_dim)
    assert scope == ("global" if size == "small" else "head")
    gen = torch.Generator().manual_seed(head_dim + 1)
    live = torch.rand(batch, heads, m_tiles, n_tiles, generator=gen) < torch.rand(batch, heads, m_tiles, 1,
                                                                                  generator=gen)
    state = pack_bits(live).to("cuda")
    q, k, v = (t.to("cuda", dtype) for t in local_qkv(grid, batch, heads, head_dim, generator=gen))
    threshold = torch.tensor([-3.0, -8.0, -math.inf, -5.0][:heads], device="cuda")
    schedule = torch.full((batch, heads, m_tiles), SCHEDULE_POISON, device="cuda", dtype=torch.int32)
    state_lpt, state_natural = state.clone(), state.clone()
    out_lpt, lse_lpt = run_kernel(q, k, v, state_lpt, threshold, schedule=schedule)
    out_nat, lse_nat = run_kernel(q, k, v, state_natural, threshold, schedule=False)
    torch.cuda.synchronize()
    counts = live.sum(-1)
    if scope == "global":
        expected = torch.sort(-counts.flatten(), stable=True).indices.view(batch, heads, m_tiles)
    else:
        rows = torch.arange(batch * heads * m_tiles).view(batch, heads, m_tiles)
        expected = torch.gather(rows, -1, torch.sort(-counts, dim=-1, stable=True).indices)
    assert torch.equal(schedule.cpu(), expected.to(torch.int32))
    assert torch.equal(out_lpt, out_nat) and torch.equal(lse_lpt, lse_nat)
    assert torch.equal(state_lpt, state_natural)
    assert not torch.equal(state_lpt, state), "finite thresholds should drop tiles here"


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("thr", [-8.0, 0.0])
def test_infinite_key_drops_no_extra_tile(head_dim, thr):
    """One key row of +inf with q >= 0 puts +inf into every query row's scores of that tile, and the
    running max is +inf from then on: such a tile, and every tile visited after it, has a non-finite
    l_i or r_i and is never negligible (issue 14, item 5). Random scores give no other negligible
    tile at thr = -8; at thr = 0 the kernel must drop exactly what the reference drops."""
    batch, heads, seqlen, dtype = 1, 2, 1000, torch.bfloat16
    q, k, v = _qkv(batch, heads, seqlen, seqlen, head_dim, dtype, seed=head_dim)
    q = q.abs()
    k[:, :, 300] = math.inf
    state = new_state(batch, heads, seqlen, seqlen, head_dim, dtype, "cuda")
    threshold = torch.full((heads,), thr, device="cuda")
    _, _, ref_state = reference.sparse_attention_reference(q, k, v, state, threshold)
    kernel_state = state.clone()
    run_kernel(q, k, v, kernel_state, threshold)
    torch.cuda.synchronize()
    kernel_live = live_mask(kernel_state, seqlen, head_dim, dtype)
    ref_live = live_mask(ref_state, seqlen, head_dim, dtype)
    assert torch.equal(kernel_live, ref_live), f"{(kernel_live != ref_live).sum().item()} tiles differ"
    if thr == -8.0:
        assert kernel_live.all(), "a tile was dropped after the +inf key"
    # Every tile visited at or after the +inf key's tile stays live (visit order n0, n0+1, ..., wrap).
    block_m, block_n = liteattn_ops.tile_shape(head_dim, dtype)
    n_tiles, inf_tile = kernel_live.shape[-1], 300 // block_n
    for m in range(kernel_live.shape[2]):
        n0 = min(n_tiles - 1, m * block_m * seqlen // (seqlen * block_n))
        order = [(n0 + i) % n_tiles for i in range(n_tiles)]
        after = order[order.index(inf_tile):]
        assert kernel_live[:, :, m, after].all(), f"query tile {m}: a tile after the +inf key was dropped"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_must_do_and_must_skip(dtype, head_dim):
    batch, heads, seqlen = 2, 3, 1500
    gen = torch.Generator().manual_seed(7)
    q, k, v = (t.to("cuda", dtype) for t in local_qkv((6, 10, 25), batch, heads, head_dim, generator=gen))
    state = new_state(batch, heads, seqlen, seqlen, head_dim, dtype, "cuda")
    # Knock some tiles out first so must-do has something to revive.
    state[:, :, :, 0] &= 0x5555_5555
    threshold = torch.full((heads,), -6.0, device="cuda")
    # Odd ranges on purpose: negative start, past the end, empty, overlapping do/skip.
    must_do = torch.tensor([[0, 10], [700, 701], [-50, 3], [1490, 5000], [900, 800]], device="cuda")
    must_skip = torch.tensor([[128, 640], [650, 1100], [-10, -1], [1400, 99999], [700, 900]], device="cuda")
    for _ in range(3):
        _, _, kernel_state, ref_state = check_against_reference(q, k, v, state, threshold, must_do, must_skip)
        assert torch.equal(kernel_state, ref_state)
        state = kernel_state


def test_batch_heads_per_head_threshold_op():
    """Through torch.ops.liteattn.sparse_attention: state mutated in place, per-head thresholds."""
    batch, heads, head_dim, dtype = 3, 5, 128, torch.bfloat16
    gen = torch.Generator().manual_seed(11)
    q, k, v = (t.to("cuda", dtype) for t in local_qkv((4, 16, 16), batch, heads, head_dim, generator=gen))
    state = new_state(batch, heads, q.shape[2], k.shape[2], head_dim, dtype, "cuda")
    threshold = torch.tensor([-math.inf, -20.0, -10.0, -5.0, -2.0], device="cuda")
    for _ in range(3):
        ref_out, ref_lse, ref_state = reference.sparse_attention_reference(q, k, v, state, threshold)
        out, lse = torch.ops.liteattn.sparse_attention(q, k, v, state, threshold)
        assert rel_err(out, ref_out) <= TOL and rel_err(lse, ref_lse) <= TOL
        assert (live_mask(state, k.shape[2], head_dim, dtype) != live_mask(ref_state, k.shape[2], head_dim, dtype)
                ).float().mean() <= 0.002
    frac = live_mask(state, k.shape[2], head_dim, dtype).float().mean(dim=(0, 2, 3))
    assert frac[0] == 1.0 and frac[4] < frac[1]
    out, lse = torch.ops.liteattn.attention(q, k, v)
    ref_out, ref_lse = reference.attention_reference(q, k, v)
    assert rel_err(out, ref_out) <= TOL and rel_err(lse, ref_lse) <= TOL


def test_cuda_graph_capture():
    """No host synchronisation: the sparse op captures into a CUDA graph and replays."""
    q, k, v = _qkv(1, 2, 1000, 1000, 64, torch.bfloat16, seed=5)
    state = new_state(1, 2, 1000, 1000, 64, torch.bfloat16, "cuda")
    threshold = torch.full((2,), -8.0, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.ops.liteattn.sparse_attention(q, k, v, state, threshold)  # warm-up outside the graph
    torch.cuda.synchronize()
    state.fill_(-1)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = torch.ops.liteattn.sparse_attention(q, k, v, state, threshold)
    state.fill_(-1)
    graph.replay()
    torch.cuda.synchronize()
    ref_out, _, _ = reference.sparse_attention_reference(
        q, k, v, new_state(1, 2, 1000, 1000, 64, torch.bfloat16, "cuda"), threshold)
    assert rel_err(out, ref_out) <= TOL


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_skip_path_key_bound(head_dim):
    """The skip path keeps a state row in shared memory: at most max_state_words * 32 key tiles (README,
    "The skip state": 2,097,152 keys at head dim 64, 1,036,288 at 128). At the bound the call runs and
    matches the dense op (thr = -inf); one key more raises ValueError naming the bound and changes
    nothing; the dense op has no bound."""
    bound = {64: 2_097_152, 128: 1_036_288}[head_dim]
    _, block_n = liteattn_ops.tile_shape(head_dim, torch.bfloat16)
    assert bound % block_n == 0
    q, k, v = _qkv(1, 1, 128, bound + 1, head_dim, torch.bfloat16)
    no_thr = torch.full((1,), -math.inf, device="cuda")
    state = new_state(1, 1, 128, bound, head_dim, torch.bfloat16, "cuda")
    op_out, _ = torch.ops.liteattn.sparse_attention(q, k[:, :, :bound], v[:, :, :bound], state.clone(), no_thr)
    out, _ = run_kernel(q, k[:, :, :bound], v[:, :, :bound], state, no_thr)
    # Against the dense path's own loop (one query tile: the ops may split its keys over 16 SMs and merge them in
    # float32, which moves bf16 outputs of ~1e-3 by an ulp: 3-4e-3 relative, above this test's 1e-3).
    dense, _ = run_kernel(q, k[:, :, :bound], v[:, :, :bound], split_tail=False)
    assert rel_err(out, dense) <= 1e-3 and rel_err(op_out, dense) <= TOL
    split, _ = torch.ops.liteattn.attention(q, k[:, :, :bound], v[:, :, :bound])
    assert rel_err(split, dense) <= TOL
    state = new_state(1, 1, 128, bound + 1, head_dim, torch.bfloat16, "cuda")
    before = state.clone()
    with pytest.raises(ValueError, match=f"seqlen_k too long for the skip state: at most {bound} keys"):
        torch.ops.liteattn.sparse_attention(q, k, v, state, no_thr)
    assert torch.equal(state, before)
    torch.ops.liteattn.attention(q, k, v)


def test_bad_inputs_raise():
    ext = _ext()
    q, k, v = _qkv(1, 2, 256, 256, 128, torch.bfloat16)
    with pytest.raises(ValueError, match="head_dim"):
        run_kernel(q[..., :96].contiguous(), k[..., :96].contiguous(), v[..., :96].contiguous())
    with pytest.raises(ValueError, match="dtype"):
        ext.tile_shape(128, "float32")
    misaligned = torch.empty(q.numel() + 8, device="cuda", dtype=q.dtype)[1:1 + q.numel()].view(q.shape)
    with pytest.raises(ValueError, match="q must have a 16-byte aligned"):
        run_kernel(misaligned, k, v)
    odd = torch.randn(1, 2, 256, 130, device="cuda", dtype=q.dtype)[..., :128]  # strides not multiples of 8
    with pytest.raises(ValueError, match="k must"):
        run_kernel(q, odd, v)
    with pytest.raises(ValueError, match="scale"):
        run_kernel(q, k, v, scale=-1.0)
    with pytest.raises(ValueError, match="threshold"):
        state = new_state(1, 2, 256, 256, 128, torch.bfloat16, "cuda")
        out = torch.empty(1, 256, 2, 128, device="cuda", dtype=q.dtype).transpose(1, 2)
        lse = torch.empty(1, 2, 256, device="cuda")
        ext.forward(q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), out=out.data_ptr(), lse=lse.data_ptr(),
                    batch=1, heads=2, seqlen_q=256, seqlen_k=256, head_dim=128, dtype="bfloat16",
                    q_stride=q.stride()[:3], k_stride=k.stride()[:3], v_stride=v.stride()[:3],
                    out_stride=out.stride()[:3], scale=0.1, state=state.data_ptr(), threshold=0,
                    must_do=0, num_must_do=0, must_skip=0, num_must_skip=0,
                    stream=torch.cuda.current_stream().cuda_stream)
    with pytest.raises(ValueError, match="split_workspace must be an 8-byte aligned"):
        out = torch.empty(1, 256, 2, 128, device="cuda", dtype=q.dtype).transpose(1, 2)
        lse = torch.empty(1, 2, 256, device="cuda")
        scratch = torch.empty(1 << 20, device="cuda")
        ext.forward(q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), out=out.data_ptr(), lse=lse.data_ptr(),
                    batch=1, heads=2, seqlen_q=256, seqlen_k=256, head_dim=128, dtype="bfloat16",
                    q_stride=q.stride()[:3], k_stride=k.stride()[:3], v_stride=v.stride()[:3],
                    out_stride=out.stride()[:3], scale=0.1, state=0, threshold=0,
                    must_do=0, num_must_do=0, must_skip=0, num_must_skip=0,
                    stream=torch.cuda.current_stream().cuda_stream,
                    split_workspace=scratch.data_ptr() + 4, split_workspace_size=(1 << 20) - 1)
    assert ext.tma_compatible(q.data_ptr(), q.stride()[:3]) and not ext.tma_compatible(q.data_ptr() + 2, q.stride()[:3])
    assert ext.tile_shape(128, "bfloat16") == liteattn_ops.tile_shape(128, torch.bfloat16)
    # The op copies a TMA-incompatible view instead of failing.
    out, _ = torch.ops.liteattn.attention(q, odd, v)
    ref, _ = reference.attention_reference(q, odd, v)
    assert rel_err(out, ref) <= TOL
