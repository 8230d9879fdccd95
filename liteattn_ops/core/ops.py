"""The `liteattn` torch.library ops: one definition, its fake (meta) implementation, the CPU
implementation (the exact reference) and the CUDA implementation (the Hopper kernel).

    liteattn::sparse_attention(q, k, v, state!, threshold, must_do, must_skip, scale, use_int8) -> (out, lse)
    liteattn::attention(q, k, v, scale, use_int8) -> (out, lse)

q, k, v: logical (B, H, S, D) as for F.scaled_dot_product_attention, any strides with a contiguous
last dim. out: q.dtype, logical (B, H, S_q, D) laid out in memory as (B, S_q, H, D); lse: float32
(B, H, S_q), natural log. `state` (see liteattn_ops.state) is updated in place; `threshold` is a
float32 (H,) tensor in log2 units (<= 0; -inf never removes a tile); must_do / must_skip are
optional int32/int64 (R, 2) tensors of [start, end) key-token ranges. `use_int8=True` is the INT8
Q/K mode: the scores come from per-block int8 q and (mean-smoothed) k (liteattn_ops.core.quant);
everything else is the same.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
from torch import Tensor

from . import reference
from .extension import extension
from .state import check_state
from .tiling import tile_shape

CUDA_DTYPES = (torch.bfloat16, torch.float16)
CPU_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # float32: the CPU reference only


def valid_scale(scale) -> bool:
    """None (1/sqrt(head_dim)) or a positive finite number: what the kernel accepts."""
    return scale is None or (isinstance(scale, (int, float)) and 0 < scale < math.inf)


# --------------------------------------------------------------------------------------------
# Validation (shared by the real and the fake implementations; symbolic-shape friendly)
# --------------------------------------------------------------------------------------------

def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, seq_len, head_dim), got shape {tuple(t.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; all inputs must be on one device")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; q, k, v must share a dtype")
    allowed = CUDA_DTYPES if q.device.type == "cuda" else CPU_DTYPES
    if q.dtype not in allowed:
        raise TypeError(f"q must have dtype in {[str(d) for d in allowed]} on {q.device.type}, got {q.dtype}")
    tile_shape(q.shape[-1], q.dtype)  # raises for an unsupported head_dim
    for dim, what in ((0, "batch"), (1, "heads"), (3, "head_dim")):
        for name, t in (("k", k), ("v", v)):
            torch._check_with(ValueError, t.shape[dim] == q.shape[dim],
                              lambda: f"{name} {what} ({t.shape[dim]}) != q {what} ({q.shape[dim]}); "
                                      f"q {tuple(q.shape)}, {name} {tuple(t.shape)}")
    torch._check_with(ValueError, k.shape[2] == v.shape[2],
                      lambda: f"k and v must have the same seq_len, got {k.shape[2]} and {v.shape[2]}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        torch._check_with(ValueError, t.shape[2] >= 1, lambda: f"{name} has an empty sequence")
        torch._check_with(ValueError, t.stride(3) == 1,
                          lambda: f"{name} must have a contiguous last dim (stride 1), got strides {t.stride()}")


def _check_threshold(threshold: Tensor, q: Tensor) -> None:
    if not isinstance(threshold, Tensor):
        raise TypeError(f"threshold must be a float32 tensor of shape (heads,), got {type(threshold).__name__}")
    if threshold.dtype != torch.float32:
        raise TypeError(f"threshold must be float32, got {threshold.dtype}")
    if threshold.device != q.device:
        raise ValueError(f"threshold is on {threshold.device} but q is on {q.device}")
    torch._check_with(ValueError, threshold.dim() == 1 and threshold.shape[0] == q.shape[1],
                      lambda: f"threshold must have shape ({q.shape[1]},) (one value per head), got {tuple(threshold.shape)}")
    if threshold.device.type == "cpu" and not _is_fake(threshold):
        # Values are checked only where it costs no device synchronisation.
        if bool(torch.isnan(threshold).any()) or bool((threshold > 0).any()):
            raise ValueError(f"threshold values must be <= 0 (log2 units) or -inf, got {threshold.tolist()}")


def _check_ranges(name: str, ranges: Optional[Tensor], q: Tensor, seqlen_k) -> None:
    if ranges is None:
        return
    if not isinstance(ranges, Tensor):
        raise TypeError(f"{name} must be None or an integer tensor of shape (R, 2), got {type(ranges).__name__}")
    if ranges.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {ranges.dtype}")
    if ranges.device != q.device:
        raise ValueError(f"{name} is on {ranges.device} but q is on {q.device}")
    if ranges.dim() != 2 or ranges.shape[1] != 2:
        raise ValueError(f"{name} must have shape (R, 2) of [start, end) key ranges, got {tuple(ranges.shape)}")
    if ranges.device.type == "cpu" and not _is_fake(ranges) and ranges.numel():
        start, end = ranges[:, 0], ranges[:, 1]
        bad = (start < 0) | (end <= start) | (end > seqlen_k)
        if bool(bad.any()):
            raise ValueError(f"{name} ranges must satisfy 0 <= start < end <= seq_len_k ({seqlen_k}); "
                             f"bad rows: {ranges[bad].tolist()}")


def _is_fake(t: Tensor) -> bool:
    return isinstance(t, torch._subclasses.FakeTensor) or t.device.type == "meta"


def check_inputs(q, k, v, state=None, threshold=None, must_do=None, must_skip=None, scale=None,
                 use_int8=False) -> None:
    """All argument checks of the ops; raises TypeError/ValueError naming the argument."""
    _check_qkv(q, k, v)
    if not valid_scale(scale):
        raise ValueError(f"scale must be a positive finite float (default 1/sqrt(head_dim)), got {scale!r}")
    if not isinstance(use_int8, bool):
        raise TypeError(f"use_int8 must be a bool (True: INT8 Q/K mode), got {type(use_int8).__name__} {use_int8!r}")
    if state is not None:
        check_state(state, q, k)
        _check_threshold(threshold, q)
        _check_ranges("must_do", must_do, q, k.shape[2])
        _check_ranges("must_skip", must_skip, q, k.shape[2])


def _empty_outputs(q: Tensor) -> tuple[Tensor, Tensor]:
    batch, heads, seqlen_q, head_dim = q.shape
    out = q.new_empty((batch, seqlen_q, heads, head_dim)).transpose(1, 2)
    lse = q.new_empty((batch, heads, seqlen_q), dtype=torch.float32)
    return out, lse


# --------------------------------------------------------------------------------------------
# CUDA: the Hopper kernel
# --------------------------------------------------------------------------------------------

@functools.cache
def _check_cuda_device(index: int) -> None:
    major, minor = torch.cuda.get_device_capability(index)
    if (major, minor) != (9, 0):
        raise RuntimeError(f"the liteattn CUDA kernel needs a Hopper GPU (sm_90, H100/H200); "
                           f"cuda:{index} is sm_{major}{minor}")


def _tma_ready(ext, t: Tensor) -> Tensor:
    """The kernel loads q, k, v with TMA (16-byte aligned base, positive strides that are multiples
    of 16 bytes); copy the rare view that is not loadable as it is (e.g. an expanded tensor)."""
    if ext.tma_compatible(t.data_ptr(), t.stride()[:3], t.shape[:3]):
        return t
    return t.contiguous()


def _launch(q, k, v, state, threshold, must_do, must_skip, scale):
    ext = extension()
    _check_cuda_device(q.device.index if q.device.index is not None else torch.cuda.current_device())
    q, k, v = (_tma_ready(ext, t) for t in (q, k, v))
    out, lse = _empty_outputs(q)
    launch_forward(ext, q, k, v, out, lse, q.shape, state, threshold, must_do, must_skip, scale)
    return out, lse


def launch_forward(ext, q_kernel, k_kernel, v, out, lse, qkv_shape, state, threshold, must_do, must_skip, scale,
                   schedule=True, int8=None, split_tail=True, timeline=None) -> None:
    """One `_C.forward` call on the current stream, into `out` / `lse`: the argument assembly both modes share.

    q_kernel / k_kernel: what the kernel reads as Q and K (q and k themselves, or the INT8 pre-pass's int8
    buffers); qkv_shape: q's logical (B, H, S_q, D); k_kernel.shape[2] is S_k. schedule: True (fresh scratch in
    which the skip path orders the query tiles heaviest first), False (natural order) or an int32 (B, H, Mt)
    scratch tensor. The skip path also gets one int32 of scratch for its work counter. int8: None, or (q_scale, k_scale, q_mu) of the pre-pass (INT8 Q/K mode).
    split_tail: False runs without the split wave tail (no scratch; the tests compare the skip path's loop
    against the dense path's bit for bit, and the split skip path against the unsplit one).
    timeline: None, or an int64 CUDA tensor (CTAs, TIMELINE_HEADER + TIMELINE_MARKS * rows) the kernel fills with
    each CTA's %globaltimer marks (csrc/cta_timeline.cuh; only a kernel built with the timeline variant records one,
    tools/cta_timeline.py)."""
    batch, heads, seqlen_q, head_dim = qkv_shape
    # The kernel reads int32 (R, 2) ranges; these locals keep any converted copy alive until the
    # launch is queued (the caching allocator's stream order makes a later reuse safe).
    ranges = [None if r is None or r.shape[0] == 0 else r.to(torch.int32).contiguous() for r in (must_do, must_skip)]
    (do_ptr, n_do), (skip_ptr, n_skip) = ((0, 0) if r is None else (r.data_ptr(), r.shape[0]) for r in ranges)
    # Skip path: int32 scratch for the query-tile order (B*H*Mt) and, last, the persistent kernel's work counter.
    scratch = None if state is None else torch.empty(state[..., 0].numel() + 1, dtype=torch.int32, device=v.device)
    if state is None or schedule is False:
        schedule = None
    elif schedule is True:
        schedule = scratch[:-1]
    extras = {} if int8 is None else dict(int8=True, q_scale=int8[0].data_ptr(), k_scale=int8[1].data_ptr(),
                                          q_mu=int8[2].data_ptr())
    if timeline is not None:
        if timeline.dtype != torch.int64 or timeline.dim() != 2 or not timeline.is_contiguous() or \
                (timeline.shape[1] - ext.TIMELINE_HEADER) % ext.TIMELINE_MARKS or timeline.shape[1] <= ext.TIMELINE_HEADER:
            raise ValueError(f"timeline: expected a contiguous int64 (CTAs, {ext.TIMELINE_HEADER} + "
                             f"{ext.TIMELINE_MARKS} * rows) tensor, got {timeline.dtype} {tuple(timeline.shape)}")
        extras.update(timeline=timeline.data_ptr(), timeline_ctas=timeline.shape[0],
                      timeline_rows=(timeline.shape[1] - ext.TIMELINE_HEADER) // ext.TIMELINE_MARKS)
    with torch.cuda.device(v.device):
        if split_tail:
            # float32 scratch for the split wave tail (csrc/liteattn.h, SplitTailPlan), if the call has one.
            workspace_floats = ext.dense_split_workspace_floats if state is None else ext.skip_split_workspace_floats
            floats = workspace_floats(batch, heads, seqlen_q, k_kernel.shape[2], head_dim,
                                      str(v.dtype).removeprefix("torch."), int8 is not None)
            if floats > 0:
                split_workspace = torch.empty(floats, dtype=torch.float32, device=v.device)
                extras.update(split_workspace=split_workspace.data_ptr(), split_workspace_size=floats)
        ext.forward(
            q=q_kernel.data_ptr(), k=k_kernel.data_ptr(), v=v.data_ptr(), out=out.data_ptr(), lse=lse.data_ptr(),
            batch=batch, heads=heads, seqlen_q=seqlen_q, seqlen_k=k_kernel.shape[2], head_dim=head_dim,
            dtype=str(v.dtype).removeprefix("torch."),
            q_stride=q_kernel.stride()[:3], k_stride=k_kernel.stride()[:3], v_stride=v.stride()[:3],
            out_stride=out.stride()[:3], scale=reference.resolve_scale(scale, head_dim),
            state=0 if state is None else state.data_ptr(),
            threshold=0 if threshold is None else threshold.data_ptr(),
            must_do=do_ptr, num_must_do=n_do, must_skip=skip_ptr, num_must_skip=n_skip,
            stream=torch.cuda.current_stream(v.device).cuda_stream,
            schedule=0 if schedule is None else schedule.data_ptr(),
            work_counter=0 if scratch is None else scratch[-1:].data_ptr(),
            **extras,
        )


# --------------------------------------------------------------------------------------------
# The ops
# --------------------------------------------------------------------------------------------

@torch.library.custom_op("liteattn::sparse_attention", mutates_args=("state",))
def _sparse_attention_op(q: Tensor, k: Tensor, v: Tensor, state: Tensor, threshold: Tensor,
                         must_do: Optional[Tensor] = None, must_skip: Optional[Tensor] = None,
                         scale: Optional[float] = None, use_int8: bool = False) -> tuple[Tensor, Tensor]:
    """Attention over the live KV tiles of `state`; drops the tiles found negligible from `state`.

    Returns (out, lse). See the module docstring for layouts and liteattn_ops.reference for the
    exact semantics; use_int8=True: INT8 Q/K scores (liteattn_ops.core.quant).
    """
    check_inputs(q, k, v, state, threshold, must_do, must_skip, scale, use_int8)
    if q.device.type == "cuda":
        if use_int8:
            from .int8_cuda import launch_int8
            return launch_int8(q, k, v, state, threshold, must_do, must_skip, scale)
        return _launch(q, k, v, state, threshold, must_do, must_skip, scale)
    out, lse, new_state = reference.sparse_attention_reference(q, k, v, state, threshold, must_do, must_skip, scale,
                                                               use_int8)
    state.copy_(new_state)
    return out, lse


@_sparse_attention_op.register_fake
def _(q, k, v, state, threshold, must_do=None, must_skip=None, scale=None, use_int8=False):
    check_inputs(q, k, v, state, threshold, must_do, must_skip, scale, use_int8)
    return _empty_outputs(q)


@torch.library.custom_op("liteattn::attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None,
                  use_int8: bool = False) -> tuple[Tensor, Tensor]:
    """Dense attention (no skip state) with the same kernel and output conventions: (out, lse)."""
    check_inputs(q, k, v, scale=scale, use_int8=use_int8)
    if q.device.type == "cuda":
        if use_int8:
            from .int8_cuda import launch_int8
            return launch_int8(q, k, v, None, None, None, None, scale)
        return _launch(q, k, v, None, None, None, None, scale)
    return reference.attention_reference(q, k, v, scale, use_int8)


@_attention_op.register_fake
def _(q, k, v, scale=None, use_int8=False):
    check_inputs(q, k, v, scale=scale, use_int8=use_int8)
    return _empty_outputs(q)


# --------------------------------------------------------------------------------------------
# Python entry points with argument-type checks
# --------------------------------------------------------------------------------------------
# torch.ops.liteattn.* parses its schema in C++ before any of our code runs, so a float threshold
# or a list of ranges there is PyTorch's RuntimeError ("Expected a value of type 'Tensor' for
# argument 'threshold' ..."). These wrappers check the Python types first and raise TypeError
# naming the argument and the fix; then they call the op (traceable by Dynamo, no graph break).

def _check_argument_types(args: dict) -> None:
    for name in ("q", "k", "v"):
        if not isinstance(args[name], Tensor):
            raise TypeError(f"{name} must be a torch.Tensor (B, H, S, D), got {type(args[name]).__name__}")
    if "state" in args and not isinstance(args["state"], Tensor):
        raise TypeError(f"state must be an int32 tensor from liteattn_ops.new_state(...), got "
                        f"{type(args['state']).__name__}")
    if "threshold" in args and not isinstance(args["threshold"], Tensor):
        raise TypeError(f"threshold must be a float32 tensor of shape (heads,), got {type(args['threshold']).__name__} "
                        f"{args['threshold']!r}; e.g. torch.full((heads,), -10.0, device=q.device)")
    for name in ("must_do", "must_skip"):
        if name in args and args[name] is not None and not isinstance(args[name], Tensor):
            raise TypeError(f"{name} must be None or an int32/int64 tensor of shape (R, 2), got "
                            f"{type(args[name]).__name__} {args[name]!r}; e.g. torch.tensor([[0, 512]], "
                            "device=q.device) (liteattn_ops.core.params.ranges_tensor converts pairs)")
    scale = args["scale"]
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"scale must be a Python float or None, got {type(scale).__name__} {scale!r}")
    if not isinstance(args["use_int8"], bool):
        raise TypeError(f"use_int8 must be a Python bool (True: INT8 Q/K mode), got "
                        f"{type(args['use_int8']).__name__} {args['use_int8']!r}")


def sparse_attention(q: Tensor, k: Tensor, v: Tensor, state: Tensor, threshold: Tensor,
                     must_do: Optional[Tensor] = None, must_skip: Optional[Tensor] = None,
                     scale: Optional[float] = None, use_int8: bool = False) -> tuple[Tensor, Tensor]:
    """torch.ops.liteattn.sparse_attention with Python type checks first (TypeError naming the
    argument); see `_sparse_attention_op` and liteattn_ops.core.reference for the semantics."""
    _check_argument_types(dict(q=q, k=k, v=v, state=state, threshold=threshold, must_do=must_do,
                               must_skip=must_skip, scale=scale, use_int8=use_int8))
    return torch.ops.liteattn.sparse_attention(q, k, v, state, threshold, must_do, must_skip, scale, use_int8)


def attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None,
              use_int8: bool = False) -> tuple[Tensor, Tensor]:
    """torch.ops.liteattn.attention with Python type checks first (TypeError naming the argument)."""
    _check_argument_types(dict(q=q, k=k, v=v, scale=scale, use_int8=use_int8))
    return torch.ops.liteattn.attention(q, k, v, scale, use_int8)
