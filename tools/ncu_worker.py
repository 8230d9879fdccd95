"""ncu target, `python3 tools/ncu_worker.py MODE [S,H,D]`: kernel launches to profile at bf16 S x H x D (default
32760,12,128). MODE `dense` (the attention op), `skip` (the sparse op, fresh state, thr -inf: every tile visited),
`int8` (the INT8 Q/K mode's dense kernel, after its pre-pass) or `cudnn` (SDPA's cuDNN backend, for a cycle count
beside ours); 4 calls, so `ncu -k regex:fwd_kernel --launch-skip 3 --launch-count 1` takes the last."""
import math, sys
import torch
import liteattn_ops  # noqa: F401
from liteattn_ops.core.state import new_state

mode = sys.argv[1]
S, H, D = (int(x) for x in (sys.argv[2] if len(sys.argv) > 2 else "32760,12,128").split(","))
q, k, v = (torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
thr = torch.full((H,), -math.inf, device="cuda")
for _ in range(4):
    if mode == "dense":
        torch.ops.liteattn.attention(q, k, v)
    elif mode == "cudnn":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            torch.nn.functional.scaled_dot_product_attention(q, k, v)
    elif mode == "int8":
        torch.ops.liteattn.attention(q, k, v, None, True)
    else:
        state = new_state(1, H, S, S, D, torch.bfloat16, "cuda")
        torch.ops.liteattn.sparse_attention(q, k, v, state, thr)
torch.cuda.synchronize()
