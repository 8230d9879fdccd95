"""AttentionSite: the LiteAttention child (`liteattn`) that liteattn_ops.enable gives a module whose
forward calls scaled_dot_product_attention, and the role groups that let one compiled graph serve
several such modules.

A site is a LiteAttention (the one state store: nn/attention.py) that keeps one skip state per
(call slot, branch, shape) and records what happened to each SDPA call of its module (`report`).

Roles. Blocks of one model play the same role (`blocks.3.attn1` and `blocks.7.attn1`); under
regional compilation one graph runs all of them, and each must already own the buffers that graph
reads, or Dynamo recompiles. So when Dynamo is about to trace a call of one site, the state is
allocated for every site of its role group too. A role group is scoped to the root passed to
enable(): a model, or a diffusers pipeline (whose two Wan2.2 experts then share roles); two models
enabled separately never touch each other's sites. The group is a plain object referenced by its
sites (it pickles and deep-copies with them).
"""

from __future__ import annotations

import re
import types
import warnings
from typing import Callable, Iterable, Optional, Union

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..core.eligibility import GRAD, NOT_TENSORS, SDPA, bind_sdpa, ineligible_reason, warn_grad_once
from ..nn.attention import LiteAttention, RangesLike, ThresholdLike, restart_if_stale
from .context_parallel import check_module, local_threshold, ulysses_shard
from . import dispatch

SITE_ATTR = "liteattn"          # the child that owns a site's states

SiteSelector = Union[None, Iterable[Union[str, type]], Callable[[str, nn.Module], bool]]


class RoleGroup:
    """The sites of one root that play the same role (same module class, same name up to block
    indices)."""

    def __init__(self, key: tuple):
        self.key = key
        self.members: list[AttentionSite] = []

    def add(self, site: "AttentionSite") -> None:
        if not any(s is site for s in self.members):
            self.members.append(site)

    def discard(self, site: "AttentionSite") -> None:
        self.members = [s for s in self.members if s is not site]


def role_key(module: nn.Module, name: str) -> tuple:
    # blocks.3.attn1 -> blocks.*.attn1 (and 0.blocks.3.attn -> *.blocks.*.attn)
    return (type(module).__qualname__, re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.|$)", "*", name))


class AttentionSite(LiteAttention):
    """The LiteAttention child of one routed module: one skip state per (slot, branch, shape), the
    decision taken for each SDPA call of its module, and its role group."""

    _per_shape = True

    def __init__(self, threshold: ThresholdLike = -10.0, *, must_do: RangesLike = None,
                 must_skip: RangesLike = None, cross: str = "sdpa", warmup_steps: int = 0, use_int8: bool = False):
        super().__init__(threshold, must_do=must_do, must_skip=must_skip, warmup_steps=warmup_steps,
                         use_int8=use_int8)
        self.cross = check_cross(cross)
        self.decisions: dict[int, dict] = {}     # slot -> {"op" or "left": ..., "shapes": ...}
        self.bypassed: Optional[str] = None      # the diffusers attention backend that bypasses it
        self.group: Optional[RoleGroup] = None
        # The routed module and its original forward; plain attributes (not a child module).
        self.__dict__["_owner"] = None
        self._inner_forward = None
        self._inner_bound = False

    # -- routing ----------------------------------------------------------------------------
    def attach(self, module: nn.Module) -> None:
        """Become `module`'s site: its forward becomes `self.route` (see routing/router.py)."""
        inner = module.__dict__.get("forward")
        self.__dict__["_owner"] = module
        self._inner_forward = inner if inner is not None else type(module).forward
        self._inner_bound = inner is not None
        module.forward = self.route

    def detach(self, module: nn.Module) -> None:
        module.__dict__.pop("forward", None)
        if self._inner_bound:
            module.forward = self._inner_forward     # the instance forward that was there before
        self.__dict__["_owner"] = None
        self._inner_forward = None

    def route(self, *args, **kwargs):
        """The routed module's forward: its own forward, with its SDPA calls sent to this site."""
        module = self._owner
        inner = self._inner_forward
        check_module(module)   # diffusers context parallelism LiteAttention cannot run: a clear error
        bypass = dispatch.bypassing_backend(module)
        if bypass is not None:
            # diffusers sends this module's attention to a backend that never calls SDPA: say so
            # (once, by name: the call goes through the site so Dynamo's eager hook sees it too).
            self(None, None, None, bypass=bypass)
            return inner(*args, **kwargs) if self._inner_bound else inner(module, *args, **kwargs)
        with _RouteMode(self):
            return inner(*args, **kwargs) if self._inner_bound else inner(module, *args, **kwargs)

    def _threshold_list(self, values: list[float], heads: int) -> list[float]:
        # Under diffusers' Ulysses a site sees its rank's H/P heads: values given for every head of
        # the model are sliced to this rank's (liteattn_ops/routing/context_parallel.py).
        owner = self.__dict__.get("_owner")
        if len(values) not in (1, heads) and owner is not None:
            values = local_threshold(values, heads, ulysses_shard(owner))
        return super()._threshold_list(values, heads)

    def _members(self) -> list["AttentionSite"]:
        if self.group is None:
            return []
        return [s for s in self.group.members if s is not self and s.branch == self.branch]

    def _infer_parameters(self, module, args, kwargs=None):
        """Called by Dynamo, eagerly, before it traces a call of this module (fake args). The
        decision and the state are also given to the sites of the same role, which reuse the graph
        without being traced."""
        kwargs = kwargs or {}
        bypass = kwargs.get("bypass")
        if bypass is not None:
            self._note_bypass(bypass)
            return
        q, k = args[0], args[1]
        slot = int(kwargs.get("slot", 0))
        left = kwargs.get("left")
        if left == GRAD:
            warn_grad_once()
        allocated = []
        for site in (*self._members(), self):
            if left is not None:
                site._note(slot, left, q, k)
            elif k.shape[2] != q.shape[2]:  # dense cross-attention: no state
                site._note(slot, None, q, k, op="liteattn.attention")
            else:
                site._note(slot, None, q, k)
                if site._allocate(q, k, slot, member=site is not self):
                    allocated.append(site)
        restart_if_stale([self], allocated)

    def _note(self, slot: int, left: Optional[str], q: Tensor, k: Tensor, op: str = "liteattn.sparse_attention"):
        self.bypassed = None
        entry = self.decisions.setdefault(slot, {"shapes": []})
        if left is None:
            entry.pop("left", None)
            entry["op"] = op
        else:
            entry.pop("op", None)
            entry["left"] = left
        shapes = (tuple(int(s) for s in q.shape), tuple(int(s) for s in k.shape))
        if shapes not in entry["shapes"]:
            entry["shapes"].append(shapes)

    def _note_bypass(self, backend: str) -> None:
        if self.bypassed != backend:
            self.bypassed = backend
            warnings.warn(
                f"liteattn: {self.routed_name or 'a routed module'} runs its attention through the diffusers "
                f"attention backend {backend!r}, which does not call scaled_dot_product_attention: LiteAttention "
                "is bypassed there (dense attention, no skipping). Use the 'native' backend "
                "(module.set_attention_backend('native')) to skip tiles.", stacklevel=3)

    routed_name: Optional[str] = None    # set by enable(): the routed module's name, for messages

    # -- call -------------------------------------------------------------------------------
    def forward(self, q: Optional[Tensor], k: Optional[Tensor], v: Optional[Tensor], scale: Optional[float] = None,
                slot: int = 0, left: Optional[str] = None, bypass: Optional[str] = None):
        if bypass is not None:   # the module's attention goes to another diffusers backend
            if not torch.compiler.is_compiling():
                self._note_bypass(bypass)
            return None
        if left is not None:     # an SDPA call the router leaves alone: only recorded
            if not torch.compiler.is_compiling():
                self._note(slot, left, q, k)
            return None
        if k.shape[2] != q.shape[2]:
            if not torch.compiler.is_compiling():
                self._note(slot, None, q, k, op="liteattn.attention")
            return torch.ops.liteattn.attention(q, k, v, scale, **self._mode())[0]
        if not torch.compiler.is_compiling():
            self._note(slot, None, q, k)
        return self._sparse(q, k, v, scale, slot)[0]

    def _extra_stats(self) -> dict:
        return {"bypassed": self.bypassed}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, cross={self.cross!r}, states={len(self._slots)}"


def check_cross(cross: str) -> str:
    if cross not in ("sdpa", "dense"):
        raise ValueError(f"cross must be 'sdpa' (leave cross-attention to SDPA) or 'dense', got {cross!r}")
    return cross


# ------------------------------------------------------------------------------------------------
# The routing mode: a TorchFunctionMode entered by the routed forward
# ------------------------------------------------------------------------------------------------

_PY_TENSOR_METHODS = tuple(f for f in vars(torch.Tensor).values() if isinstance(f, types.FunctionType))


class _RouteMode(TorchFunctionMode):
    """Active while one routed module's forward runs: its SDPA calls go to its site, numbered by
    their order in the forward (the slot); every other call passes through."""

    def __init__(self, site: AttentionSite):
        super().__init__()
        self.site = site
        self.slot = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is SDPA:
            slot = self.slot
            self.slot += 1
            return _route_sdpa(self.site, slot, args, kwargs)
        if func in _PY_TENSOR_METHODS and args:
            # A Tensor method written in Python (Tensor.unflatten, .split, ...): call it as a
            # method, which Dynamo traces natively (it cannot trace their `super()` call). A tuple:
            # Dynamo evaluates membership in it by identity; it does not look up dicts by function.
            return getattr(args[0], func.__name__)(*args[1:], **kwargs)
        return func(*args, **kwargs)


def _route_sdpa(site: AttentionSite, slot: int, args: tuple, kwargs: dict):
    call = bind_sdpa(args, kwargs)
    reason = ineligible_reason(**call, allow_cross=site.cross == "dense")
    if reason == NOT_TENSORS:
        return SDPA(*args, **kwargs)
    if reason is None:
        return site(call["query"], call["key"], call["value"], scale=call["scale"], slot=slot)
    if reason == GRAD and not torch.compiler.is_compiling():
        warn_grad_once()
    site(call["query"], call["key"], call["value"], slot=slot, left=reason)
    return SDPA(*args, **kwargs)
