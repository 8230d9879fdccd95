"""INT8 Q/K mode (issue 12) on CPU: the vectorised emulation (liteattn_ops.core.quant) against a
literal per-block reading of the spec, accuracy against float32 (with and without K smoothing),
skipping, opcheck, torch.compile, torch.export, bad input."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import liteattn_ops
from liteattn_ops.compile import graph_pass
from liteattn_ops.core import quant, reference
from liteattn_ops.core.state import live_mask, new_state
from liteattn_ops.testing import local_qkv

LOG2E = math.log2(math.e)
sparse_attention = torch.ops.liteattn.sparse_attention
attention = torch.ops.liteattn.attention


# ------------------------------------------------------------------------------------------------
# A literal reading of the spec: one (b, h, block) at a time, numpy float32 scalars
# ------------------------------------------------------------------------------------------------

def literal_mean(k: torch.Tensor) -> np.ndarray:
    batch, heads, seqlen_k, head_dim = k.shape
    mu = np.zeros((batch, heads, head_dim), np.float32)
    for b in range(batch):
        for h in range(heads):
            mean = k[b, h].float().numpy().sum(0, dtype=np.float32) / np.float32(seqlen_k)
            mu[b, h] = torch.from_numpy(mean).to(k.dtype).float().numpy()
    return mu


def literal_block(x: np.ndarray):
    """int8 values and scale of one block (rows, D) of float32 values."""
    amax = np.abs(x).max()
    if not np.isfinite(amax):
        return np.zeros(x.shape, np.int8), np.float32(np.nan)
    if amax == 0:
        return np.zeros(x.shape, np.int8), np.float32(0)
    inv = np.float32(127) / amax
    x8 = np.clip(np.rint(x * inv), -127, 127).astype(np.int8)
    return x8, amax / np.float32(127)


def literal_quantize(q: torch.Tensor, k: torch.Tensor, mu: np.ndarray, tile):
    (batch, heads, seqlen_q, head_dim), seqlen_k = q.shape, k.shape[2]
    bm, bn = tile
    q8, k8 = np.zeros(q.shape, np.int8), np.zeros(k.shape, np.int8)
    q_scale = np.zeros((batch, heads, math.ceil(seqlen_q / bm)), np.float32)
    k_scale = np.zeros((batch, heads, math.ceil(seqlen_k / bn)), np.float32)
    for b in range(batch):
        for h in range(heads):
            qf, ks = q[b, h].float().numpy(), k[b, h].float().numpy() - mu[b, h]
            for m in range(q_scale.shape[2]):
                q8[b, h, m * bm:(m + 1) * bm], q_scale[b, h, m] = literal_block(qf[m * bm:(m + 1) * bm])
            for n in range(k_scale.shape[2]):
                k8[b, h, n * bn:(n + 1) * bn], k_scale[b, h, n] = literal_block(ks[n * bn:(n + 1) * bn])
    return q8, q_scale, k8, k_scale


def kernel_scale_log2(scale: float) -> np.float32:
    """Params.scale_log2 as the kernel computes it: bindings.cpp takes `float scale` (pybind11 casts the
    Python float to float), fwd_launch.cuh does `static_cast<float>(double(a.scale) * log2e)` with
    `const double log2e = 1.0 / std::log(2.0)`."""
    scale_f32 = np.float32(scale)
    log2e = np.float64(1.0) / np.log(np.float64(2.0))
    return np.float32(np.float64(scale_f32) * log2e)


def literal_query_mean_dots(q: torch.Tensor, mu: np.ndarray) -> np.ndarray:
    """q[i] . mu as int8_prepass.cu's quantize_kernel computes it: per group of 8 channels an fmaf chain
    from 0 (emulated: the float32 product exact in float64, one rounding to float32), then the groups'
    sums added by the xor-shuffle butterfly (lanes 1, 2, 4, ...), one group per lane."""
    qf = q.float().numpy()
    batch, heads, seqlen, head_dim = qf.shape
    groups = head_dim // 8
    out = np.zeros((batch, heads, seqlen), np.float32)
    for b in range(batch):
        for h in range(heads):
            lane = np.zeros((seqlen, groups), np.float32)
            for g in range(groups):
                dot = np.zeros(seqlen, np.float32)
                for j in range(8):
                    c = 8 * g + j
                    dot = (qf[b, h, :, c].astype(np.float64) * np.float64(mu[b, h, c]) + dot.astype(np.float64)).astype(np.float32)
                lane[:, g] = dot
            step = 1
            while step < groups:   # dot += __shfl_xor_sync(dot, step): every lane l gets lane[l] + lane[l ^ step]
                lane = lane + lane[:, np.arange(groups) ^ step]
                step *= 2
            out[b, h] = lane[:, 0]
    return out


def literal_scores(q8, q_scale, k8, k_scale, scale, tile) -> np.ndarray:
    """float32 (B, H, S_q, S_k) log2-unit scores, one (query block, key block) at a time."""
    bm, bn = tile
    scale_log2 = kernel_scale_log2(scale)
    batch, heads, seqlen_q, _ = q8.shape
    out = np.zeros((batch, heads, seqlen_q, k8.shape[2]), np.float32)
    for b in range(batch):
        for h in range(heads):
            for m in range(q_scale.shape[2]):
                for n in range(k_scale.shape[2]):
                    rows, cols = slice(m * bm, (m + 1) * bm), slice(n * bn, (n + 1) * bn)
                    dot = q8[b, h, rows].astype(np.int32) @ k8[b, h, cols].astype(np.int32).T   # exact
                    c = (q_scale[b, h, m] * k_scale[b, h, n]) * scale_log2
                    out[b, h, rows, cols] = dot.astype(np.float32) * c
    return out


def _inputs(batch, heads, seqlen_q, seqlen_k, head_dim, dtype, seed=0):
    """Random q, k, v with rows of different magnitudes (so block scales differ) and a per-channel
    offset in k (so the smoothing matters)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seqlen_q, head_dim, generator=g) * torch.rand(batch, heads, seqlen_q, 1, generator=g) * 3
    k = torch.randn(batch, heads, seqlen_k, head_dim, generator=g) + 5 * torch.randn(batch, heads, 1, head_dim, generator=g)
    v = torch.randn(batch, heads, seqlen_k, head_dim, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _equal(a: torch.Tensor, b: np.ndarray) -> bool:
    return torch.equal(a.isnan(), torch.from_numpy(np.isnan(b))) and torch.equal(a.nan_to_num(), torch.from_numpy(b).nan_to_num())


@pytest.mark.parametrize("batch,heads,seqlen_q,seqlen_k,head_dim,dtype,scale", [
    (1, 2, 200, 200, 64, torch.float32, None),       # lengths not a multiple of BM / BN
    (2, 2, 129, 300, 128, torch.bfloat16, 0.3),     # cross-attention, batch 2
    (2, 1, 400, 77, 64, torch.float16, None),       # S_q > S_k, one partial key block
    (1, 1, 1, 1, 128, torch.bfloat16, None),
])
def test_emulation_equals_a_literal_per_block_loop(batch, heads, seqlen_q, seqlen_k, head_dim, dtype, scale):
    q, k, _ = _inputs(batch, heads, seqlen_q, seqlen_k, head_dim, dtype)
    tile = liteattn_ops.tile_shape(head_dim, dtype)
    got = quant.quantize_qk(q, k)
    assert got.q8.dtype == got.k8.dtype == torch.int8 and got.q8.shape == q.shape and got.k8.shape == k.shape
    assert got.q_scale.shape == (batch, heads, math.ceil(seqlen_q / tile[0]))
    assert got.k_scale.shape == (batch, heads, math.ceil(seqlen_k / tile[1]))
    # The mean's summation order is not part of the spec (numpy's pairwise sum here): rounded to a
    # 16-bit dtype the two agree (barring a rounding tie); in float32 they agree to an ulp or so.
    mu = literal_mean(k)
    if dtype == torch.float32:
        np.testing.assert_allclose(got.mu.numpy(), mu, rtol=1e-6, atol=1e-6)
        mu = got.mu.numpy()
    else:
        assert _equal(got.mu, mu)
    q8, q_scale, k8, k_scale = literal_quantize(q, k, mu, tile)
    assert torch.equal(got.q8, torch.from_numpy(q8)) and torch.equal(got.k8, torch.from_numpy(k8))
    assert _equal(got.q_scale, q_scale) and _equal(got.k_scale, k_scale)
    assert int(got.q8.abs().max()) == 127
    # (one key row: k minus its mean is 0, a block of zeros)
    assert int(got.k8.abs().max()) == (127 if seqlen_k > 1 else 0)
    softmax_scale = 1 / math.sqrt(head_dim) if scale is None else scale
    want = literal_scores(q8, q_scale, k8, k_scale, softmax_scale, tile)
    assert _equal(quant.int8_scores(q, k, scale), want)
    # The LSE correction's q . mu, in the pre-pass's order (bit for bit barring fma double-rounding ties).
    assert _equal(quant.query_mean_dots(q, got.mu), literal_query_mean_dots(q, got.mu.numpy()))
    # A given mean (the kernel's, when it rounds a channel the other way at a tie) is the one quantized with,
    # and in the emulation the LSE correction follows it.
    other = got.mu.clone()
    other[..., 0] += 0.25
    moved = quant.quantize_qk(q, k, mu=other)
    q8, q_scale, k8, k_scale = literal_quantize(q, k, other.numpy(), tile)
    assert torch.equal(moved.mu, other) and torch.equal(moved.k8, torch.from_numpy(k8))
    assert _equal(moved.k_scale, k_scale) and torch.equal(moved.q8, got.q8)
    if seqlen_k > 1:
        _, lse_own, _ = reference.sparse_attention_reference(q, k, k, new_state(batch, heads, seqlen_q, seqlen_k,
                                                             head_dim, q.dtype, "cpu"), torch.full((heads,), -math.inf),
                                                             scale=scale, use_int8=True, int8_mean=other)
        _, lse = reference.attention_reference(q, k, k, scale, use_int8=True)
        assert not torch.equal(lse_own, lse)          # the other quantization, not the default mean's
        assert (lse_own - lse).abs().max() < 0.5      # both are the true LSE up to quantization error


def test_scale_log2_is_the_kernels():
    """quant.scale_log2 reproduces the kernel's float32(double(float32(scale)) * log2e) exactly, on random
    scales (for about a quarter of them it differs by an ulp from float32(double(scale) * log2e))."""
    rng = np.random.default_rng(12)
    scales = np.concatenate([rng.uniform(0.01, 2.0, 2000), 10.0 ** rng.uniform(-4, 2, 2000),
                             1 / np.sqrt(np.arange(1, 513)), [0.125, 0.3, 1.0, 1 / math.sqrt(128)]])
    got = np.array([quant.scale_log2(float(s)) for s in scales], np.float32)
    want = np.array([kernel_scale_log2(float(s)) for s in scales], np.float32)
    assert np.array_equal(got.view(np.int32), want.view(np.int32))
    rounded_in_double = (scales * LOG2E).astype(np.float32)
    assert (got != rounded_in_double).mean() > 0.1   # the test tells the two apart


def test_lse_correction_and_empty_rows():
    """The INT8 LSE is the smoothed scores' LSE plus scale * q . mu (the correction added in log2 units, as
    the kernel does), and rows with no visited tile keep -inf."""
    q, k, v = _inputs(1, 2, 300, 300, 64, torch.bfloat16, seed=3)
    bm, _ = liteattn_ops.tile_shape(64, torch.bfloat16)
    state = new_state(1, 2, 300, 300, 64, torch.bfloat16)
    state[0, 0, 0] = 0                          # query tile 0 of head 0: nothing visited
    out, lse, _ = reference.sparse_attention_reference(q, k, v, state, torch.full((2,), -math.inf), use_int8=True)
    assert bool(torch.isneginf(lse[0, 0, :bm]).all()) and bool((out[0, 0, :bm] == 0).all())
    assert bool(torch.isfinite(lse[0, 0, bm:]).all()) and bool(torch.isfinite(lse[0, 1]).all())
    scores = quant.int8_scores(q, k)                                        # log2 units, smoothed
    smoothed = torch.logsumexp(scores * math.log(2), -1)
    correction = quant.query_mean_dots(q, quant.smoothing_mean(k)) / 8       # scale = 1/sqrt(64)
    assert float(correction.abs().max()) > 1                                # _inputs' k has a large mean
    np.testing.assert_allclose(lse[0, 1].numpy(), (smoothed + correction)[0, 1].numpy(), rtol=0, atol=1e-4)


def test_zero_and_non_finite_blocks():
    """A block of zeros: scale 0, values 0. A block with an inf or NaN: scale NaN, values 0. An inf
    in k reaches every block of its (b, h) through the mean: that head's scores are all NaN, so its
    output is NaN, no tile is removed (the non-finite rule) and the other head is unaffected."""
    q, k, v = _inputs(1, 2, 500, 500, 64, torch.bfloat16)
    bm, bn = liteattn_ops.tile_shape(64, torch.bfloat16)
    q[0, 0, :bm] = 0
    q[0, 1, bm + 3, 5] = math.inf
    k[0, 1, 7, 2] = math.inf
    got = quant.quantize_qk(q, k)
    assert float(got.q_scale[0, 0, 0]) == 0 and not bool(got.q8[0, 0, :bm].any())
    assert math.isnan(float(got.q_scale[0, 1, 1])) and not bool(got.q8[0, 1, bm:2 * bm].any())
    assert bool(got.q_scale[0, 1, [0, 2]].isfinite().all())
    assert bool(got.k_scale[0, 1].isnan().all()) and bool(got.k_scale[0, 0].isfinite().all())
    state = new_state(1, 2, 500, 500, 64, torch.bfloat16)
    out, lse = sparse_attention(q, k, v, state, torch.zeros(2), use_int8=True)
    assert bool(out[0, 1].isnan().all())
    assert bool(out[0, 0].isfinite().all())
    assert bool((live_mask(state, 500, 64, torch.bfloat16)[0, 1]).all()), "a NaN score removed a tile"
    assert bool(out[0, 0, :bm].isfinite().all())   # q block of zeros: uniform attention


# ------------------------------------------------------------------------------------------------
# Accuracy
# ------------------------------------------------------------------------------------------------

def _relative_error(out, ref) -> float:
    return float((out.float() - ref).norm() / ref.norm())


def _unsmoothed_attention(q, k, v, scale=None):
    """The INT8 mode without the K smoothing (a deliberately worse variant): k quantized as it is."""
    tile = liteattn_ops.tile_shape(q.shape[-1], q.dtype)
    q8, q_scale = quant.quantize_blocks(q.float(), tile[0])
    k8, k_scale = quant.quantize_blocks(k.float(), tile[1])
    scores = quant.tile_scores(quant.QuantizedQK(q8, q_scale, k8, k_scale, None),
                               reference.resolve_scale(scale, q.shape[-1]), tile)[..., :k.shape[2]]
    return torch.softmax(scores * math.log(2), -1) @ v.float()


@pytest.mark.parametrize("dtype,head_dim", [(torch.bfloat16, 64), (torch.bfloat16, 128), (torch.float16, 64),
                                            (torch.float32, 128)])
@pytest.mark.parametrize("outliers", [False, True])
def test_accuracy_against_float32(dtype, head_dim, outliers):
    """Relative error <= 2e-2 against float32 attention on the same (rounded) inputs: N(0, 1), and K
    with outlier channels (a large per-channel mean, as real DiTs have), where the smoothing is what
    keeps the error small. The lse is the true one (the smoothing's per-row constant scale * q . mu
    added back): relative error <= 1e-3 against the float32 dense lse."""
    g = torch.Generator().manual_seed(head_dim + outliers)
    q, k, v = (torch.randn(1, 2, 300, head_dim, generator=g) for _ in range(3))
    if outliers:
        offset = 4 * torch.randn(1, 2, 1, head_dim, generator=g)
        offset[..., :4] += 20
        k = k + offset
    q, k, v = (t.to(dtype) for t in (q, k, v))
    want, want_lse = reference.attention_reference(q.float(), k.float(), v.float())
    out, lse = attention(q, k, v, use_int8=True)
    assert out.dtype == dtype
    err = _relative_error(out, want)
    assert err <= 2e-2, err
    lse_err = _relative_error(lse, want_lse)
    assert lse_err <= 1e-3, lse_err
    assert float((lse - want_lse).abs().max()) <= 2e-2
    if outliers:
        unsmoothed = _relative_error(_unsmoothed_attention(q, k, v), want)
        assert unsmoothed > 3 * err, (unsmoothed, err)


# ------------------------------------------------------------------------------------------------
# Skipping
# ------------------------------------------------------------------------------------------------

def test_skipping_on_local_inputs():
    """A denoising loop on local 3-D-grid inputs in INT8 mode: tiles are really dropped (each
    output is attention, with the int8 scores, over the tiles visited), and the decisions mostly
    agree with the bf16 mode's on the same inputs."""
    q0, k0, v0 = local_qkv((4, 12, 16), 1, 2, 64, sharpness=30.0, generator=torch.Generator().manual_seed(0))
    seqlen = q0.shape[2]
    bm, bn = liteattn_ops.tile_shape(64, torch.bfloat16)
    thr = torch.tensor([-6.0, -10.0])
    states = {mode: new_state(1, 2, seqlen, seqlen, 64, torch.bfloat16) for mode in (True, False)}
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        q, k, v = (t + 0.02 * step * torch.randn(t.shape, generator=g) for t in (q0, k0, v0))
        q, k, v = (t.bfloat16() for t in (q, k, v))
        before = live_mask(states[True], seqlen, 64, torch.bfloat16)
        out, _ = sparse_attention(q, k, v, states[True], thr, use_int8=True)
        sparse_attention(q, k, v, states[False], thr)
        # Oracle: int8 scores, masked to the visited tiles, softmax in log2 units.
        scores = quant.int8_scores(q, k)
        allowed = before.repeat_interleave(bm, 2)[:, :, :seqlen].repeat_interleave(bn, 3)[..., :seqlen]
        want = torch.softmax(scores.masked_fill(~allowed, -math.inf) * math.log(2), -1) @ v.float()
        torch.testing.assert_close(out.float(), want, atol=1e-2, rtol=1e-2)
    live8, live16 = (live_mask(states[m], seqlen, 64, torch.bfloat16) for m in (True, False))
    assert float(live8.float().mean()) < 0.75, "INT8 mode dropped too few tiles"
    agree = float((live8 == live16).float().mean())
    assert agree >= 0.9, f"INT8 and bf16 decisions agree on only {agree:.1%} of tiles"


# ------------------------------------------------------------------------------------------------
# The ops: opcheck, entry points, modules
# ------------------------------------------------------------------------------------------------

def test_opcheck():
    q, k, v = _inputs(1, 1, 150, 150, 64, torch.bfloat16)
    state = new_state(1, 1, 150, 150, 64, torch.bfloat16)
    torch.library.opcheck(sparse_attention.default, (q, k, v, state, torch.full((1,), -2.0), torch.tensor([[0, 10]]),
                                                     None, 0.2, True))
    torch.library.opcheck(attention.default, (q, k, v, None, True))


def test_modes_differ_and_the_default_is_bf16_mode():
    q, k, v = _inputs(1, 2, 300, 300, 64, torch.float32)
    dense, _ = attention(q, k, v)
    int8, _ = attention(q, k, v, None, True)
    assert torch.equal(dense, reference.attention_reference(q, k, v)[0])
    assert torch.equal(int8, reference.attention_reference(q, k, v, use_int8=True)[0])
    assert not torch.equal(dense, int8)
    state = new_state(1, 2, 300, 300, 64, torch.float32)
    out, _ = liteattn_ops.ops.sparse_attention(q, k, v, state, torch.full((2,), -math.inf), use_int8=True)
    assert torch.equal(out, int8)
    assert torch.equal(liteattn_ops.ops.attention(q, k, v, use_int8=True)[0], int8)


def test_modules_take_use_int8():
    q, k, v = _inputs(1, 2, 300, 300, 64, torch.float32)
    want, _ = attention(q, k, v, None, True)
    attn = liteattn_ops.LiteAttention(threshold=-math.inf, use_int8=True)
    assert torch.equal(attn(q, k, v), want) and "use_int8=True" in repr(attn)
    flash = liteattn_ops.FlashLiteAttention(threshold=-math.inf, use_int8=True)
    out = flash(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    assert torch.equal(out.transpose(1, 2), want)


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_bad_use_int8_raises_type_error(bad):
    q, k, v = _inputs(1, 2, 100, 100, 64, torch.float32)
    state = new_state(1, 2, 100, 100, 64, torch.float32)
    with pytest.raises(TypeError, match="use_int8"):
        liteattn_ops.ops.sparse_attention(q, k, v, state, torch.zeros(2), use_int8=bad)
    with pytest.raises(TypeError, match="use_int8"):
        liteattn_ops.ops.attention(q, k, v, use_int8=bad)
    if isinstance(bad, str):   # PyTorch's schema parser (it takes 1 and None for a bool)
        with pytest.raises(RuntimeError, match="use_int8"):
            sparse_attention(q, k, v, state, torch.zeros(2), None, None, None, bad)
    with pytest.raises(TypeError, match="use_int8"):
        liteattn_ops.LiteAttention(use_int8=bad)
    with pytest.raises(TypeError, match="use_int8"):
        liteattn_ops.enable(_AttnModel(), use_int8=bad)
    with pytest.raises(TypeError, match="use_int8"):
        liteattn_ops.backend(use_int8=bad)
    assert bool((state == -1).all())


# ------------------------------------------------------------------------------------------------
# Model level: enable, torch.compile, torch.export
# ------------------------------------------------------------------------------------------------

DIM, HEADS, SEQ = 128, 2, 300       # head dim 64


class _AttnModel(nn.Module):
    """One self-attention with W_k = W_q, so tokens of one cluster attend to each other."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.qkv = nn.Linear(DIM, 3 * DIM, bias=False)
        with torch.no_grad():
            self.qkv.weight[DIM:2 * DIM] = self.qkv.weight[:DIM] * 1.5

    def forward(self, x):
        b, s, c = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, HEADS, c // HEADS).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, c)


def _x(step=0):
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(SEQ // 50 + 1, DIM, generator=g).repeat_interleave(50, 0)[:SEQ]
    return (torch.randn(1, SEQ, DIM, generator=g) * 0.5 + centers + 0.05 * step * torch.randn(1, SEQ, DIM, generator=g),)


def _states(model):
    return {name: t.clone() for name, site in liteattn_ops.attention_sites(getattr(model, "_orig_mod", model))
            for name, t in site.states().items()}


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_enable_use_int8_reaches_the_op_and_stats():
    model = _AttnModel().eval()
    liteattn_ops.enable(model, threshold=-math.inf, use_int8=True)
    with torch.no_grad():
        out = model(*_x())
    q, k, v = model.qkv(_x()[0]).view(1, SEQ, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4).detach()
    want = attention(q, k, v, None, True)[0].transpose(1, 2).reshape(1, SEQ, DIM)
    assert torch.equal(out, want)
    assert [s["use_int8"] for s in liteattn_ops.stats(model).values()] == [True]
    liteattn_ops.enable(model, threshold=-math.inf)            # enable again: the mode is an option too
    assert [s["use_int8"] for s in liteattn_ops.stats(model).values()] == [False]


def _run(model, steps=2):
    with torch.no_grad():
        return [model(*_x(step)) for step in range(steps)]


def test_compile_liteattn_backend_and_inductor(fresh_dynamo):
    """fullgraph under the "liteattn" backend (Inductor behind it) and under plain Inductor: the
    same outputs and skip states as eager, step after step; the generated code calls the op with
    use_int8 (the last argument) True."""
    from torch._inductor.utils import run_and_get_code
    from torch.testing import FileCheck

    eager = _AttnModel().eval()
    liteattn_ops.enable(eager, threshold=-4.0, use_int8=True)
    want = _run(eager)
    for backend in ("liteattn", "inductor"):
        torch._dynamo.reset()
        model = _AttnModel().eval()
        liteattn_ops.enable(model, threshold=-4.0, use_int8=True)
        compiled = torch.compile(model, backend=backend, fullgraph=True)
        with torch.no_grad():
            first, (code, *_) = run_and_get_code(compiled, *_x(0))
            got = [first, compiled(*_x(1))]
        FileCheck().check("torch.ops.liteattn.sparse_attention.default(").check_same(", None, True)").run(code)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        states, want_states = _states(model), _states(eager)
        assert states.keys() == want_states.keys()
        assert all(torch.equal(states[n], want_states[n]) for n in states)
        assert float(list(liteattn_ops.stats(model).values())[0]["live_fraction"]) < 1.0


def test_backend_use_int8_sets_the_mode_of_every_call(fresh_dynamo):
    """backend(use_int8=True) on a model enabled in bf16 mode: the pass puts the op in INT8 mode
    (counted), so the compiled model computes what an INT8-enabled eager model does."""
    eager = _AttnModel().eval()
    liteattn_ops.enable(eager, threshold=-4.0, use_int8=True)
    model = _AttnModel().eval()
    liteattn_ops.enable(model, threshold=-4.0)
    compiled = torch.compile(model, backend=liteattn_ops.backend(use_int8=True, inductor=False), fullgraph=True)
    for a, b in zip(_run(compiled), _run(eager)):
        assert torch.equal(a, b)
    assert counters["liteattn"]["int8"] == 1 and counters["liteattn"]["rewritten"] == 1
    assert "use_int8=True" in repr(liteattn_ops.backend(use_int8=True))


def test_export_round_trip(tmp_path):
    """liteattn_ops.export(..., use_int8=True): the record says so, the graph calls the op in INT8
    mode, and the .pt2 loaded back runs step for step as the eager INT8 model."""
    eager = _AttnModel().eval()
    liteattn_ops.enable(eager, threshold=-4.0, use_int8=True)
    want = _run(eager)
    ep = liteattn_ops.export(_AttnModel().eval(), _x(), threshold=-4.0, use_int8=True)
    meta = liteattn_ops.check_program(ep)
    assert [rec["use_int8"] for rec in meta["states"]] == [True] and len(meta["attention"]["int8"]) == 1
    nodes = [n for n in ep.graph.nodes if n.target is sparse_attention.default]
    assert len(nodes) == 1 and graph_pass.uses_int8(nodes[0])
    torch.export.save(ep, tmp_path / "int8.pt2")
    module = liteattn_ops.load(tmp_path / "int8.pt2").module()
    for a, b in zip(_run(module), want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    (got_state,) = liteattn_ops.exported_states(module).values()
    (want_state,) = _states(eager).values()
    assert torch.equal(got_state, want_state)


def test_aoti_package_in_int8_mode(tmp_path, aoti_loads):
    """An AOTInductor package of the INT8 export computes what the eager INT8 model does, step for step,
    states included, and not what the bf16 mode computes (so a package that lost the mode would fail)."""
    from test_export import _fast_cpu_configs

    eager = _AttnModel().eval()
    liteattn_ops.enable(eager, threshold=-4.0, use_int8=True)
    want = _run(eager)
    bf16 = _AttnModel().eval()
    liteattn_ops.enable(bf16, threshold=-4.0)
    assert not torch.allclose(_run(bf16)[0], want[0], rtol=1e-5, atol=1e-5)
    ep = liteattn_ops.export(_AttnModel().eval(), _x(), threshold=-4.0, use_int8=True)
    path = liteattn_ops.aoti_compile_and_package(ep, package_path=tmp_path / "int8_aoti.pt2",
                                                 inductor_configs=_fast_cpu_configs())
    runner = liteattn_ops.aoti_load_package(path)
    assert [rec["use_int8"] for rec in runner.metadata["states"]] == [True]
    for a, b in zip(_run(runner), want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    (got_state,) = runner.states.values()
    (want_state,) = _states(eager).values()
    assert torch.equal(got_state, want_state) and not bool((got_state == -1).all())


def test_demo_flag():
    from liteattn_ops.demo import parse_args

    assert parse_args(["--int8"]).int8 is True and parse_args([]).int8 is False
