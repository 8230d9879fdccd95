"""GPU tests of the INT8 Q/K mode (issue 12; semantics: out/INT8_SPEC.md): the pre-pass against the CPU
emulation liteattn_ops.core.quant, and the INT8-mode kernel against the float32 reference and against the INT8
emulation (reference.sparse_attention_reference(..., use_int8=True)).

Every test is marked `cuda`; conftest.py skips them without a Hopper GPU and a built `_C`. Kernel outputs are
poisoned with NaN before the call (liteattn_ops.core.int8_cuda.forward_int8 writes into them), so an element
the kernel forgets to write shows up.

    python3 -m pytest -m cuda tests/test_int8_cuda.py
"""

from __future__ import annotations

import math

import pytest
import torch

import liteattn_ops  # noqa: F401  (registers torch.ops.liteattn)
from liteattn_ops.core import quant, reference
from liteattn_ops.core.state import live_mask, new_state, pack_bits
from liteattn_ops.testing import assert_lse_close, local_qkv
from test_kernel_cuda import SCHEDULE_POISON, _ext, _qkv, _skip_split_case, _split_tail_shape, rel_err

pytestmark = pytest.mark.cuda

DTYPES = [torch.bfloat16, torch.float16]
HEAD_DIMS = [64, 128]
TOL_FLOAT32 = 2e-2  # INT8 mode vs the float32 reference (issue 12)
TOL_EMULATION = 1e-2  # INT8 mode vs its own emulation: only P's rounding and summation order differ


@pytest.fixture(autouse=True)
def _int8_kernels_built():
    """A build configured without them (cmake -DLITEATTN_BUILD_INT8=OFF, e.g. a quick A/B build) skips this file;
    the default build has them."""
    from liteattn_ops.core.extension import extension

    if not getattr(extension(), "HAS_INT8", False):
        pytest.skip("liteattn_ops._C was built with LITEATTN_BUILD_INT8=OFF")


@pytest.fixture(autouse=True)
def _exact_float32_matmul():
    """The emulation's int8 dot products are float32 matmuls of integers, exact only without TF32."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


def _int8():
    from liteattn_ops.core import int8_cuda

    return int8_cuda


def run_int8(q, k, v, state=None, threshold=None, must_do=None, must_skip=None, scale=None, schedule=True,
             split_tail=True):
    """Pre-pass + INT8 kernel with NaN-poisoned outputs; (out, lse). schedule and split_tail as in
    test_kernel_cuda.run_kernel."""
    batch, heads, seqlen_q, head_dim = q.shape
    if state is not None and schedule is True:
        schedule = torch.full(state.shape[:3], SCHEDULE_POISON, device=q.device, dtype=torch.int32)
    out = torch.full((batch, seqlen_q, heads, head_dim), math.nan, device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.full((batch, heads, seqlen_q), math.nan, device=q.device, dtype=torch.float32)
    _int8().forward_int8(q, k, v, out, lse, state, threshold, must_do, must_skip, scale, schedule=schedule,
                         split_tail=split_tail)
    return out, lse


def float32_reference(q, k, v, scale=None):
    return reference.attention_reference(q.float(), k.float(), v.float(), scale)


def outlier_k(k, gen, magnitude=8.0):
    """k plus a large per-channel offset (per head), as real DiT keys have: without the smoothing mean the
    per-block amax would be set by the offset and the rest quantized to a few levels."""
    batch, heads, _, head_dim = k.shape
    offset = magnitude * torch.randn(batch, heads, 1, head_dim, generator=gen)
    return (k.float() + offset.to(k.device)).to(k.dtype)


def emulate(q, k, v, state, threshold, must_do=None, must_skip=None, scale=None):
    """The INT8 emulation (reference.sparse_attention_reference) on the kernel's own smoothing mean: the
    pre-pass may round a channel whose exact mean lies at a tie of k's dtype the other way (check_mean_ties),
    and every k8 of that channel follows its mean, so the emulation with the other mean would be a different
    quantization (on the H200: LSE rows 1e-2 apart, fp16 outlier K, test_skip_decisions_over_calls)."""
    mu = _int8().prepass(q, k).quantized.mu
    return reference.sparse_attention_reference(q, k, v, state, threshold, must_do, must_skip, scale,
                                                use_int8=True, int8_mean=mu)


def check_lse_vs_emulation(lse, ref_lse, q, k, atol=5e-3):
    """The kernel's LSE is the emulation's (`emulate`, on the kernel's mean): both are the true LSE, the
    smoothing's per-row constant scale * q[i] . mu added back (README, INT8 Q/K mode); a kernel that leaves
    the correction out fails. Per row the tolerance adds to `atol` the exponent's bound: the kernel takes it as
    one FFMA, f * c + (-(kMagic * c) - row_max) with f = kMagic + x (csrc/int8_scores.cuh), so each P is off
    by up to ulp(kMagic * c) / 2 log2 units, for the largest c = q_scale * k_scale * scale * log2 e of the call.
    Typical rows differ by 2-5e-5; every row must be within the tolerance."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    quantized = _int8().prepass(q, k).quantized   # the scales the kernel used (the emulation's, on its mean)
    scales = [s[torch.isfinite(s)] for s in (quantized.q_scale, quantized.k_scale)]
    c = float(scales[0].max() * scales[1].max()) * scale / math.log(2) if all(s.numel() for s in scales) else 0.0
    exponent_bound = 0.5 * 2.0 ** (math.floor(math.log2(1.5 * 2 ** 23 * c)) - 23) * math.log(2) if c > 0 else 0.0
    assert_lse_close(lse, ref_lse, atol=2e-2)  # shapes, empty rows, finiteness, and the cap
    got, want = lse.detach().float().cpu(), ref_lse.detach().float().cpu()
    finite = torch.isfinite(want)
    tolerance = atol + exponent_bound + 1e-6 * want.abs()
    over = ((got - want).abs() > tolerance) & finite
    assert not over.any(), (
        f"{int(over.sum())} of {int(finite.sum())} LSE rows differ from the emulation beyond the tolerance "
        f"(worst {float((got - want)[finite].abs().max()):.3g})")


def check_int8(q, k, v, state=None, threshold=None, must_do=None, must_skip=None, tol_float32=TOL_FLOAT32):
    """Kernel vs the INT8 emulation (outputs, LSE, new state) and, for the dense path, vs float32 attention.
    Returns (out, lse, kernel_state, emulated_state)."""
    dense = state is None
    if dense:
        state = new_state(q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.shape[3], q.dtype, q.device)
        threshold = torch.full((q.shape[1],), -math.inf, device=q.device)
    ref_out, ref_lse, ref_state = emulate(q, k, v, state, threshold, must_do, must_skip)
    kernel_state = None if dense else state.clone()
    out, lse = run_int8(q, k, v, kernel_state, None if dense else threshold, must_do, must_skip)
    torch.cuda.synchronize()
    assert rel_err(out, ref_out) <= TOL_EMULATION, "out differs from the INT8 emulation"
    check_lse_vs_emulation(lse, ref_lse, q, k)
    if dense:
        f_out, f_lse = float32_reference(q, k, v)
        err_out, err_lse = rel_err(out, f_out), rel_err(lse, f_lse)
        assert err_out <= tol_float32 and err_lse <= tol_float32, f"vs float32: out {err_out:.2e}, lse {err_lse:.2e}"
    return out, lse, kernel_state, ref_state


# --------------------------------------------------------------------------------------------
# The pre-pass
# --------------------------------------------------------------------------------------------

def check_mean_ties(mu, want, k):
    """mu (the kernel's) equals want (the emulation's) except where the exact mean lies at a rounding tie of
    k's dtype: there the two float32 sums (different summation orders) may round to neighbouring values. Such
    a channel must differ by one step of the dtype, and the exact (float64) mean must lie within float32
    summation error (3e-5 of the mean |k|) of the midpoint between the two."""
    differ = ~((mu == want) | (torch.isnan(mu) & torch.isnan(want)))
    if not differ.any():
        return 0
    bits_got, bits_want = (t[differ].to(k.dtype).view(torch.int16).int() for t in (mu, want))
    assert ((bits_got - bits_want).abs() <= 1).all(), "the mean differs by more than one step of the dtype"
    kd = k.double().cpu()
    exact = kd.mean(dim=2)[differ]
    spread = kd.abs().mean(dim=2)[differ]
    midpoint = (mu[differ].double() + want[differ].double()) / 2
    assert ((exact - midpoint).abs() <= 3e-5 * spread).all(), "a mean differs where it is not at a rounding tie"
    return int(differ.sum())


def check_prepass(q, k):
    """The pre-pass buffers equal the CPU emulation bit for bit, except the mean at rounding ties
    (check_mean_ties); k8 / k_scale are checked against the emulation run with the kernel's mean."""
    got = _int8().quantize(q, k)
    torch.cuda.synchronize()
    qc, kc = q.cpu(), k.cpu()
    block_m, block_n = liteattn_ops.tile_shape(q.shape[-1], q.dtype)
    want = quant.quantize_qk(qc, kc, (block_m, block_n))
    mu = got.mu.cpu()
    ties = check_mean_ties(mu, want.mu, kc)
    if ties:
        print(f"{ties} of {mu.numel()} mean channels round the other way at a tie")
    assert torch.equal(got.q8.cpu(), want.q8), "q8 differs"
    torch.testing.assert_close(got.q_scale.cpu(), want.q_scale, rtol=0, atol=0, equal_nan=True)
    k8, k_scale = quant.quantize_blocks(kc.float() - mu[:, :, None, :], block_n)
    assert torch.equal(got.k8.cpu(), k8), "k8 differs"
    torch.testing.assert_close(got.k_scale.cpu(), k_scale, rtol=0, atol=0, equal_nan=True)
    assert got.q8.is_contiguous() and got.k8.is_contiguous()
    return got, want


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("seqlen_q,seqlen_k", [(1, 1), (129, 1000), (1000, 129), (4100, 4100), (77, 33000)])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_prepass_matches_emulation(dtype, head_dim, seqlen_q, seqlen_k, layout):
    q, k, _ = _qkv(2, 3, seqlen_q, seqlen_k, head_dim, dtype, layout, seed=seqlen_q + seqlen_k)
    check_prepass(q, k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_prepass_outliers_and_special_blocks(dtype, head_dim):
    """K with large per-channel means; an all-zero Q block and K block (scale 0, int8 0); an inf in one q block
    and a NaN in one k row (scale NaN, int8 0; the NaN makes the whole head's mean NaN)."""
    gen = torch.Generator().manual_seed(head_dim)
    batch, heads, seqlen = 2, 2, 1000
    block_m, block_n = liteattn_ops.tile_shape(head_dim, dtype)
    q, k, _ = _qkv(batch, heads, seqlen, seqlen, head_dim, dtype, "bshd", seed=1)
    k = outlier_k(k, gen)
    q[0, 0, :block_m] = 0
    q[1, 0, block_m + 3, 5] = math.inf
    k[1, 1, 17, 2] = math.nan
    got, want = check_prepass(q, k)
    assert (got.q_scale[0, 0, 0] == 0).item() and not got.q8[0, 0, :block_m].any()
    assert torch.isnan(got.q_scale[1, 0, 1]).item() and not got.q8[1, 0, block_m:2 * block_m].any()
    assert torch.isnan(got.k_scale[1, 1]).all().item() and not got.k8[1, 1].any()
    # A K block that is zero after smoothing: k constant over the sequence equals its mean.
    k2 = torch.ones_like(k) * 0.5
    got2, _ = check_prepass(q, k2)
    assert (got2.k_scale == 0).all().item() and not got2.k8.any()


# --------------------------------------------------------------------------------------------
# The kernel: accuracy
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("seqlen", [1, 129, 1000, 4100])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_dense_normal_inputs(dtype, head_dim, seqlen, layout):
    q, k, v = _qkv(2, 3, seqlen, seqlen, head_dim, dtype, layout, seed=seqlen)
    check_int8(q, k, v)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("seqlen_q,seqlen_k", [(1000, 129), (77, 4096), (128, 1), (1, 300), (4096, 333)])
def test_cross_attention(dtype, head_dim, seqlen_q, seqlen_k):
    q, k, v = _qkv(2, 2, seqlen_q, seqlen_k, head_dim, dtype, "bshd", seed=seqlen_q + seqlen_k)
    check_int8(q, k, v)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_dense_local_and_outlier_inputs(dtype, head_dim):
    """Structured (3-D grid, sharp) q/k, and N(0,1) k with large per-channel means."""
    gen = torch.Generator().manual_seed(head_dim + 3)
    q, k, v = (t.to("cuda", dtype) for t in local_qkv((5, 20, 41), 2, 2, head_dim, sharpness=30.0, generator=gen))
    check_int8(q, k, v)
    q, k, v = _qkv(2, 2, 4100, 4100, head_dim, dtype, "bshd", seed=head_dim)
    check_int8(q, outlier_k(k, gen), v)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("batch,heads,tail,seqlen_k", [(2, 3, 6, 4000), (1, 2, -16, 8000)])
def test_split_tail(dtype, head_dim, batch, heads, tail, seqlen_k):
    # The dense path's split wave tail (test_kernel_cuda.test_split_tail_matches_reference) in INT8 mode, through
    # the op's launch (which allocates the scratch); the merged LSE carries the smoothing's correction.
    seqlen_q, _ = _split_tail_shape(head_dim, dtype, batch, heads, tail, seqlen_k)
    if _ext().dense_split_workspace_floats(batch, heads, seqlen_q, seqlen_k, head_dim,
                                           str(dtype).removeprefix("torch."), True) == 0:
        pytest.skip("this build's default variant does not split the tail")
    q, k, v = _qkv(batch, heads, seqlen_q, seqlen_k, head_dim, dtype, "bshd", seed=seqlen_k - tail)
    check_int8(q, k, v)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_skip_split_tail_equals_unsplit(dtype, head_dim):
    # The skip path's split tail in INT8 mode (test_kernel_cuda's twin), through the op's launch: two calls on
    # structured inputs with finite thresholds, the new state bit for bit the unsplit kernel's (whose vote sits in
    # the softmax in this mode, not one tile late), outputs within rounding.
    case = _skip_split_case(head_dim, dtype, 1)
    if case is None or _ext().skip_split_workspace_floats(1, case[0], 255 * case[1][0], 255 * case[1][0], head_dim,
                                                          str(dtype).removeprefix("torch."), True) == 0:
        pytest.skip("this build's default variant does not split the skip path's tail")
    heads, grid = case
    gen = torch.Generator().manual_seed(head_dim)
    q, k, v = (t.to("cuda", dtype) for t in local_qkv(grid, 1, heads, head_dim, generator=gen))
    state = new_state(1, heads, q.shape[2], k.shape[2], head_dim, dtype, "cuda")
    threshold = torch.tensor([-3.0, -8.0, -math.inf, -5.0, -12.0, -6.0][:heads], device="cuda")
    split_state, unsplit_state = state.clone(), state.clone()
    for _ in range(2):
        out, lse = run_int8(q, k, v, split_state, threshold)
        ref_out, ref_lse = run_int8(q, k, v, unsplit_state, threshold, split_tail=False)
        torch.cuda.synchronize()
        assert torch.equal(split_state, unsplit_state)
        assert rel_err(out, ref_out) <= TOL_EMULATION and rel_err(lse, ref_lse) <= TOL_EMULATION
    assert not torch.equal(split_state, state)


@pytest.mark.parametrize("dtype,head_dim", [(torch.bfloat16, 128), (torch.float16, 64)])
def test_dense_long_sequence(dtype, head_dim):
    q, k, v = _qkv(1, 2, 32760, 32760, head_dim, dtype, "bshd", seed=1)
    out, lse = run_int8(q, k, v)
    f_out, f_lse = float32_reference(q, k, v)
    assert rel_err(out, f_out) <= TOL_FLOAT32 and rel_err(lse, f_lse) <= TOL_FLOAT32


def test_non_finite_block_gives_nan_rows():
    """An inf in one q block makes that block's scale NaN: its rows' outputs are NaN (as the 16-bit path's
    for a NaN score), every other row is as the emulation; the skip vote keeps every tile of that row."""
    head_dim, dtype = 128, torch.bfloat16
    block_m, _ = liteattn_ops.tile_shape(head_dim, dtype)
    q, k, v = _qkv(1, 2, 1000, 1000, head_dim, dtype, seed=4)
    q[0, 1, block_m + 7, 3] = math.inf
    state = new_state(1, 2, 1000, 1000, head_dim, dtype, "cuda")
    threshold = torch.full((2,), 0.0, device="cuda")
    ref_out, _, ref_state = emulate(q, k, v, state, threshold)
    out, _ = run_int8(q, k, v, state, threshold)
    torch.cuda.synchronize()
    bad = torch.zeros(1, 2, 1000, dtype=torch.bool, device="cuda")
    bad[0, 1, block_m:2 * block_m] = True
    assert torch.isnan(out[bad]).all() and torch.isnan(ref_out[bad]).all()
    good = ~bad
    assert rel_err(out[good], ref_out[good]) <= TOL_EMULATION
    assert live_mask(state, 1000, head_dim, dtype)[0, 1, 1].all(), "a NaN-scale row must keep every tile"
    assert (live_mask(state, 1000, head_dim, dtype) != live_mask(ref_state, 1000, head_dim, dtype)).float().mean() <= 2e-3


# --------------------------------------------------------------------------------------------
# The kernel: skip path
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_state_all_live_equals_dense(dtype, head_dim):
    q, k, v = _qkv(2, 2, 1000, 1000, head_dim, dtype, seed=3)
    state = new_state(2, 2, 1000, 1000, head_dim, dtype, "cuda")
    before = state.clone()
    out_sparse, lse_sparse = run_int8(q, k, v, state, torch.full((2,), -math.inf, device="cuda"), split_tail=False)
    out_dense, lse_dense = run_int8(q, k, v, split_tail=False)  # the same loop (test_kernel_cuda's twin)
    assert torch.equal(out_sparse, out_dense) and torch.equal(lse_sparse, lse_dense)
    assert torch.equal(state, before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("inputs", ["local", "outlier"])
def test_skip_decisions_over_calls(dtype, head_dim, inputs):
    """Structured (local) attention over 8 consecutive calls with per-head thresholds: the kernel's new state
    equals the INT8 emulation's from the same old state (the scores are the same bits; only a mean rounding
    at a tie could differ), with tiles really dropped; outputs equal the emulation on the kernel's live set."""
    grid = (8, 16, 16)  # 2048 tokens
    batch, heads = 2, 4
    gen = torch.Generator().manual_seed(head_dim)
    q0, k0, v0 = local_qkv(grid, batch, heads, head_dim, sharpness=40.0, dtype=torch.float32, generator=gen)
    if inputs == "outlier":
        k0 = k0 + 4.0 * torch.randn(batch, heads, 1, head_dim, generator=gen)
    threshold = torch.tensor([-4.0, -8.0, -14.0, -math.inf], device="cuda")
    state = new_state(batch, heads, q0.shape[2], k0.shape[2], head_dim, dtype, "cuda")
    disagreements = total = 0
    for step in range(8):
        noise = 0.02 * step
        q, k, v = ((t + noise * torch.randn(t.shape, generator=gen)).to("cuda", dtype) for t in (q0, k0, v0))
        _, _, kernel_state, ref_state = check_int8(q, k, v, state, threshold)
        kernel_live = live_mask(kernel_state, k.shape[2], head_dim, dtype)
        ref_live = live_mask(ref_state, k.shape[2], head_dim, dtype)
        disagreements += (kernel_live != ref_live).sum().item()
        total += kernel_live.numel()
        state = kernel_state
    live = live_mask(state, k0.shape[2], head_dim, dtype).float()
    assert live[:, 3].all(), "thr = -inf must never remove a tile"
    assert live[:, :3].mean() < 0.9, "structured inputs should let tiles be skipped"
    print(f"INT8 skip decisions: {disagreements} / {total} tiles disagree ({100 * disagreements / total:.4f} %)")
    assert disagreements <= 0.002 * total


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("seqlen_q,seqlen_k", [(1000, 4100), (300, 129)])
def test_forced_live_sets(head_dim, seqlen_q, seqlen_k):
    """Random live sets per row, from none to all, thr = -inf: the output is the emulation's on that set; q and
    k blocks are scaled by factors 1/4..4, so a k_scale applied to the wrong tile would show; rows with nothing
    live give O = 0, LSE = -inf."""
    batch, heads, dtype = 2, 3, torch.bfloat16
    q, k, v = _qkv(batch, heads, seqlen_q, seqlen_k, head_dim, dtype, "bshd", seed=seqlen_q + head_dim)
    block_m, block_n = liteattn_ops.tile_shape(head_dim, dtype)
    m_tiles, n_tiles = -(-seqlen_q // block_m), -(-seqlen_k // block_n)
    gen = torch.Generator().manual_seed(seqlen_k)
    for t, block, tiles in ((q, block_m, m_tiles), (k, block_n, n_tiles)):
        factor = torch.exp2(torch.rand(tiles, generator=gen) * 4 - 2).repeat_interleave(block)[:t.shape[2]]
        t.copy_((t.float() * factor.to("cuda")[:, None]).to(dtype))
    fraction = torch.tensor([0.0, 1 / n_tiles, 0.25, 0.5, 0.75, 1.0])[torch.randint(0, 6, (batch, heads, m_tiles, 1),
                                                                                   generator=gen)]
    live = torch.rand(batch, heads, m_tiles, n_tiles, generator=gen) < fraction
    live[..., 0, :] = False
    state = pack_bits(live).to("cuda")
    threshold = torch.full((heads,), -math.inf, device="cuda")
    out, lse, kernel_state, ref_state = check_int8(q, k, v, state, threshold)
    assert torch.equal(kernel_state, state) and torch.equal(ref_state, state)
    assert torch.isneginf(lse[..., :block_m]).all() and (out[..., :block_m, :] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_must_do_and_must_skip(dtype, head_dim):
    batch, heads, seqlen = 2, 3, 1500
    gen = torch.Generator().manual_seed(7)
    q, k, v = (t.to("cuda", dtype) for t in local_qkv((6, 10, 25), batch, heads, head_dim, generator=gen))
    state = new_state(batch, heads, seqlen, seqlen, head_dim, dtype, "cuda")
    state[:, :, :, 0] &= 0x5555_5555
    threshold = torch.full((heads,), -6.0, device="cuda")
    must_do = torch.tensor([[0, 10], [700, 701], [-50, 3], [1490, 5000], [900, 800]], device="cuda")
    must_skip = torch.tensor([[128, 640], [650, 1100], [-10, -1], [1400, 99999], [700, 900]], device="cuda")
    _, block_n = liteattn_ops.tile_shape(head_dim, dtype)
    do_tiles = reference.range_tiles(must_do, seqlen, block_n, inside=False)
    skip_tiles = reference.range_tiles(must_skip, seqlen, block_n, inside=True) & ~do_tiles
    for _ in range(3):
        _, _, kernel_state, ref_state = check_int8(q, k, v, state, threshold, must_do, must_skip)
        kernel_live = live_mask(kernel_state, seqlen, head_dim, dtype)
        ref_live = live_mask(ref_state, seqlen, head_dim, dtype)
        assert kernel_live[..., do_tiles.cuda()].all() and not kernel_live[..., skip_tiles.cuda()].any()
        assert (kernel_live != ref_live).float().mean() <= 0.002
        state = kernel_state


def test_schedule_order_free():
    """The device query-tile schedule changes nothing (bitwise) in INT8 mode, finite thresholds."""
    head_dim, dtype = 128, torch.bfloat16
    gen = torch.Generator().manual_seed(5)
    q, k, v = (t.to("cuda", dtype) for t in local_qkv((6, 20, 25), 2, 3, head_dim, generator=gen))
    seqlen = q.shape[2]
    block_m, block_n = liteattn_ops.tile_shape(head_dim, dtype)
    live = torch.rand(2, 3, -(-seqlen // block_m), -(-seqlen // block_n), generator=gen) < 0.6
    state = pack_bits(live).to("cuda")
    threshold = torch.tensor([-3.0, -8.0, -5.0], device="cuda")
    state_lpt, state_natural = state.clone(), state.clone()
    # Without the split tail, which cuts other rows in the two orders (the states would still agree bit for bit).
    out_lpt, lse_lpt = run_int8(q, k, v, state_lpt, threshold, schedule=True, split_tail=False)
    out_nat, lse_nat = run_int8(q, k, v, state_natural, threshold, schedule=False, split_tail=False)
    torch.cuda.synchronize()
    assert torch.equal(out_lpt, out_nat) and torch.equal(lse_lpt, lse_nat) and torch.equal(state_lpt, state_natural)
    assert not torch.equal(state_lpt, state), "finite thresholds should drop tiles here"


# --------------------------------------------------------------------------------------------
# Integration: the op, CUDA graphs
# --------------------------------------------------------------------------------------------

def test_launch_int8_matches_op_and_mutates_state():
    """launch_int8 (what the op calls with use_int8=True) updates the state in place like the 16-bit op."""
    head_dim, dtype = 64, torch.bfloat16
    gen = torch.Generator().manual_seed(11)
    q, k, v = (t.to("cuda", dtype) for t in local_qkv((4, 16, 16), 2, 3, head_dim, generator=gen))
    state = new_state(2, 3, q.shape[2], k.shape[2], head_dim, dtype, "cuda")
    threshold = torch.tensor([-math.inf, -10.0, -4.0], device="cuda")
    for _ in range(3):
        ref_out, ref_lse, ref_state = emulate(q, k, v, state, threshold)
        out, lse = _int8().launch_int8(q, k, v, state, threshold, None, None, None)
        assert rel_err(out, ref_out) <= TOL_EMULATION
        check_lse_vs_emulation(lse, ref_lse, q, k)
        assert torch.equal(state, ref_state) or (live_mask(state, k.shape[2], head_dim, dtype) !=
                                                 live_mask(ref_state, k.shape[2], head_dim, dtype)).float().mean() <= 2e-3
    out_op, _ = torch.ops.liteattn.attention(q, k, v, None, True)
    out_direct, _ = _int8().launch_int8(q, k, v, None, None, None, None, None)
    assert torch.equal(out_op, out_direct)


@pytest.mark.parametrize("through_op", [False, True])
def test_cuda_graph_capture(through_op):
    """No host synchronisation: pre-pass + kernel capture into a CUDA graph and replay."""
    q, k, v = _qkv(1, 2, 1000, 1000, 64, torch.bfloat16, seed=5)
    state = new_state(1, 2, 1000, 1000, 64, torch.bfloat16, "cuda")
    threshold = torch.full((2,), -8.0, device="cuda")

    def call():
        if through_op:
            return torch.ops.liteattn.sparse_attention(q, k, v, state, threshold, None, None, None, True)
        return _int8().launch_int8(q, k, v, state, threshold, None, None, None)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    state.fill_(-1)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = call()
    state.fill_(-1)
    graph.replay()
    torch.cuda.synchronize()
    fresh = new_state(1, 2, 1000, 1000, 64, torch.bfloat16, "cuda")
    ref_out, _, ref_state = emulate(q, k, v, fresh, threshold)
    assert rel_err(out, ref_out) <= TOL_EMULATION
    assert (live_mask(state, 1000, 64, torch.bfloat16) != live_mask(ref_state, 1000, 64, torch.bfloat16)
            ).float().mean() <= 2e-3


def test_bad_inputs_raise():
    ext = _int8()._int8_extension()
    q, k, _ = _qkv(1, 2, 256, 256, 128, torch.bfloat16)
    q8 = torch.empty(1, 2, 256, 128, dtype=torch.int8, device="cuda")
    scales = torch.empty(1, 2, 2, device="cuda")
    mu = torch.empty(1, 2, 128, device="cuda")
    q_mu = torch.empty(1, 2, 256, device="cuda")
    partial = torch.empty(1, 2, ext.INT8_MEAN_MAX_SPLITS, 128, device="cuda")
    odd = torch.randn(1, 2, 256, 130, device="cuda", dtype=q.dtype)[..., :128]
    with pytest.raises(ValueError, match="16-byte aligned"):
        ext.quantize_qk(q=q.data_ptr(), k=odd.data_ptr(), batch=1, heads=2, seqlen_q=256, seqlen_k=256, head_dim=128,
                        dtype="bfloat16", q_stride=q.stride()[:3], k_stride=odd.stride()[:3], q8=q8.data_ptr(),
                        k8=q8.data_ptr(), q_scale=scales.data_ptr(), k_scale=scales.data_ptr(), k_mean=mu.data_ptr(),
                        q_mu=q_mu.data_ptr(), partial=partial.data_ptr(), stream=torch.cuda.current_stream().cuda_stream)
    out = torch.empty(1, 256, 2, 128, device="cuda", dtype=q.dtype).transpose(1, 2)
    lse = torch.empty(1, 2, 256, device="cuda")
    with pytest.raises(ValueError, match="q_scale, k_scale and q_mu"):
        ext.forward(q=q8.data_ptr(), k=q8.data_ptr(), v=k.data_ptr(), out=out.data_ptr(), lse=lse.data_ptr(),
                    batch=1, heads=2, seqlen_q=256, seqlen_k=256, head_dim=128, dtype="bfloat16",
                    q_stride=q8.stride()[:3], k_stride=q8.stride()[:3], v_stride=k.stride()[:3],
                    out_stride=out.stride()[:3], scale=0.1, state=0, threshold=0, must_do=0, num_must_do=0,
                    must_skip=0, num_must_skip=0, stream=torch.cuda.current_stream().cuda_stream, int8=True)
    # The op path copies a TMA-incompatible k before the pre-pass.
    out, _ = _int8().launch_int8(q, odd, k, None, None, None, None, None)
    ref, _ = reference.attention_reference(q, odd, k, use_int8=True)
    assert rel_err(out, ref) <= TOL_EMULATION
