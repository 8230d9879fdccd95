"""Parsing and validation of the user-facing arguments `threshold` and `must_do` / `must_skip`.

Host-side only: these run when a value is set (a module is built, a threshold is assigned), never
inside the op, so reading the values costs no device synchronisation. Every error names the
argument and says what was expected.

    threshold: a number (Python int/float, NumPy scalar, 0-d tensor), or one per head as a 1-D
               sequence of numbers / 1-D tensor / 1-D NumPy array; every value <= 0 or -inf
               (log2 units); not NaN, not empty.
    ranges:    None, or [start, end) key-token pairs: a sequence of pairs or an (R, 2) array /
               tensor of integers (integral floats are accepted; 0.5 is not); 0 <= start < end.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

ThresholdLike = Union[float, Sequence[float], Tensor]
RangesLike = Union[None, Sequence[Sequence[int]], Tensor]

_THRESHOLD_EXPECTED = ("a number <= 0 (log2 units; -inf never skips) or one such number per head "
                       "(a 1-D sequence, NumPy array or tensor)")


def _is_number(x) -> bool:
    # bool is an int to Python but never a meaningful threshold or token index.
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def _as_tensor(value, name: str, expected: str) -> Optional[Tensor]:
    """A CPU tensor view of a tensor or a NumPy array (None for anything else)."""
    if isinstance(value, Tensor):
        return value.detach().to("cpu")
    if isinstance(value, (np.ndarray, np.generic)):
        array = np.asarray(value)
        if array.dtype.kind not in "iuf":
            raise TypeError(f"{name} must be {expected}, got a NumPy value of dtype {array.dtype}")
        return torch.from_numpy(array.astype(np.float64 if array.dtype.kind == "f" else np.int64))
    return None


def threshold_values(value: ThresholdLike) -> list[float]:
    """The per-head threshold values of `value` (one value means: the same for every head).

    Raises TypeError for a value of the wrong kind and ValueError for a wrong shape or value."""
    if value is None or isinstance(value, (str, bytes)):
        raise TypeError(f"threshold must be {_THRESHOLD_EXPECTED}, got {type(value).__name__} {value!r}")
    tensor = _as_tensor(value, "threshold", _THRESHOLD_EXPECTED)
    if tensor is not None:
        if tensor.dtype == torch.bool or tensor.is_complex():
            raise TypeError(f"threshold must be {_THRESHOLD_EXPECTED}, got a tensor of dtype {tensor.dtype}")
        if tensor.dim() > 1:
            raise ValueError(f"threshold must be {_THRESHOLD_EXPECTED}, got a tensor of shape {tuple(tensor.shape)}")
        values = tensor.to(torch.float64).reshape(-1).tolist()
    elif _is_number(value):
        values = [float(value)]
    elif isinstance(value, Sequence):
        values = []
        for i, x in enumerate(value):
            if isinstance(x, Tensor) and x.dim() == 0 and not x.dtype == torch.bool:
                x = x.item()
            if not _is_number(x):
                raise TypeError(f"threshold must be {_THRESHOLD_EXPECTED}; element {i} is "
                                f"{type(x).__name__} {x!r}, not a number")
            values.append(float(x))
    else:
        raise TypeError(f"threshold must be {_THRESHOLD_EXPECTED}, got {type(value).__name__}")
    if not values:
        raise ValueError(f"threshold must be {_THRESHOLD_EXPECTED}, got an empty sequence")
    for i, x in enumerate(values):
        if math.isnan(x) or x > 0:
            where = "" if len(values) == 1 else f" (head {i})"
            raise ValueError(f"threshold must be <= 0 in log2 units (or -inf to never skip), got {x}{where}")
    return values


_RANGES_EXPECTED = "a list of (start, end) integer pairs ([start, end) key-token ranges) or an (R, 2) integer tensor, or None"


def ranges_tensor(name: str, ranges: RangesLike) -> Optional[Tensor]:
    """`ranges` as an int32 (R, 2) CPU tensor, or None when there are none.

    Raises TypeError for a value of the wrong kind (a string, a non-number element) and ValueError
    for a wrong shape, a fractional bound, or a range that is not 0 <= start < end."""
    if ranges is None:
        return None
    if isinstance(ranges, (str, bytes)) or _is_number(ranges):
        raise TypeError(f"{name} must be {_RANGES_EXPECTED}, got {type(ranges).__name__} {ranges!r}")
    t = _as_tensor(ranges, name, _RANGES_EXPECTED)
    if t is None:
        if not isinstance(ranges, Sequence):
            raise TypeError(f"{name} must be {_RANGES_EXPECTED}, got {type(ranges).__name__}")
        rows = []
        for i, pair in enumerate(ranges):
            as_tensor = None if isinstance(pair, (str, bytes)) else _as_tensor(pair, name, _RANGES_EXPECTED)
            if as_tensor is not None and as_tensor.dim() > 0:
                pair = as_tensor.reshape(-1).tolist() if as_tensor.dim() <= 1 else [as_tensor.tolist()]
            elif isinstance(pair, Sequence) and not isinstance(pair, (str, bytes)):
                pair = list(pair)
            else:
                raise TypeError(f"{name} must be {_RANGES_EXPECTED}; element {i} is {type(pair).__name__} {pair!r}")
            for x in pair:
                if not _is_number(x):
                    raise TypeError(f"{name} must be {_RANGES_EXPECTED}; element {i} holds "
                                    f"{type(x).__name__} {x!r}, not a number")
            if len(pair) != 2:
                raise ValueError(f"{name} must be {_RANGES_EXPECTED}; element {i} has {len(pair)} values: {pair}")
            rows.append([float(x) for x in pair])
        if not rows:
            return None
        t = torch.tensor(rows, dtype=torch.float64)
    elif t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must be {_RANGES_EXPECTED}, got a tensor of dtype {t.dtype}")
    if t.numel() == 0:
        return None
    if t.dim() != 2 or t.shape[1] != 2:
        raise ValueError(f"{name} must be {_RANGES_EXPECTED}, got shape {tuple(t.shape)}")
    if t.is_floating_point():
        if not bool(torch.isfinite(t).all()) or bool((t != t.round()).any()):
            raise ValueError(f"{name} bounds are token indices and must be integers, got {t.tolist()}")
    t = t.to(torch.int64)
    bad = (t[:, 0] < 0) | (t[:, 1] <= t[:, 0])
    if bool(bad.any()):
        raise ValueError(f"{name} ranges must satisfy 0 <= start < end, got {t[bad].tolist()}")
    if bool((t >= 2**31).any()):
        raise ValueError(f"{name} bounds must be below 2**31, got {t.tolist()}")
    return t.to(torch.int32)
