"""INT8 Q/K mode (issue 12): the exact emulation of the kernel's per-block quantization of q and k
and of its int8 scores, in float32 torch ops (any device). The README's "INT8 Q/K mode" is the
prose form; every rounding below is the one the CUDA kernel makes.

1. K smoothing: mu[b, h, :] = (sum over the S_k rows of float32(k)) / S_k, rounded to k's dtype
   and back to float32; ks = float32(k) - mu. (Softmax is invariant to the per-row constant q.mu,
   so this changes nothing but the precision of the quantization.)
2. Blocks: Q block m = rows [m*BM, min(S_q, (m+1)*BM)) of one (b, h), K block n likewise with BN,
   the tile shape of the bf16/fp16 kernel. amax = max |x| over the block's rows and channels
   (x = float32(q), or ks). amax == 0: scale 0, int8 values 0. amax finite and > 0:
   inv = 127 / amax (one float32 division), x8 = clamp(round_half_even(x * inv), -127, 127),
   scale = amax / 127 (one float32 division). amax not finite (an inf or NaN in the block):
   scale NaN, int8 values 0.
3. Scores in log2 units: s[i, j] = float32(int32 q8[i] . k8[j]) * ((q_scale[m] * k_scale[n]) *
   scale_log2), two float32 multiplies in that order, scale_log2 = float32(double(float32(scale))
   * log2(e)): the kernel gets the scale as a float32 (bindings.cpp), widens it to double and
   rounds the product once (fwd_launch.cuh).
4. LSE correction: the smoothing takes the per-row constant scale * q[i] . mu out of the scores;
   softmax ignores it, the LSE does not, so the LSE gets it back: lse = ln2 * (row max + log2(row
   sum) + q_mu[i] * scale_log2), q_mu = query_mean_dots(q, mu) as the pre-pass computes it.

Nothing loops over blocks. The int8 dot products are computed as a float32 matmul of the int8
values: every partial sum is an integer below 127 * 127 * D < 2**24, so it is exact in any order.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .tiling import num_tiles, tile_shape

INT8_MAX = 127
# fwd_launch.cuh: `const double log2e = 1.0 / std::log(2.0);` (the same double as math.log2(math.e)).
_KERNEL_LOG2E = 1.0 / math.log(2.0)


class QuantizedQK(NamedTuple):
    """q8, k8: int8 (B, H, S, D), contiguous; q_scale: float32 (B, H, Mt); k_scale: float32
    (B, H, Nt); mu: float32 (B, H, D), the smoothing mean subtracted from k before quantizing."""

    q8: Tensor
    q_scale: Tensor
    k8: Tensor
    k_scale: Tensor
    mu: Tensor


def scale_log2(scale: float) -> float:
    """The softmax scale in log2 units exactly as the kernel holds it (Params.scale_log2). The
    binding takes `float scale`, so pybind11 rounds the Python float to float32; fwd_launch.cuh then
    computes `static_cast<float>(double(a.scale) * log2e)` on the host: the float32 scale widened to
    double, one double multiply by log2e = 1 / ln 2, one rounding to float32."""
    scale32 = torch.tensor(float(scale), dtype=torch.float32).item()        # pybind11: (float) double
    return float(torch.tensor(scale32 * _KERNEL_LOG2E, dtype=torch.float64).to(torch.float32))


def query_mean_dots(q: Tensor, mu: Tensor) -> Tensor:
    """q_mu (B, H, S_q) float32: q[i] . mu per query row, as the pre-pass (csrc/int8_prepass.cu,
    quantize_kernel) computes it for the LSE correction: each group of 8 consecutive channels is one
    fmaf chain from 0 in channel order, dot = fmaf(q[c], mu[c], dot); the D/8 group sums are then
    added in float32 by a butterfly (xor-shuffle) reduction, i.e. a pairwise tree over adjacent
    groups. The fmaf is emulated in float64 (the float32 product is exact there) and rounded to
    float32 after every step, which differs from a true fma only when that double rounding hits a
    float32 tie; so this matches the kernel bit for bit except at such ties (and denormal results,
    which the kernel, built with --use_fast_math, flushes to zero)."""
    qf = q.float()
    batch, heads, seqlen, head_dim = qf.shape
    groups = head_dim // 8
    mu = mu.to(device=qf.device, dtype=torch.float32)
    if head_dim % 8 or groups & (groups - 1):      # no kernel for such head dims: a plain dot product
        return torch.einsum("bhsd,bhd->bhs", qf.double(), mu.double()).float()
    x = qf.view(batch, heads, seqlen, groups, 8)
    m = mu.view(batch, heads, 1, groups, 8).double()
    acc = torch.zeros(batch, heads, seqlen, groups, dtype=torch.float32, device=qf.device)
    for j in range(8):
        acc = (x[..., j].double() * m[..., j] + acc.double()).float()
    while acc.shape[-1] > 1:
        acc = acc[..., 0::2] + acc[..., 1::2]
    return acc[..., 0]


def smoothing_mean(k: Tensor) -> Tensor:
    """mu (B, H, D) float32: the per-channel mean of k over its S_k rows, rounded to k's dtype."""
    kf = k.float()
    total = kf.sum(dim=2)
    return torch.div(total, torch.full_like(total, k.shape[2])).to(k.dtype).float()


def quantize_blocks(x: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """Per-block symmetric int8 quantization of float32 x (B, H, S, D) along S in blocks of `block`
    rows: (x8 int8 (B, H, S, D) contiguous, scale float32 (B, H, ceil(S/block)))."""
    batch, heads, seqlen, head_dim = x.shape
    blocks = num_tiles(seqlen, block)
    pad = blocks * block - seqlen
    # Zero rows past the end: they do not change amax and quantize to 0.
    padded = torch.nn.functional.pad(x, (0, 0, 0, pad)) if pad else x.contiguous()
    tiles = padded.view(batch, heads, blocks, block, head_dim)
    amax = tiles.abs().amax(dim=(-1, -2))                                   # NaN propagates
    finite = torch.isfinite(amax)
    usable = finite & (amax > 0)
    limit = torch.full_like(amax, float(INT8_MAX))
    # torch.div of two tensors is one IEEE division (`127.0 / t` would be a reciprocal, then a multiply).
    inv = torch.where(usable, torch.div(limit, torch.where(usable, amax, limit)), torch.zeros_like(amax))
    x8 = torch.round(tiles * inv[..., None, None]).clamp_(-INT8_MAX, INT8_MAX)
    x8 = x8.masked_fill_(~usable[..., None, None], 0.0).to(torch.int8)     # also clears NaN (inf * 0)
    scale = torch.where(finite, torch.div(amax, limit), torch.full_like(amax, math.nan))
    return x8.view(batch, heads, blocks * block, head_dim)[:, :, :seqlen], scale


def quantize_qk(q: Tensor, k: Tensor, tile: Optional[tuple[int, int]] = None,
                mu: Optional[Tensor] = None) -> QuantizedQK:
    """Quantize q per block of BM rows and k, smoothed by its mean, per block of BN rows (see the
    module docstring). `tile`: (BM, BN), by default the kernel's `tile_shape(head_dim, q.dtype)`.
    `mu` (B, H, D): the smoothing mean to use instead of `smoothing_mean(k)` — the kernel's pre-pass
    may round a channel whose exact mean lies at a tie of k's dtype the other way, and every k8 of
    that channel then follows its mean, so the kernel is checked against the emulation on its own mean."""
    block_m, block_n = tile if tile is not None else tile_shape(q.shape[-1], q.dtype)
    mu = smoothing_mean(k) if mu is None else mu.to(device=k.device, dtype=torch.float32)
    q8, q_scale = quantize_blocks(q.float(), block_m)
    k8, k_scale = quantize_blocks(k.float() - mu[:, :, None, :], block_n)
    return QuantizedQK(q8, q_scale, k8, k_scale, mu)


def padded_keys(k8: Tensor, block_n: int) -> Tensor:
    """k8 as float32 (B, H, Nt * BN, D), zero rows past S_k: the right operand of the int8 dots."""
    pad_k = num_tiles(k8.shape[2], block_n) * block_n - k8.shape[2]
    kf = k8.float()
    return torch.nn.functional.pad(kf, (0, 0, 0, pad_k)) if pad_k else kf


def tile_scores(quant: QuantizedQK, scale: float, tile: tuple[int, int], row0: int = 0,
                row1: Optional[int] = None, keys: Optional[Tensor] = None) -> Tensor:
    """Scores in log2 units of query rows [row0, row1) (row0 a multiple of BM) against every key,
    float32 (B, H, rows, Nt * BN): the key axis padded to whole tiles with -inf. `keys`:
    padded_keys(quant.k8, BN), when the caller computes scores for several row ranges."""
    block_m, block_n = tile
    q8, q_scale, k8, k_scale, _ = quant
    batch, heads, seqlen_q, head_dim = q8.shape
    seqlen_k = k8.shape[2]
    row1 = seqlen_q if row1 is None else row1
    if row0 % block_m:
        raise ValueError(f"row0 ({row0}) must be a multiple of BM ({block_m})")
    if INT8_MAX * INT8_MAX * head_dim >= 2 ** 24:
        raise ValueError(f"head_dim {head_dim} is too large for exact float32 int8 dot products")
    n_tiles = num_tiles(seqlen_k, block_n)
    pad_k = n_tiles * block_n - seqlen_k
    keys = padded_keys(k8, block_n) if keys is None else keys
    dots = torch.matmul(q8[:, :, row0:row1].float(), keys.transpose(-1, -2))    # exact int32 values
    # c[m, n] = (q_scale[m] * k_scale[n]) * scale_log2, per row's query tile.
    tile_of_row = torch.arange(row0, row1, device=q8.device) // block_m
    c = q_scale[:, :, tile_of_row, None] * k_scale[:, :, None, :]                # (B, H, rows, Nt)
    c = c * torch.tensor(scale_log2(scale), dtype=torch.float32, device=c.device)
    scores = dots.view(batch, heads, row1 - row0, n_tiles, block_n).mul_(c[..., None])
    if pad_k:
        scores[..., -1, block_n - pad_k:] = -math.inf
    return scores.view(batch, heads, row1 - row0, n_tiles * block_n)


def int8_scores(q: Tensor, k: Tensor, scale: Optional[float] = None,
                tile: Optional[tuple[int, int]] = None) -> Tensor:
    """The INT8-mode scores of q against k, float32 (B, H, S_q, S_k), log2 units: what the kernel's
    online softmax and negligible test see in place of scale * log2(e) * q.k."""
    tile = tile if tile is not None else tile_shape(q.shape[-1], q.dtype)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return tile_scores(quantize_qk(q, k, tile), scale, tile)[..., :k.shape[2]]
