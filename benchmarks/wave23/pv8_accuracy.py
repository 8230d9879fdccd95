"""Which 8-bit P.V could stay within issue 12's accuracy bound (relative error of out vs float32 <= 2e-2)? A CPU
emulation, no kernel (it replaces wave 8's FP8-only study, whose log stays in benchmarks/wave8/):

    out = sum over key tiles t of  dequant_t(P8_t @ V8_t)  /  rowsum(P)

with the row sum in float32 of the unrounded P (a kernel sums before it rounds) and exact accumulation (an int32
accumulator is exact; Hopper's FP8 accumulator would only add error). The key tiles are the kernel's BN
(tile_shapes.json); a ragged last tile is padded with P = 0 and V = 0. P = exp(s - rowmax) in (0, 1].

Formats of P (rounded to nearest even):
- bf16;
- e4m3 row:  P x 448 (e4m3's largest normal) per row;         e4m3 tile: P x 448 / (its row max within the key tile);
- u8 row:    P x 255 (the row max is 255);                     u8 tile:   P x 255 / (its row max within the key tile),
             so every tile's P uses the whole u8 range.
Formats of V: bf16; e4m3 chan: per (b, h, channel) to 448; e4m3 tile: per (key tile, channel) to 448; s8 tile: per
(key tile, channel) to 127. The per-(row, tile) and per-(tile, channel) factors are applied where a tile's
accumulator is added to O (a kernel must do that step anyway for int32, which the online softmax cannot rescale).
Columns: P and V each alone in 8 bits (wave 8's), then the pairs a kernel would run; each with scores from float32
q.k and from the INT8 Q/K emulation (liteattn_ops.core.quant). Inputs: N(0, 1); K with outlier channel means; local
(3-D grid) q/k; and one long row set (the first 384 queries of S = 32768, which only the P-per-row scalings are
sensitive to: the row max then sits far above most tiles).

    python3 benchmarks/wave23/pv8_accuracy.py
"""
import math

import torch
import torch.nn.functional as F

from liteattn_ops.core import quant
from liteattn_ops.core.tiling import tile_shape
from liteattn_ops.testing import local_qkv

E4M3, E4M3_MAX, U8_MAX, S8_MAX = torch.float8_e4m3fn, 448.0, 255.0, 127.0
COLUMNS = (("bf16", "bf16"), ("e4m3 row", "bf16"), ("bf16", "e4m3 chan"), ("e4m3 row", "e4m3 chan"),
           ("e4m3 tile", "e4m3 tile"), ("u8 row", "s8 tile"), ("u8 tile", "s8 tile"))


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def rounded(x, fmt):
    return x.to(E4M3).float() if fmt.startswith("e4m3") else torch.round(x)


def quantize_p(p, fmt):
    """p: (B, H, Sq, tiles, BN) -> (the rounded values, their scale)."""
    if fmt == "bf16":
        return p.bfloat16().float(), 1.0
    top = E4M3_MAX if fmt.startswith("e4m3") else U8_MAX
    scale = p.amax(-1, keepdim=True).clamp_min(1e-38) / top if fmt.endswith("tile") else 1 / top
    return rounded(p / scale, fmt), scale


def quantize_v(v, fmt):
    """v: (B, H, tiles, BN, D) -> (the rounded values, their scale per (key tile or all tiles, channel))."""
    if fmt == "bf16":
        return v.bfloat16().float(), torch.ones_like(v[..., :1, :])
    v_max = v.abs().amax(-2, keepdim=True).clamp_min(1e-30)  # per (key tile, channel)
    if fmt == "e4m3 chan":
        v_max = v_max.amax(2, keepdim=True)
    scale = v_max / (S8_MAX if fmt == "s8 tile" else E4M3_MAX)
    return rounded(v / scale, fmt), scale


def attend(s, v, p_fmt, v_fmt, block_n):
    """s: scores in natural units (B, H, Sq, Sk) float32; v: (B, H, Sk, D) float32."""
    p = torch.exp(s - s.amax(-1, keepdim=True))
    rowsum = p.sum(-1, keepdim=True)
    pad = -s.shape[-1] % block_n
    p8, p_scale = quantize_p(F.pad(p, (0, pad)).unflatten(-1, (-1, block_n)), p_fmt)          # (B, H, Sq, tiles, BN)
    v8, v_scale = quantize_v(F.pad(v, (0, 0, 0, pad)).unflatten(-2, (-1, block_n)), v_fmt)    # (B, H, tiles, BN, D)
    partial = torch.einsum("bhqnk,bhnkd->bhqnd", p8, v8)  # one accumulator a key tile (exact in float32 here)
    return (partial * p_scale * v_scale.squeeze(-2).unsqueeze(2)).sum(-2) / rowsum


def cases(head_dim, gen):
    q, k, v = (torch.randn(1, 2, 4096, head_dim, generator=gen).bfloat16() for _ in range(3))
    yield "N(0,1)", q, k, v
    yield "outlier K", q, (k.float() + 8 * torch.randn(1, 1, 1, head_dim, generator=gen)).bfloat16(), v
    yield "local", *local_qkv((16, 16, 16), 1, 2, head_dim, generator=gen)
    q, k, v = (torch.randn(1, 1, 32768, head_dim, generator=gen).bfloat16() for _ in range(3))
    yield "N(0,1) 32k", q[:, :, :384], k, v  # whole Q blocks of the INT8 mode at both head dims (BM 128, 192)


def main():
    gen = torch.Generator().manual_seed(0)
    print("relative error of out vs float32 attention (bf16 inputs; 4096 tokens, 2 heads; '32k': 384 queries of 32768)")
    print("P / V formats per column: " + ", ".join(f"{i}: {p} / {v}" for i, (p, v) in enumerate(COLUMNS)))
    print(f"{'D':<4}{'inputs':<12}{'scores':<8}" + "".join(f"{i:>8}" for i in range(len(COLUMNS))))
    for head_dim in (128, 64):
        _, block_n = tile_shape(head_dim, torch.bfloat16)
        scale = 1 / math.sqrt(head_dim)
        for name, q, k, v in cases(head_dim, gen):
            qf, kf, vf = q.float(), k.float(), v.float()
            exact = torch.softmax(qf @ kf.transpose(-1, -2) * scale, -1) @ vf
            for scores in ("fp32", "int8"):
                if scores == "fp32":
                    s = qf @ kf.transpose(-1, -2) * scale
                else:  # the INT8 emulation's scores, log2 units -> natural
                    s = quant.int8_scores(q, k, scale) * math.log(2)
                cells = [rel(attend(s, vf, p_fmt, v_fmt, block_n), exact) for p_fmt, v_fmt in COLUMNS]
                print(f"{head_dim:<4}{name:<12}{scores:<8}" + "".join(f"{c:8.4f}" for c in cells))


if __name__ == "__main__":
    main()
