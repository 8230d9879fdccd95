"""Which scaled_dot_product_attention calls a LiteAttention op can take over: the match
predicate shared by the eager router (liteattn_ops.routing) and the compile pass
(liteattn_ops.compile), so eager and compiled runs decide alike."""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from .extension import is_available
from .ops import CPU_DTYPES, CUDA_DTYPES, valid_scale
from .tiling import supported_head_dims

SDPA = torch._C._nn.scaled_dot_product_attention  # is torch.nn.functional.scaled_dot_product_attention
SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}

# Read once, here: the predicate runs inside Dynamo traces, which must not call these (cached,
# file-reading) helpers.
_HEAD_DIMS = supported_head_dims()
_KERNEL_BUILT = is_available()

# Reasons (the report and the counters use these strings; tests match them).
GRAD = "grad mode (inference only: the op has no autograd formula)"
CROSS = "cross-attention (S_q != S_k): no temporal skipping"
NOT_TENSORS = "q/k/v are not tensors"
NOT_A_SITE = "no LiteAttention site (liteattn_ops.enable(model) makes one; backend fallback='enable' does it at the first call)"


def bind_sdpa(args: tuple, kwargs: dict) -> dict:
    """The arguments of one SDPA call by name, defaults filled in."""
    call = dict(_SDPA_DEFAULTS)
    call.update(zip(SDPA_PARAMS, args))
    call.update(kwargs)
    return call


def ineligible_reason(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                      enable_gqa=False, *, allow_cross: bool = False) -> Optional[str]:
    """None when this SDPA call can run as a LiteAttention op, else why not.

    Eligible: 4-D q/k/v of one dtype and device, no mask, dropout_p == 0, not causal, same number of
    heads for q and k/v, a head dim with a kernel tile (liteattn_ops.supported_head_dims()), a
    dtype the device supports (CUDA: bf16/fp16 with the kernel built; CPU: also fp32, reference),
    a contiguous last dim, and no input requiring grad while grad mode is on. S_q != S_k
    (cross-attention) is eligible only with `allow_cross` (for the dense op).
    Works on fake tensors: only shapes, dtypes, devices and flags are read, never values.
    """
    tensors = (query, key, value)
    if not all(isinstance(t, Tensor) for t in tensors):
        return NOT_TENSORS
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return GRAD
    if attn_mask is not None:
        return "attention mask"
    if not isinstance(dropout_p, (int, float)) or dropout_p != 0.0:
        return "dropout_p != 0"
    if not isinstance(is_causal, bool) or is_causal:
        return "causal"
    if any(t.dim() != 4 for t in tensors):
        return "inputs are not 4-D (batch, heads, seq, head_dim)"
    if key.dtype != query.dtype or value.dtype != query.dtype:
        return "q, k, v dtypes differ"
    if key.device != query.device or value.device != query.device:
        return "q, k, v devices differ"
    if enable_gqa or key.shape[1] != query.shape[1] or value.shape[1] != query.shape[1]:
        return "grouped-query attention (heads of q and k/v differ)"
    if key.shape[0] != query.shape[0] or value.shape[0] != query.shape[0]:
        return "batch sizes differ"
    if value.shape[-1] != query.shape[-1] or key.shape[-1] != query.shape[-1]:
        return "head dims of q, k, v differ"
    if query.shape[-1] not in _HEAD_DIMS:
        return f"head_dim {query.shape[-1]} unsupported (supported: {', '.join(map(str, _HEAD_DIMS))})"
    if query.device.type == "cuda":
        if query.dtype not in CUDA_DTYPES:
            return f"dtype {query.dtype} unsupported on CUDA (bfloat16, float16)"
        if not _KERNEL_BUILT:
            return "CUDA kernel not built (liteattn_ops.is_available() is False)"
    elif query.device.type == "cpu":
        if query.dtype not in CPU_DTYPES:
            return f"dtype {query.dtype} unsupported on CPU"
    else:
        return f"device {query.device.type} unsupported"
    if any(t.stride(-1) != 1 for t in tensors):
        return "last dim not contiguous"
    if not valid_scale(scale):
        return "scale is not a positive finite float"
    if not allow_cross and key.shape[2] != query.shape[2]:
        return CROSS
    return None


_WARNED: set[str] = set()   # keys of the warnings already given (tests clear it)


def warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, stacklevel=4)


def warn_grad_once() -> None:
    warn_once("grad", "liteattn: grad mode is on and q/k/v require grad, so attention runs as plain "
                       "scaled_dot_product_attention (LiteAttention is inference-only). Run under "
                       "torch.no_grad() / torch.inference_mode() to skip tiles.")
