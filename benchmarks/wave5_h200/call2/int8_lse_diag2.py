"""Which side is off on the INT8 fp16 outlier LSE rows: kernel or emulation? Both against a float64 LSE of the
same int8 scores (the emulation's own quantization), for the inputs of test_skip_decisions_over_calls."""
import math, torch
from liteattn_ops.testing import local_qkv
from liteattn_ops.core import quant, reference, int8_cuda
from liteattn_ops.core.state import new_state, live_mask
import liteattn_ops

LN2 = math.log(2)
for hd, dt in ((128, torch.float16), (128, torch.bfloat16)):
    gen = torch.Generator().manual_seed(hd)
    q0, k0, v0 = local_qkv((8, 16, 16), 2, 4, hd, sharpness=40.0, dtype=torch.float32, generator=gen)
    k0 = k0 + 4.0 * torch.randn(2, 4, 1, hd, generator=gen)
    thr = torch.tensor([-4.0, -8.0, -14.0, -math.inf], device="cuda")
    bm, bn = liteattn_ops.tile_shape(hd, dt)
    state = new_state(2, 4, q0.shape[2], k0.shape[2], hd, dt, "cuda")
    for step in range(8):
        noise = 0.02 * step
        q, k, v = ((t + noise * torch.randn(t.shape, generator=gen)).to("cuda", dt) for t in (q0, k0, v0))
        ks = state.clone()
        out, lse = int8_cuda.launch_int8(q, k, v, ks, thr, None, None, None)
        dout, dlse = int8_cuda.launch_int8(q, k, v, None, None, None, None, None)
        qc, kc = q.cpu(), k.cpu()
        _, drl, _ = reference.sparse_attention_reference(qc, kc, v.cpu(), new_state(2, 4, q.shape[2], k.shape[2], hd, dt, "cpu"),
                                                          torch.full((4,), -math.inf), use_int8=True)
        qz = quant.quantize_qk(qc, kc, (bm, bn))
        pre = int8_cuda.prepass(q, k)
        # float64 dense LSE of the emulation's int8 scores
        x = qz.q8.double() @ qz.k8.double().transpose(-1, -2)                        # (B,H,Sq,Sk) exact integers
        qs = qz.q_scale.double().repeat_interleave(bm, -1)[..., :q.shape[2], None]
        kscl = qz.k_scale.double().repeat_interleave(bn, -1)[..., None, :k.shape[2]]
        s2 = x * qs * kscl * (math.log2(math.e) / math.sqrt(hd))
        bias = quant.query_mean_dots(qc, qz.mu).double() * (math.log2(math.e) / math.sqrt(hd))
        exact = (torch.logsumexp(s2 * LN2, -1) / LN2 + bias) * LN2
        # and float64 LSE of the raw (unquantized) scores
        raw = torch.logsumexp(qc.double() @ kc.double().transpose(-1, -2) / math.sqrt(hd), -1)
        ek, ee = (dlse.cpu().double() - exact), (drl.double() - exact)
        bad = (ek.abs() > 5e-3) | (ee.abs() > 5e-3)
        same_mu = torch.equal(pre.quantized.mu.cpu(), qz.mu)
        same_q8 = torch.equal(pre.quantized.q8.cpu(), qz.q8) and torch.equal(pre.quantized.k8.cpu(), qz.k8)
        print(f"d{hd} {str(dt)[6:]} step {step}: dense kernel-exact max {ek.abs().max():.3g}, emulation-exact max "
              f"{ee.abs().max():.3g}, rows beyond 5e-3: {int(bad.sum())}; exact-raw max {(exact - raw).abs().max():.3g}; "
              f"prepass == emulation: mu {same_mu} q8/k8 {same_q8}", flush=True)
        for i in bad.nonzero()[:6].tolist():
            b, h, r = i
            p = torch.exp2(s2[b, h, r] - s2[b, h, r].max())
            tiles = torch.nn.functional.pad(p, (0, (-p.numel()) % bn)).view(-1, bn).sum(-1) / p.sum()
            print(f"   b{b} h{h} r{r} (q tile {r // bm}): kernel {dlse[b, h, r]:.5f} emul {drl[b, h, r]:.5f} exact {exact[b, h, r]:.5f} "
                  f"raw {raw[b, h, r]:.5f} bias {bias[b, h, r] * LN2:.3f} rowmax2 {s2[b, h, r].max():.3f} q_scale {qz.q_scale[b, h, r // bm]:.4g} "
                  f"kernel q_mu {pre.q_mu[b, h, r] if hasattr(pre, 'q_mu') else float('nan'):.4f}; tile masses {[round(float(t), 4) for t in tiles]}", flush=True)
        state = ks
