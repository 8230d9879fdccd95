"""Would FP8 (e4m3) P.V stay within issue 12's accuracy bound (relative error vs float32 <= 2e-2)? CPU emulation, no
kernel: out = (P8 @ V8) / rowsum(P) with
- P8: the probabilities exp2(s - rowmax) in [0, 1], scaled by 448 (e4m3's largest normal) and rounded to e4m3
  (torch.float8_e4m3fn, round to nearest even), i.e. the most favourable scaling (a per-row one; a kernel's per-tile
  scaling can only lose precision to it);
- V8: V scaled per (b, h, channel) to 448 and rounded to e4m3, the scale applied back to out (exact: it is per column);
- the row sum in float32 of the unrounded P (a kernel sums in float32 before the rounding), accumulation in float32
  (the FP8 wgmma's reduced-precision accumulator on Hopper would only add error).
Scores from float32 q.k (the FP8 P.V error alone) and from the INT8 Q/K emulation (liteattn_ops.core.quant: the mode
the issue asks for, INT8 Q K^T + FP8 P.V). Inputs: N(0, 1); K with outlier channel means; local (3-D grid) q/k.

    python3 benchmarks/wave8/fp8_pv_accuracy.py
"""
import math

import torch

from liteattn_ops.core import quant
from liteattn_ops.testing import local_qkv

E4M3, E4M3_MAX = torch.float8_e4m3fn, 448.0


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def attend(s, v, fp8_p, fp8_v):
    """s: scores in natural units (B, H, Sq, Sk) float32."""
    p = torch.exp(s - s.amax(-1, keepdim=True))
    rowsum = p.sum(-1, keepdim=True)
    if fp8_p:
        p = (p * E4M3_MAX).to(E4M3).float() / E4M3_MAX
    if fp8_v:
        v_scale = v.abs().amax(-2, keepdim=True).clamp_min(1e-30) / E4M3_MAX
        v = (v / v_scale).to(E4M3).float() * v_scale
    return (p @ v) / rowsum


def main():
    gen = torch.Generator().manual_seed(0)
    head_dim, seqlen = 128, 4096
    cases = {}
    q, k, v = (torch.randn(1, 2, seqlen, head_dim, generator=gen).bfloat16() for _ in range(3))
    cases["N(0,1)"] = (q, k, v)
    cases["outlier K"] = (q, (k.float() + 8 * torch.randn(1, 1, 1, head_dim, generator=gen)).bfloat16(), v)
    cases["local"] = local_qkv((16, 16, 16), 1, 2, head_dim, generator=gen)
    scale = 1 / math.sqrt(head_dim)
    print(f"relative error of out vs float32 attention (B=1, H=2, S={seqlen}, D={head_dim}, bf16 inputs)")
    print(f"{'inputs':<11}{'scores':<8}{'bf16 P':>9}{'FP8 P':>9}{'FP8 V':>9}{'FP8 P+V':>9}")
    for name, (q, k, v) in cases.items():
        qf, kf, vf = q.float(), k.float(), v.float()
        exact = torch.softmax(qf @ kf.transpose(-1, -2) * scale, -1) @ vf
        for scores in ("fp32", "int8"):
            if scores == "fp32":
                s = qf @ kf.transpose(-1, -2) * scale
            else:  # the INT8 emulation's scores, in log2 units -> natural
                s = quant.int8_scores(q, k, scale) * math.log(2)
            p_bf16 = torch.exp(s - s.amax(-1, keepdim=True))
            bf16_p = (p_bf16.bfloat16().float() @ vf) / p_bf16.sum(-1, keepdim=True)
            cells = [rel(bf16_p, exact)] + [rel(attend(s, vf, fp, fv), exact) for fp, fv in ((1, 0), (0, 1), (1, 1))]
            print(f"{name:<11}{scores:<8}" + "".join(f"{c:9.4f}" for c in cells))


if __name__ == "__main__":
    main()
