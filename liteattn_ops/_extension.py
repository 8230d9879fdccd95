"""Optional loading of the compiled CUDA kernel (liteattn_ops._C)."""

from __future__ import annotations

import functools

_MISSING_MESSAGE = (
    "liteattn_ops was installed without its CUDA kernel (liteattn_ops._C): it was built on a machine "
    "without nvcc or with LITEATTN_BUILD_CUDA=OFF. Reinstall with nvcc (CUDA >= 12.3) on PATH to run "
    "on CUDA tensors; CPU tensors use the reference implementation."
)


@functools.cache
def _load():
    try:
        from . import _C
    except ImportError as error:
        return None, f"{_MISSING_MESSAGE} (import error: {error})"
    return _C, None


def is_available() -> bool:
    """True when the CUDA kernel was built (a Hopper GPU is still needed to run it)."""
    return _load()[0] is not None


def extension():
    module, message = _load()
    if module is None:
        raise RuntimeError(message)
    return module
