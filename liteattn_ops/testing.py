"""Inputs with the structure of a video DiT's attention, for tests and benchmarks.

Real DiT attention is local in (t, h, w): a token attends mostly to tokens near it in space and
time. `local_qkv` builds q and k from random Fourier features of a 3-D token grid, so q·k
approximates a Gaussian kernel of the grid distance and attention is local; `sharpness` sets how
many log2 units separate near tokens from far ones.
"""

from __future__ import annotations

import math

import torch


def token_grid(frames: int, height: int, width: int, device=None) -> torch.Tensor:
    """(frames*height*width, 3) float32 (t, h, w) coordinates in row-major token order."""
    t, h, w = torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([t, h, w], -1).reshape(-1, 3).float().to(device)


def local_qkv(grid: tuple[int, int, int], batch: int = 1, heads: int = 2, head_dim: int = 64, *,
              length_scale: float = 2.0, sharpness: float = 30.0, dtype=torch.float32, device=None,
              generator: torch.Generator | None = None):
    """q, k, v (batch, heads, S, head_dim) with local attention over a (frames, height, width) grid.

    Each head draws its own frequencies. Scores span about `sharpness` log2 units between a token
    and far-away tokens at the default scale 1/sqrt(head_dim).
    """
    coords = token_grid(*grid)                                              # (S, 3)
    features = head_dim // 2
    freqs = torch.randn(batch, heads, 3, features, generator=generator) / length_scale
    phase = torch.rand(batch, heads, 1, features, generator=generator) * 2 * math.pi
    angles = coords @ freqs + phase                                         # (B, H, S, F)
    feats = torch.cat([angles.cos(), angles.sin()], -1) / math.sqrt(features)   # f·f' ≈ RBF in [-1, 1]
    gain = sharpness / math.log2(math.e) * math.sqrt(head_dim)              # score = gain * f·f' / sqrt(D)
    q = feats * math.sqrt(gain)
    k = feats * math.sqrt(gain)
    v = torch.randn(batch, heads, coords.shape[0], head_dim, generator=generator)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def forced_live(batch, heads, m_tiles, n_tiles, fraction, kind, gen):
    """A forced live set, bool (B, H, Mt, Nt): row m keeps round(count_m) random tiles (at least 1).

    kind "balanced": every row keeps fraction * Nt; "heavy-first" / "heavy-last": the counts fall /
    rise linearly over the query tiles around the same mean."""
    if kind == "balanced":
        counts = torch.full((m_tiles,), fraction * n_tiles)
    else:
        spread = min(fraction, 1 - fraction) * n_tiles
        ramp = torch.linspace(1.0, -1.0, m_tiles) if m_tiles > 1 else torch.zeros(1)
        counts = fraction * n_tiles + spread * (ramp if kind == "heavy-first" else -ramp)
    counts = counts.round().clamp(1, n_tiles).long()
    scores = torch.rand(batch, heads, m_tiles, n_tiles, generator=gen)
    rank = scores.argsort(-1).argsort(-1)
    return rank < counts.view(1, 1, -1, 1)


def forced_state(seqlen: int, heads: int, head_dim: int, spec: str, device="cuda") -> torch.Tensor:
    """The packed skip state (1, H, Mt, W) of a forced live set (forced_live) named by `spec`, "F:KIND" (fraction
    0 < F <= 1; KIND balanced, heavy-first or heavy-last), at bf16 S x H x D with the tile table's tiles: bench.py's
    per-row live counts, the tiles drawn from seed 0 (bench.py draws its sets from one generator in turn). Raises
    ValueError naming the spec when it is not of that form (before any GPU work)."""
    from .core.state import pack_bits
    from .core.tiling import tile_shape

    text, _, kind = spec.partition(":")
    try:
        fraction = float(text)
    except ValueError:
        fraction = math.nan
    if not 0 < fraction <= 1 or kind not in ("balanced", "heavy-first", "heavy-last"):
        raise ValueError(f"forced live set: expected F:KIND with 0 < F <= 1 and KIND balanced, heavy-first or "
                         f"heavy-last, got {spec!r}")
    bm, bn = tile_shape(head_dim, torch.bfloat16)
    live = forced_live(1, heads, -(-seqlen // bm), -(-seqlen // bn), fraction, kind, torch.Generator().manual_seed(0))
    return pack_bits(live).to(device)


def kernel_calls(seqlen: int, heads: int, head_dim: int, state: torch.Tensor | None = None, device="cuda"):
    """The calls the GPU tools time or profile (tools/clock_probe.py, kernel_times.py, ncu_worker.py), on one set of
    bf16 inputs in bench.py's layout ((1, S, H, D) storage seen as (1, H, S, D)): "dense" (our dense op), "skip" (the
    sparse op with thr = -inf over `state`, by default all live: every tile visited and voted on, and none ever
    dropped, so the state stays as it is), "int8" (the INT8 Q/K mode's dense op) and "cudnn" (SDPA's cuDNN backend)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from .core.state import new_state

    q, k, v = (torch.randn(1, seqlen, heads, head_dim, device=device, dtype=torch.bfloat16).transpose(1, 2)
               for _ in range(3))
    if state is None:
        state = new_state(1, heads, seqlen, seqlen, head_dim, torch.bfloat16, device)
    no_threshold = torch.full((heads,), -math.inf, device=device)

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            torch.nn.functional.scaled_dot_product_attention(q, k, v)

    return {"dense": lambda: torch.ops.liteattn.attention(q, k, v),
            "skip": lambda: torch.ops.liteattn.sparse_attention(q, k, v, state, no_threshold),
            "int8": lambda: torch.ops.liteattn.attention(q, k, v, None, True),
            "cudnn": cudnn}


def assert_lse_close(lse: torch.Tensor, expected: torch.Tensor, atol: float = 5e-3) -> None:
    """Compare log-sum-exps (natural log) by absolute error, -inf entries exactly.

    An absolute bound is the meaningful one for an LSE: missing one of n equally weighted key tiles
    shifts it by log(n / (n - 1)) (0.032 for n = 32) whatever its magnitude, while a relative norm
    error of an LSE of magnitude ~8 lets that shift through at 1e-2. The default 5e-3 allows a
    low-precision kernel's rounding (its row sums accumulate in float32) and catches one missing
    tile of up to ~200 equal tiles."""
    lse, expected = lse.detach().float().cpu(), expected.detach().float().cpu()
    assert lse.shape == expected.shape, f"lse shape {tuple(lse.shape)} != {tuple(expected.shape)}"
    empty, want_empty = torch.isneginf(lse), torch.isneginf(expected)
    assert torch.equal(empty, want_empty), f"{int((empty != want_empty).sum())} rows differ in being empty (-inf)"
    assert bool(torch.isfinite(lse[~empty]).all()), "lse has NaN or +inf entries"
    err = (lse - expected)[~empty].abs()
    worst = float(err.max()) if err.numel() else 0.0
    assert worst <= atol, f"lse differs by up to {worst:.3g} (allowed {atol:g})"
