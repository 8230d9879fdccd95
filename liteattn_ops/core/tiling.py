"""Tile shapes: the (BM, BN) blocking that the kernel uses and that the skip state is kept at.

`tile_shapes.json` beside this file is the single source of truth; CMake turns the same file into
the C++ header the kernel is instantiated from, so Python and C++ can never disagree.
"""

from __future__ import annotations

import functools
import json
from importlib import resources

import torch

_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


@functools.cache
def _table() -> dict[tuple[int, str], tuple[int, int]]:
    text = resources.files(__package__).joinpath("tile_shapes.json").read_text()
    return {(e["head_dim"], e["dtype"]): (e["BM"], e["BN"]) for e in json.loads(text)["shapes"]}


def supported_head_dims() -> tuple[int, ...]:
    return tuple(sorted({head_dim for head_dim, _ in _table()}))


def tile_shape(head_dim: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BM, BN): query rows and key columns of one tile for this head dim and dtype.

    float32 is accepted for the CPU reference and uses the bfloat16 tiles, so a float32 run
    reproduces the skip decisions a bfloat16 run would make on the same values.
    """
    if dtype == torch.float32:
        dtype = torch.bfloat16
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        raise TypeError(f"dtype must be torch.bfloat16 or torch.float16 (torch.float32 on CPU), got {dtype}")
    shape = _table().get((int(head_dim), name))
    if shape is None:
        raise ValueError(f"head_dim must be one of {supported_head_dims()}, got {head_dim}")
    return shape


def num_tiles(length, block: int):
    """ceil(length / block); works on ints and SymInts."""
    return (length + block - 1) // block
