"""Optional loading of the compiled CUDA kernel (liteattn_ops._C)."""

from __future__ import annotations

import functools
import warnings

_MISSING_MESSAGE = (
    "liteattn_ops was installed without its CUDA kernel (liteattn_ops._C): it was built on a machine "
    "without nvcc or with LITEATTN_BUILD_CUDA=OFF. Reinstall with nvcc (CUDA >= 12.3) on PATH to run "
    "on CUDA tensors; CPU tensors use the reference implementation."
)


@functools.cache
def _load():
    try:
        from .. import _C
    except ImportError as error:
        return None, f"{_MISSING_MESSAGE} (import error: {error})"
    return _C, None


def warn_if_gpu_without_kernel() -> None:
    """Say once, at import, when a GPU is present but the kernel was not built."""
    import torch

    if torch.cuda.is_available() and not is_available():
        warnings.warn(_load()[1], stacklevel=3)


def is_available() -> bool:
    """True when the CUDA kernel was built (a Hopper GPU is still needed to run it)."""
    return _load()[0] is not None


def extension():
    module, message = _load()
    if module is None:
        raise RuntimeError(message)
    return module
