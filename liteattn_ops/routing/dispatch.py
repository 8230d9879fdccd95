"""Awareness of diffusers' attention dispatcher (diffusers >= 0.35; checked on 0.42).

diffusers' newer attention processors do not call SDPA themselves: they call
`dispatch_attention_fn(..., backend=processor._attention_backend)`, which runs the backend chosen
with `module.set_attention_backend(name)`, else the one of the `attention_backend(name)` context
manager / the DIFFUSERS_ATTN_BACKEND environment variable. Only the "native" backends call
`torch.nn.functional.scaled_dot_product_attention`, which is where LiteAttention takes over; any
other backend (flash, flex, sage, xformers, ...) bypasses it. `bypassing_backend(module)` says
which one, from the processor's attributes alone (plain attribute reads, so Dynamo traces it and
guards on the values).

Registering "liteattn" as a diffusers backend is not possible in diffusers 0.42: backends are
members of the closed enum `AttentionBackendName`, and `set_attention_backend` /
`attention_backend` accept only its values; the registry (`_AttentionBackendRegistry`) is private.
"""

from __future__ import annotations

import sys
from typing import Optional

from torch import nn

# The dispatcher backends that end in torch's scaled_dot_product_attention (with or without an
# SDPA kernel choice), so LiteAttention's routing sees their calls.
SDPA_BACKENDS = frozenset({"native", "_native_cudnn", "_native_efficient", "_native_flash", "_native_math"})


def _registry():
    dispatch = sys.modules.get("diffusers.models.attention_dispatch")
    return None if dispatch is None else getattr(dispatch, "_AttentionBackendRegistry", None)


def bypassing_backend(module: nn.Module) -> Optional[str]:
    """The name of the diffusers attention backend that `module`'s attention runs on, when that
    backend does not go through SDPA; None when LiteAttention sees the calls (a native backend, or
    a processor that does not use the dispatcher)."""
    processor = getattr(module, "processor", None)
    if processor is None or not hasattr(type(processor), "_attention_backend"):
        return None     # not a dispatcher processor: it calls SDPA (or something else) itself
    backend = processor._attention_backend
    if backend is None:
        registry = _registry()
        if registry is None:
            return None
        backend = registry._active_backend
    name = getattr(backend, "value", backend)
    return None if name in SDPA_BACKENDS else str(name)
