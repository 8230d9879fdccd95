import math, torch
from liteattn_ops.testing import local_qkv
from liteattn_ops.core import quant, reference, int8_cuda, ops
from liteattn_ops.core.state import new_state, live_mask
for hd, dt in ((128, torch.float16), (128, torch.bfloat16), (64, torch.float16)):
    gen = torch.Generator().manual_seed(hd)
    q0, k0, v0 = local_qkv((8, 16, 16), 2, 4, hd, sharpness=40.0, dtype=torch.float32, generator=gen)
    k0 = k0 + 4.0 * torch.randn(2, 4, 1, hd, generator=gen)
    thr = torch.tensor([-4.0, -8.0, -14.0, -math.inf], device="cuda")
    state = new_state(2, 4, q0.shape[2], k0.shape[2], hd, dt, "cuda")
    for step in range(8):
        noise = 0.02 * step
        q, k, v = ((t + noise * torch.randn(t.shape, generator=gen)).to("cuda", dt) for t in (q0, k0, v0))
        ro, rl, rs = reference.sparse_attention_reference(q.cpu(), k.cpu(), v.cpu(), state.cpu(), thr.cpu(), use_int8=True)
        ks = state.clone()
        out, lse = int8_cuda.launch_int8(q, k, v, ks, thr, None, None, None)
        dout, dlse = int8_cuda.launch_int8(q, k, v, None, None, None, None, None)
        _, drl, _ = reference.sparse_attention_reference(q.cpu(), k.cpu(), v.cpu(), new_state(2, 4, q.shape[2], k.shape[2], hd, dt, "cpu"), torch.full((4,), -math.inf), use_int8=True)
        err = (lse.cpu() - rl).abs(); err[~torch.isfinite(rl)] = 0
        derr = (dlse.cpu() - drl).abs()
        i = int(err.argmax()); b, h, r = i // (4 * q.shape[2]), (i // q.shape[2]) % 4, i % q.shape[2]
        print(f"d{hd} {str(dt)[6:]} step {step}: skip lse err max {err.max():.3g} at b{b} h{h} row {r} (lse {rl.flatten()[i]:.2f}); "
              f"per head {[round(float(err[:, j].max()), 4) for j in range(4)]}; dense lse err {derr.max():.3g}", flush=True)
        state = ks
