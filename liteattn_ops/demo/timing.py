"""Timing of the denoising loop without touching what is timed.

Rules the runner follows (so the dense and the LiteAttention runs are timed alike):

* Inside the timed region nothing synchronises the host with the device. Step boundaries are CUDA
  events recorded on the stream (host clock on the CPU, where every op is synchronous anyway); the
  times are read after the loop, after one synchronisation.
* Per-step live fractions are not read during the run: `LiveRecorder` copies each skip state into a
  preallocated device tensor at every step (a few KB, device to device, no sync) and decodes them
  after the run. The dense run records the same number of copies of equally sized buffers
  (`LiveRecorder.mirror`), so both timed loops launch the same extra work.
* Attention-only time comes from a separate, untimed pass under `torch.profiler`
  (`profile_steps`): per step, the device time of the kernels launched by attention ops
  (`aten::*scaled_dot_product*`, `liteattn::*`) against the device time of every kernel of that
  step. On the CPU the same pass reports host time of the attention ops. This works for eager and
  compiled models alike (the profiler sees the ops that Inductor's generated code calls); under
  CUDA graphs the kernels are matched by name instead (see `ATTENTION_KERNEL_WORDS`).
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import torch

from ..core.state import live_mask

# Kernels of attention, by name (used only where the profiler cannot tie a kernel to its op, e.g.
# inside a CUDA-graph replay): cuDNN / flash / memory-efficient SDPA kernels and ours.
ATTENTION_KERNEL_WORDS = ("fmha", "flash", "attention", "attn", "sdpa", "liteattn", "fwd_kernel", "lpt_schedule")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """Per-step times of one loop: `start()` before it, `mark()` after every step (no sync),
    `finish()` after it (one sync) returns the per-step seconds and the total."""

    def __init__(self, device: torch.device, steps: int):
        self.device = device
        self.cuda = device.type == "cuda"
        # preallocated, so creating events is not part of the loop
        self.events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)] if self.cuda else []
        self.host: list[float] = []
        self.n = 0

    def start(self) -> None:
        synchronize(self.device)  # the work before the loop is not timed
        self.n = 0
        self.host = [time.perf_counter()]
        if self.cuda:
            self.events[0].record()

    def mark(self) -> None:
        self.n += 1
        if self.cuda:
            self.events[self.n].record()
        else:
            self.host.append(time.perf_counter())

    def finish(self) -> tuple[list[float], float]:
        """(seconds per step, wall seconds from start() to the end of the device work)."""
        synchronize(self.device)
        wall = time.perf_counter() - self.host[0]
        if self.cuda:
            per_step = [self.events[i].elapsed_time(self.events[i + 1]) / 1e3 for i in range(self.n)]
        else:
            per_step = [b - a for a, b in zip(self.host, self.host[1:])]
        return per_step, wall


def site_states(model) -> list[tuple[str, torch.Tensor]]:
    """(site name, state tensor) for every skip state of a model's attention sites, in module
    order (the names are those of liteattn_ops.stats)."""
    from ..nn.model import attention_sites

    out = []
    for name, site in attention_sites(model):
        states = site.states() if hasattr(site, "states") else {"state": site.state}
        out.extend((name, t) for t in states.values() if t is not None)
    return out


class LiveRecorder:
    """Snapshots of every skip state after every step, taken on the device without a sync.

    `record(i)` copies each state into row i of a preallocated (steps, *state.shape) tensor;
    `decode()` (after the run) returns, per step, the live fraction per layer and per head.
    `mirror(device, shapes, steps)` makes a recorder with the same buffers over scratch tensors,
    for the dense run (same copies, nothing to decode)."""

    def __init__(self, states, steps: int, *, seqlen_k: int = 0, head_dim: int = 0,
                 dtype: torch.dtype = torch.float32):
        """`states`: [(site name, state)], or a function returning them, called at the first
        record() when the states do not exist yet (a run without warm-up allocates them in its
        first step)."""
        self._find = states if callable(states) else None
        self.n_steps = steps
        self.states, self.buffers = [], []
        if not callable(states):
            self._allocate(states)
        self.seqlen_k, self.head_dim, self.dtype = seqlen_k, head_dim, dtype
        self.steps = 0

    def _allocate(self, states) -> None:
        self.states = list(states)
        self.buffers = [torch.empty((self.n_steps, *t.shape), dtype=t.dtype, device=t.device) for _, t in self.states]

    @classmethod
    def mirror(cls, like: list[tuple[str, torch.Tensor]], steps: int) -> "LiveRecorder":
        scratch = [(name, torch.full_like(t, -1)) for name, t in like]
        return cls(scratch, steps)

    def record(self, i: int) -> None:
        if not self.states and self._find is not None:
            self._allocate(self._find())
        for (_, state), buf in zip(self.states, self.buffers):
            buf[i].copy_(state, non_blocking=True)
        self.steps = i + 1

    def decode(self) -> list[dict]:
        """Per recorded step: {"live_fraction_per_layer": {site: f}, "live_fraction_per_head":
        {site: [f, ...]}, "live_fraction": mean over layers} (host floats; synchronises)."""
        per_layer: dict[str, list[torch.Tensor]] = {}
        for (name, _), buf in zip(self.states, self.buffers):
            mask = live_mask(buf[: self.steps], self.seqlen_k, self.head_dim, self.dtype).float()
            per_layer.setdefault(name, []).append(mask.mean(dim=(1, 3, 4)))  # (steps, H)
        heads = {name: torch.stack(parts).mean(0).cpu() for name, parts in per_layer.items()}
        records = []
        for i in range(self.steps):
            layer = {name: float(h[i].mean()) for name, h in heads.items()}
            records.append({
                "live_fraction_per_layer": layer,
                "live_fraction_per_head": {name: h[i].tolist() for name, h in heads.items()},
                "live_fraction": sum(layer.values()) / len(layer) if layer else None,
            })
        return records


def cuda_graphs_info(device: torch.device, mode: str) -> dict:
    """Whether CUDA graphs were recorded for the compiled runs (Inductor's CUDA-graph trees)."""
    info = {"requested": mode in ("reduce-overhead", "max-autotune"), "recorded": 0, "skips": 0}
    if device.type != "cuda" or not info["requested"]:
        return info
    from torch._dynamo.utils import counters

    info["skips"] = int(counters["inductor"]["cudagraph_skips"])
    try:
        from torch._inductor import cudagraph_trees

        manager = cudagraph_trees.get_container(device.index or 0).tree_manager
        if manager is not None:
            info["recorded"] = len(manager.ids_to_funcs)
    except Exception:  # noqa: BLE001  (private API: report what can be read)
        info["recorded"] = None
    return info


# ------------------------------------------------------------------------------------------------
# Attention-only time: an untimed pass under torch.profiler
# ------------------------------------------------------------------------------------------------

STEP_LABEL = "liteattn_demo_step_"


def _is_attention_op(name: str) -> bool:
    return "scaled_dot_product" in name or name.startswith("liteattn::")


def _is_attention_kernel(name: str) -> bool:
    low = name.lower()
    return any(word in low for word in ATTENTION_KERNEL_WORDS)


def _step_times(event, cuda: bool) -> tuple[float, float]:
    """(all, attention) seconds of one step's profiler range: device kernel time on CUDA, host time
    of the ops on the CPU."""
    if not cuda:
        attn = 0.0
        stack = list(event.cpu_children)
        while stack:
            e = stack.pop()
            if _is_attention_op(e.name):
                attn += e.cpu_time_total
            else:
                stack.extend(e.cpu_children)
        return event.cpu_time_total / 1e6, attn / 1e6
    total = attn = 0.0
    stack = [(event, False)]
    while stack:
        e, inside = stack.pop()
        inside = inside or _is_attention_op(e.name)
        for k in e.kernels:
            total += k.duration
            if inside or _is_attention_kernel(k.name):
                attn += k.duration
        stack.extend((c, inside) for c in e.cpu_children)
    return total / 1e6, attn / 1e6


def profile_steps(run: Callable[[Callable[[int, float], None]], object], device: torch.device,
                  steps: int) -> Optional[list[dict]]:
    """Run `run(callback)` (a denoising loop of `steps` steps) once under torch.profiler, each step
    in its own labelled range with a sync at its end (this pass is not the timed one). Returns per step
    {"kernel_time_s", "attention_time_s"} (CUDA: device time of the kernels; CPU: host time of the
    ops), or None when the profiler gives no usable data."""
    from torch.profiler import ProfilerActivity, profile, record_function

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    ranges: list = []

    def open_range(i):
        r = record_function(f"{STEP_LABEL}{i}")
        r.__enter__()
        ranges.append(r)

    def callback(i, t):
        synchronize(device)
        ranges.pop().__exit__(None, None, None)
        if i + 1 < steps:
            open_range(i + 1)

    with profile(activities=activities) as prof:
        open_range(0)
        try:
            run(callback)
        finally:
            synchronize(device)
            while ranges:
                ranges.pop().__exit__(None, None, None)
    found = {}
    for e in prof.events():
        if e.name.startswith(STEP_LABEL) and e.device_type == torch.autograd.DeviceType.CPU:
            found[int(e.name[len(STEP_LABEL):])] = e
    out = []
    for i in sorted(found):
        total, attn = _step_times(found[i], cuda)
        out.append({"kernel_time_s": total, "attention_time_s": attn})
    if not out or not any(r["attention_time_s"] for r in out):
        return None
    return out

