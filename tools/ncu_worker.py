"""ncu target, `python3 tools/ncu_worker.py MODE [S,H,D [F:KIND]]`: kernel launches to profile at bf16 S x H x D
(default 32760,12,128). MODE `dense` (the attention op), `skip` (the sparse op, thr -inf: every tile of an all-live
state visited, or with F:KIND those of a forced live set of bench.py's kinds), `int8` (the INT8 Q/K mode's dense
kernel, after its pre-pass) or `cudnn` (SDPA's cuDNN backend, for a cycle count beside ours):
liteattn_ops.testing.kernel_calls; 4 calls, so `ncu -k regex:fwd_kernel --launch-skip 3 --launch-count 1` takes the
last."""
import sys

import torch

import liteattn_ops  # noqa: F401
from liteattn_ops.testing import forced_state, kernel_calls

mode = sys.argv[1]
S, H, D = (int(x) for x in (sys.argv[2] if len(sys.argv) > 2 else "32760,12,128").split(","))
state = forced_state(S, H, D, sys.argv[3]) if len(sys.argv) > 3 else None
call = kernel_calls(S, H, D, state)[mode]
for _ in range(4):
    call()
torch.cuda.synchronize()
