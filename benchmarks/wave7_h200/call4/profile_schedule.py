"""Kernel durations (torch.profiler, CUDA activity) of the skip path's two kernels: the sliced LPT schedule kernel
and the forward kernel, at a fresh state (f = 1), for the shapes of issue 10 where the schedule's cost matters."""
import math, torch
from torch.profiler import profile, ProfilerActivity
import liteattn_ops  # noqa: F401
from liteattn_ops.core.state import new_state

for s, h, d in [(4096, 12, 128), (16384, 4, 64), (32760, 12, 128)]:
    q, k, v = (torch.randn(1, s, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
    state = new_state(1, h, s, s, d, torch.bfloat16, "cuda")
    thr = torch.full((h,), -math.inf, device="cuda")
    for _ in range(3):
        torch.ops.liteattn.sparse_attention(q, k, v, state, thr)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            torch.ops.liteattn.sparse_attention(q, k, v, state, thr)
        torch.cuda.synchronize()
    for avg in prof.key_averages():
        if "lpt_schedule" in avg.key or "fwd_kernel" in avg.key:
            total = getattr(avg, "device_time_total", None) or getattr(avg, "cuda_time_total", 0.0)
            name = "schedule kernel" if "lpt_schedule" in avg.key else "forward kernel"
            print(f"{s}x{h}x{d}: {name}: {total / max(avg.count, 1):.1f} us per call ({avg.count} calls)", flush=True)
