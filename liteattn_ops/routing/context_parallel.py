"""LiteAttention inside diffusers' context parallelism (diffusers >= 0.36, `enable_parallelism`).

How diffusers runs Ulysses: `model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=P))`
shards the hidden states along the sequence (hooks on the modules named in the model's
`_cp_plan`), gives every attention processor the config (`processor._parallel_config`), and the
processor's `dispatch_attention_fn` sends self-attention to the backend's templated CP attention:
`TemplatedUlyssesAttention` all-to-alls q, k, v from (B, S/P, H, D) to (B, S, H/P, D) — rank r gets
heads [r*H/P, (r+1)*H/P) — calls the backend's forward op, and all-to-alls the output back.

Where LiteAttention hooks in: the forward op of the "native" backend (diffusers' default) calls
`torch.nn.functional.scaled_dot_product_attention` on the head shard, inside the forward of the
attention module. That is the call `liteattn_ops.enable` routes to the module's site, so each rank
runs LiteAttention over the whole sequence for its heads, with a skip state of its own (B, H/P, Mt,
W) that equals the matching heads of the single-process state. No collective is added and no state
is ever communicated. `enable` and `enable_parallelism` may come in either order: neither touches
what the other installs (the router wraps the attention modules' forward; diffusers' CP hooks sit
on the modules of the plan, and the processor only gains its config).

What is refused (`check_module` raises ValueError; the routed forward of every site calls it, so
the error comes at the first forward, whatever the order of enable and enable_parallelism):
- ring_degree > 1 (ring, or unified ring x Ulysses): ring attention calls the backend once per KV
  chunk with return_lse=True and merges the partial results, so a skip state would have to live
  per (query tile, KV chunk) and the native forward op (the one the router can reach) refuses LSE
  outputs altogether. Use Ulysses.
- `ulysses_anything=True`: it pads heads (the padded heads are not the model's) and gathers
  unequal shards; not supported.
- attention backends other than "native" under CP: their forward ops call ATen's flash / cuDNN
  kernels directly, so no SDPA call would reach LiteAttention and the model would silently run
  dense. Use `model.set_attention_backend("native")` (the default) with LiteAttention.
- heads not divisible by the Ulysses degree (diffusers itself would fail in a reshape).

Per-head thresholds are given for every head of the model; a routed site keeps the values of its
rank's heads (`local_threshold`, called by the site when it sizes its threshold buffer).
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from torch import nn

NATIVE = "native"


def _context_parallel_config(module: nn.Module):
    processor = getattr(module, "processor", None)
    config = getattr(processor, "_parallel_config", None)
    return processor, getattr(config, "context_parallel_config", None)


def _backend_name(processor) -> str:
    backend = getattr(processor, "_attention_backend", None)
    if backend is None:
        dispatch = sys.modules.get("diffusers.models.attention_dispatch")   # loaded: it made the config
        registry = getattr(dispatch, "_AttentionBackendRegistry", None)
        backend = NATIVE if registry is None else registry._active_backend
    return str(getattr(backend, "value", backend))


def check_module(module: nn.Module, name: str = "") -> None:
    """Raise ValueError when `module` is a diffusers attention module under a context-parallel
    configuration LiteAttention cannot run (module docstring); nothing otherwise. Reads Python
    attributes only (Dynamo traces it and guards on them)."""
    ulysses_shard(module, name)


def ulysses_shard(module: nn.Module, name: str = "") -> Optional[tuple[int, int]]:
    """(rank in the Ulysses group, Ulysses degree P) of a diffusers attention module whose
    processor runs under context parallelism; None when it does not (or it is not a diffusers
    attention module). Raises ValueError like `check_module`."""
    processor, cp = _context_parallel_config(module)
    if cp is None:
        return None
    where = f"{name or type(module).__name__}: "
    if cp.ring_degree > 1:
        raise ValueError(
            f"{where}LiteAttention supports diffusers context parallelism with Ulysses only, got "
            f"ContextParallelConfig(ring_degree={cp.ring_degree}, ulysses_degree={cp.ulysses_degree}): ring attention "
            "merges partial results per KV chunk (skip states would have to live per chunk). Use "
            "ContextParallelConfig(ulysses_degree=P), or liteattn_ops.disable(model) for ring attention")
    if getattr(cp, "ulysses_anything", False):
        raise ValueError(f"{where}LiteAttention does not support ContextParallelConfig(ulysses_anything=True) (padded "
                         "heads, unequal shards): use a Ulysses degree that divides the heads and the sequence")
    backend = _backend_name(processor)
    if backend != NATIVE:
        raise ValueError(
            f"{where}under context parallelism LiteAttention is reached through the 'native' attention backend only, "
            f"but this module uses {backend!r} (its CP forward op calls ATen kernels directly: the model would run dense "
            "attention). Call model.set_attention_backend('native') before model.enable_parallelism(...)")
    heads = getattr(module, "heads", None)
    if heads is not None and heads % cp.ulysses_degree:
        raise ValueError(f"{where}{heads} attention heads cannot be split over ulysses_degree={cp.ulysses_degree} "
                         "ranks (each rank takes heads/P whole heads): choose a degree that divides the heads")
    return int(cp._ulysses_local_rank), int(cp.ulysses_degree)


def local_threshold(values: list[float], heads: int, shard: Optional[tuple[int, int]]) -> list[float]:
    """The threshold values of this rank's `heads` heads: one value, `heads` values (already
    local), or one value per head of the whole model (sliced to the rank's heads; `shard` is
    ulysses_shard(module), None outside context parallelism)."""
    if len(values) in (1, heads) or shard is None:
        return values
    rank, world = shard
    if len(values) != heads * world:
        raise ValueError(f"threshold has {len(values)} values but the attention has {heads * world} heads "
                         f"({heads} on each of {world} Ulysses ranks); give one float or one value per head")
    return values[rank * heads:(rank + 1) * heads]


def rank_threshold(model: nn.Module, threshold: Sequence[float]) -> list[float]:
    """This rank's slice of per-head thresholds given for every head of a context-parallel diffusers
    model: `liteattn_ops.enable(model, threshold=rank_threshold(model, per_head))` (a site sees its
    rank's H/P heads, so it takes H/P values). Call it after `model.enable_parallelism(...)`."""
    values = [float(x) for x in threshold]
    shards = {s for s in check_model(model).values() if s is not None}
    if not shards:
        raise ValueError(f"{type(model).__name__} has no attention module under context parallelism: call "
                         "model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=P)) first")
    (rank, world), = shards
    if len(values) % world:
        raise ValueError(f"threshold has {len(values)} values, not one per head of a model split over "
                         f"{world} Ulysses ranks")
    heads = len(values) // world
    return values[rank * heads:(rank + 1) * heads]


def check_model(model: nn.Module) -> dict[str, Optional[tuple[int, int]]]:
    """ulysses_shard for every diffusers attention module of `model` that calls attention through
    a processor: {module name: (rank, P) or None}. Raises for the first unsupported one."""
    return {name: ulysses_shard(module, name) for name, module in model.named_modules()
            if hasattr(module, "processor") and hasattr(module, "set_processor")}
