"""enable(model) / disable(model): route a model's scaled_dot_product_attention calls to
LiteAttention, with every skip state owned by the model.

Ownership. Every module whose forward calls SDPA (a *site*; found by `find_attention_modules`)
gets one child `liteattn`, an `AttentionSite` (a `LiteAttention`), and its `forward` is wrapped
so that, while it runs, its eligible SDPA calls go to that child
(`torch.nn.functional.scaled_dot_product_attention` is replaced by a wrapper that routes the
calls made inside a routed forward and passes every other call straight through). The child
keeps its skip states as non-persistent buffers, one per (call index in the forward, branch,
shape), named `state_<slot>_<branch>_<B>x<H>x<Sq>x<Sk>x<D>_<dtype>`. So each site of each model instance has its own states, `model.to(...)` moves them, the
state_dict is unchanged, and `torch.compile` sees them as ordinary module buffers: Dynamo lifts
them as graph inputs, so one graph reused for many blocks (regional compilation) or for two
instances of one class still updates each module's own state.

Tracing. The router is plain Python over tensor metadata, so Dynamo traces it (fullgraph, no
graph break) and the graph contains `liteattn.sparse_attention` on the lifted state buffers. A
state must exist before the trace that reads it: `AttentionSite` is a lazy module for Dynamo
(`LazyModuleMixin`), so Dynamo calls `AttentionSite._infer_parameters` with the (fake) inputs
before tracing a call, and that allocates the state for the shapes seen, for this site and for
the sites that play the same role in other blocks / instances of the same model class (so a
graph reused for them finds their states and does not recompile). Eager calls allocate on first
use. A new resolution gets new states; the states of other resolutions stay as they are.

Cond / uncond. Batched CFG (batch 2) gives each batch element its own state rows. Two separate
forwards per step (cond, then uncond) share the site's states by default (a tile negligible in
either pass is dropped for both); `with liteattn_ops.branch(model, "uncond"): ...` gives the
calls inside it their own states (under torch.compile: one extra graph per branch name).
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import types
import weakref
from collections import defaultdict
from typing import Callable, Iterable, Iterator, Optional, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin

from ..core.eligibility import GRAD, NOT_TENSORS, SDPA, bind_sdpa, ineligible_reason, warn_grad_once
from ..nn.attention import LiteAttention, RangesLike, ThresholdLike
from ..core.state import live_mask, new_state, reset_state

log = logging.getLogger("liteattn_ops")

SITE_ATTR = "liteattn"          # the child that owns a site's states
DEFAULT_BRANCH = "default"

SiteSelector = Union[None, Iterable[Union[str, type]], Callable[[str, nn.Module], bool]]


def _unfake(t: Tensor):
    """(shape as ints, dtype, device) of a real or fake tensor."""
    return tuple(int(s) for s in t.shape), t.dtype, t.device


class AttentionSite(LazyModuleMixin, LiteAttention):
    """The LiteAttention child of one routed module. Holds one skip state per (slot, branch, shape)
    and records what happened to each SDPA call of its module (see `report`).

    It subclasses LazyModuleMixin only so that Dynamo runs `_infer_parameters` before tracing a
    call (allocation happens eagerly, with real tensors, never inside a graph); the mixin's
    __init__ is not run, so nothing lazy happens in eager mode.
    """

    cls_to_become = None

    def __init__(self, threshold: ThresholdLike = -10.0, *, must_do: RangesLike = None,
                 must_skip: RangesLike = None, cross: str = "sdpa"):
        LiteAttention.__init__(self, threshold, must_do=must_do, must_skip=must_skip)
        if cross not in ("sdpa", "dense"):
            raise ValueError(f"cross must be 'sdpa' (leave cross-attention to SDPA) or 'dense', got {cross!r}")
        self.cross = cross
        self.branch = DEFAULT_BRANCH
        self._initialize_hook = None   # Dynamo treats a module with this attribute as lazy
        self._slots: dict[str, tuple] = {}      # state buffer name -> (slot, branch, shape key)
        self.decisions: dict[int, dict] = {}     # slot -> {"op" or "left": ..., "shapes": ...}
        self._role: Optional[tuple] = None       # sites with the same role share allocations
        self._current: Optional[str] = None      # the most recently allocated state

    def _device(self):
        return self.threshold_per_head.device if self.threshold_per_head is not None else "cpu"

    def live_mask(self, name: Optional[str] = None) -> Optional[Tensor]:
        """bool (B, H, Mt, Nt) of the state `name` (default: the most recently allocated one)."""
        name = name or self._current
        if name is None or self._buffers.get(name) is None:
            return None
        _, _, (_, _, _, seqlen_k, head_dim, dtype) = self._slots[name]
        return live_mask(self._buffers[name], seqlen_k, head_dim, dtype)

    # -- state ------------------------------------------------------------------------------
    def state_name(self, q: Tensor, k: Tensor, slot: int = 0) -> str:
        (batch, heads, seqlen_q, head_dim), dtype, _ = _unfake(q)
        seqlen_k = int(k.shape[2])
        dtype_name = str(dtype).removeprefix("torch.")
        return f"state_{slot}_{self.branch}_{batch}x{heads}x{seqlen_q}x{seqlen_k}x{head_dim}_{dtype_name}"

    def _replicate_for_data_parallel(self):  # LazyModuleMixin refuses; nothing here is lazy
        return nn.Module._replicate_for_data_parallel(self)

    def _needs_allocation(self, name: str, q: Tensor) -> bool:
        state, thr = self._buffers.get(name), self.threshold_per_head
        return (state is None or state.device != q.device or thr is None or thr.dtype != torch.float32
                or thr.device != q.device)

    def _allocate(self, q: Tensor, k: Tensor, slot: int, *, member: bool = False) -> None:
        """Make sure the state for this call exists (real tensors, even when q, k are fake).

        member=True: allocating for a site of the same role as the one being traced; only what is
        missing is created, nothing is replaced (that site may live on another device)."""
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        name = self.state_name(q, k, slot)
        (batch, heads, seqlen_q, head_dim), dtype, device = _unfake(q)
        seqlen_k = int(k.shape[2])
        with unset_fake_temporarily(), torch.no_grad():
            thr = self.threshold_per_head
            if thr is None or not member and (thr.dtype != torch.float32 or thr.device != device
                                              or thr.shape[0] != heads):
                # (model.to(dtype) casts float buffers; the op wants float32 thresholds)
                self.threshold_per_head = self._threshold_tensor(heads, device)
            for attr, ranges in (("must_do_ranges", self._must_do), ("must_skip_ranges", self._must_skip)):
                current = getattr(self, attr)
                if ranges is not None and (current is None or not member and current.device != device):
                    setattr(self, attr, ranges.to(device))
            state = self._buffers.get(name)
            if state is None or not member and state.device != device:
                self.register_buffer(name, new_state(batch, heads, seqlen_q, seqlen_k, head_dim, dtype, device),
                                     persistent=False)
                self._slots[name] = (slot, self.branch, (batch, heads, seqlen_q, seqlen_k, head_dim, dtype))
                if len(self._slots) > 1:
                    log.info("liteattn site: new skip state %s", name)
            # The most recent state is the one live_mask / live_fraction / stats(model) show (a
            # same-role allocation only fills in a site that has none yet).
            if not member or self._current is None:
                self._current = name

    def _infer_parameters(self, module, args, kwargs=None):
        """Called by Dynamo, eagerly, before it traces a call of this module (fake args). The
        decision and the state are also given to the sites of the same role (the same attention in
        the other blocks and instances), which reuse the graph without being traced."""
        kwargs = kwargs or {}
        q, k = args[0], args[1]
        slot = int(kwargs.get("slot", 0))
        left = kwargs.get("left")
        if left == GRAD:
            warn_grad_once()
        if self._role is not None:
            _ROLES[self._role].add(self)   # e.g. a deepcopy of an enabled model joins its role here
        for site in (*_role_members(self), self):
            if left is not None:
                site._note(slot, left, q, k)
            elif k.shape[2] != q.shape[2]:  # dense cross-attention: no state
                site._note(slot, None, q, k, op="liteattn.attention")
            else:
                site._note(slot, None, q, k)
                site._allocate(q, k, slot, member=site is not self)

    def _note(self, slot: int, left: Optional[str], q: Tensor, k: Tensor, op: str = "liteattn.sparse_attention"):
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

    def states(self) -> dict[str, Tensor]:
        """All skip states of this site: buffer name -> int32 tensor."""
        return {name: self._buffers[name] for name in self._slots if self._buffers.get(name) is not None}

    def reset(self) -> None:
        """Every state of this site (all slots, branches, shapes) back to all-live, in place."""
        for state in self.states().values():
            reset_state(state)
        self.calls = 0

    # -- call -------------------------------------------------------------------------------
    def forward(self, q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None, slot: int = 0,
                left: Optional[str] = None):
        if left is not None:  # an SDPA call the router leaves alone: only recorded
            if not torch.compiler.is_compiling():
                self._note(slot, left, q, k)
            return None
        if k.shape[2] != q.shape[2]:
            if not torch.compiler.is_compiling():
                self._note(slot, None, q, k, op="liteattn.attention")
            return torch.ops.liteattn.attention(q, k, v, scale)[0]
        name = self.state_name(q, k, slot)
        if self._needs_allocation(name, q):  # eager (under Dynamo, _infer_parameters did it)
            if torch.compiler.is_exporting():
                # A state created while torch.export traces would become a constant of the program.
                raise RuntimeError(
                    f"liteattn: torch.export reached an attention site with no skip state for {name}: run the "
                    "model once on inputs of the export shapes first, or use liteattn_ops.export(model, args)")
            self._note(slot, None, q, k)
            self._allocate(q, k, slot)
        out, _ = torch.ops.liteattn.sparse_attention(
            q, k, v, self._buffers[name], self.threshold_per_head, self.must_do_ranges, self.must_skip_ranges, scale)
        if not torch.compiler.is_compiling():
            self.calls += 1
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, cross={self.cross!r}, states={len(self._slots)}"


# ------------------------------------------------------------------------------------------------
# Roles: the same site in other blocks of one model, and in other instances of the model class
# ------------------------------------------------------------------------------------------------

_ROLES: dict[tuple, "weakref.WeakSet[AttentionSite]"] = defaultdict(weakref.WeakSet)


def _role_members(site: AttentionSite) -> list[AttentionSite]:
    if site._role is None:
        return []
    return [s for s in _ROLES[site._role] if s is not site and s.branch == site.branch]


def _role(root: nn.Module, name: str) -> tuple:
    # blocks.3.attn1 -> blocks.*.attn1 ; the class of the model makes instances of it share roles
    return (type(root), re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.|$)", "*", name))


# ------------------------------------------------------------------------------------------------
# Routing
# ------------------------------------------------------------------------------------------------

class _Route:
    """One running forward of a routed module: its site and the index of its next SDPA call."""

    def __init__(self, site: AttentionSite):
        self.site = site
        self.slot = 0


# The routed forwards running now, innermost last. Eager calls keep one stack per thread; while
# Dynamo traces, it runs this Python symbolically on the module-level list, which therefore stays
# empty at run time (compiled code reads no stack: the routing is already in the graph).
_ROUTES: list[_Route] = []
_THREAD = threading.local()
_ORIGINAL_SDPA = SDPA


def _routes() -> list[_Route]:
    if torch.compiler.is_compiling():
        return _ROUTES
    routes = getattr(_THREAD, "routes", None)
    if routes is None:
        routes = _THREAD.routes = []
    return routes


def _route_sdpa(route: _Route, args: tuple, kwargs: dict):
    slot = route.slot
    route.slot += 1
    site = route.site
    call = bind_sdpa(args, kwargs)
    reason = ineligible_reason(**call, allow_cross=site.cross == "dense")
    if reason == NOT_TENSORS:
        return _ORIGINAL_SDPA(*args, **kwargs)
    if reason is None:
        return site(call["query"], call["key"], call["value"], scale=call["scale"], slot=slot)
    if reason == GRAD and not torch.compiler.is_compiling():
        warn_grad_once()
    site(call["query"], call["key"], call["value"], slot=slot, left=reason)
    return _ORIGINAL_SDPA(*args, **kwargs)


def scaled_dot_product_attention(*args, **kwargs):
    """What torch.nn.functional.scaled_dot_product_attention is once enable() ran: the original
    SDPA, except inside the forward of a routed module, where the call goes to its site."""
    routes = _routes()
    if routes:
        return _route_sdpa(routes[-1], args, kwargs)
    return _ORIGINAL_SDPA(*args, **kwargs)


scaled_dot_product_attention.__doc__ += "\n\n" + (_ORIGINAL_SDPA.__doc__ or "")


def _install_sdpa_hook() -> None:
    """Replace torch.nn.functional.scaled_dot_product_attention by the routing wrapper (once;
    outside routed forwards it only calls the original). Code that calls torch._C._nn's SDPA
    directly, or bound the function to another name before this ran, is not routed."""
    import torch.nn.functional as F

    if F.scaled_dot_product_attention is not scaled_dot_product_attention:
        F.scaled_dot_product_attention = scaled_dot_product_attention


def _routed_forward(self, *args, **kwargs):
    routes = _routes()
    routes.append(_Route(self._modules[SITE_ATTR]))
    try:
        inner = self.__dict__.get("_liteattn_inner_forward")
        if inner is not None:
            return inner(*args, **kwargs)
        return type(self).forward(self, *args, **kwargs)
    finally:
        routes.pop()


def _calls_sdpa(fn) -> bool:
    code = getattr(fn, "__code__", None)
    if code is None:
        return False
    stack = [code]
    while stack:
        c = stack.pop()
        if "scaled_dot_product_attention" in c.co_names:
            return True
        stack.extend(x for x in c.co_consts if isinstance(x, types.CodeType))
    return False


def find_attention_modules(model: nn.Module, sites: SiteSelector = None) -> list[tuple[str, nn.Module]]:
    """(name, module) of the modules whose own forward makes SDPA calls.

    Default rule, no inputs needed: a diffusers attention module (it has `processor` and
    `set_processor`; its processor calls SDPA through diffusers' attention dispatch), or any module
    whose forward's code names `scaled_dot_product_attention`. `sites` overrides it: module names,
    module classes, or a predicate (name, module) -> bool.
    """
    found = []
    for name, module in model.named_modules():
        if isinstance(module, LiteAttention):
            continue
        if sites is None:
            hit = (hasattr(module, "processor") and hasattr(module, "set_processor")) or \
                _calls_sdpa(getattr(type(module), "forward", None))
        elif callable(sites) and not isinstance(sites, type):
            hit = bool(sites(name, module))
        else:
            hit = any(name == s if isinstance(s, str) else isinstance(module, s) for s in sites)
        if hit:
            found.append((name, module))
    return found


def enable(model: nn.Module, threshold: ThresholdLike = -10.0, *, must_do: RangesLike = None,
           must_skip: RangesLike = None, cross: str = "sdpa", sites: SiteSelector = None) -> list[str]:
    """Route the SDPA calls of `model` to LiteAttention, eagerly and under torch.compile.

    Each module that calls SDPA gets a child `liteattn` (an AttentionSite, which owns its skip
    states) and a wrapped forward. Eligible self-attention becomes `liteattn.sparse_attention`;
    cross-attention (S_q != S_k) is left to SDPA (`cross="sdpa"`) or runs the dense op
    (`cross="dense"`); ineligible calls are left alone with a reason (`report(model)`).
    Calling enable again updates threshold/ranges/cross of the existing sites. Returns the names
    of the routed modules. Inference only: with grad on, calls stay SDPA (warned once).
    """
    _install_sdpa_hook()
    names = []
    for name, module in find_attention_modules(model, sites):
        site = module._modules.get(SITE_ATTR)
        if isinstance(site, AttentionSite):
            site.threshold = threshold
            site.set_ranges(must_do, must_skip)
            site.cross = cross
        else:
            if SITE_ATTR in module._modules or hasattr(module, SITE_ATTR):
                raise ValueError(f"{name or type(model).__name__} already has an attribute {SITE_ATTR!r}")
            site = AttentionSite(threshold, must_do=must_do, must_skip=must_skip, cross=cross)
            module.add_module(SITE_ATTR, site)
            inner = module.__dict__.get("forward")
            if inner is not None:
                module._liteattn_inner_forward = inner
            module.forward = types.MethodType(_routed_forward, module)
        site._role = _role(model, name)
        _ROLES[site._role].add(site)
        names.append(name)
    if not names:
        log.warning("liteattn enable: no module of %s calls scaled_dot_product_attention; pass sites=...",
                    type(model).__name__)
    return names


def disable(model: nn.Module) -> list[str]:
    """Undo enable(model): original forwards back, site children (and their states) removed."""
    names = []
    for name, module in list(model.named_modules()):
        site = module._modules.get(SITE_ATTR)
        if not isinstance(site, AttentionSite):
            continue
        if site._role is not None:
            _ROLES[site._role].discard(site)
        del module._modules[SITE_ATTR]
        module.__dict__.pop("forward", None)
        inner = module.__dict__.pop("_liteattn_inner_forward", None)
        if inner is not None:
            module.forward = inner
        names.append(name)
    return names


def routed_sites(model: nn.Module) -> Iterator[tuple[str, AttentionSite]]:
    """(routed module name, its AttentionSite) for every site of `model`."""
    for name, module in model.named_modules():
        site = module._modules.get(SITE_ATTR)
        if isinstance(site, AttentionSite):
            yield name, site


@contextlib.contextmanager
def branch(model: nn.Module, name: str):
    """Calls inside use (and create) the states of branch `name` (e.g. "uncond") instead of the
    default ones, so separate cond / uncond forwards each keep their own skip states."""
    if not name.isidentifier():
        raise ValueError(f"branch name must be an identifier, got {name!r}")
    sites = [site for _, site in routed_sites(model)]
    previous = [site.branch for site in sites]
    for site in sites:
        site.branch = name
    try:
        yield
    finally:
        for site, old in zip(sites, previous):
            site.branch = old


def report(model: nn.Module) -> dict[str, dict]:
    """Per routed module: what happened to each SDPA call (slot = its index within one forward):
    {"op": "liteattn.sparse_attention" | "liteattn.attention"} or {"left": reason}, the shapes
    seen, and the skip states the site owns. Also filled by compiled runs (recorded while Dynamo
    traces). The backend's per-graph reports are in liteattn_ops.graph_pass.REPORTS."""
    out = {}
    for name, site in routed_sites(model):
        out[name] = {
            "calls": dict(sorted(site.decisions.items())),
            "states": {key: tuple(t.shape) for key, t in site.states().items()},
        }
    return out


def format_report(model: nn.Module) -> str:
    """report(model) as text, one line per SDPA call site."""
    lines = []
    for name, entry in report(model).items():
        for slot, decision in entry["calls"].items():
            what = decision.get("op") or f"left: {decision['left']}"
            lines.append(f"{name or '<root>'}[{slot}]: {what}  shapes {decision['shapes']}")
        if not entry["calls"]:
            lines.append(f"{name or '<root>'}: not called yet")
    return "\n".join(lines)
