"""enable(model) / disable(model): route a model's scaled_dot_product_attention calls to
LiteAttention, with every skip state owned by the model.

Interception is scoped. Every module whose forward calls SDPA (a *site*; `find_attention_modules`)
gets a child `liteattn` (an AttentionSite, routing/sites.py) and an instance `forward` that runs
the module's own forward inside a `torch.overrides.TorchFunctionMode` (`_RouteMode`). The mode
sees every SDPA call made while that forward runs, however the code reached SDPA
(`F.scaled_dot_product_attention`, `torch._C._nn...`, diffusers' native dispatcher backend), and
sends the eligible ones to the site; everything else passes through. Nothing process-wide is
patched: `torch.nn.functional.scaled_dot_product_attention` is never replaced, code outside a
routed forward is never touched, and disable() restores the module's forward. Modes are
thread-local, so threads route to their own models. Dynamo traces the mode (fullgraph, no graph
break, no recompile on the second call: tests/test_routing.py), and the graph then contains
`liteattn.sparse_attention` on the site's lifted state buffers.

The instance forward is the bound method `site.route` of the module's own site (it keeps the
module's original forward: the class's forward function, or an instance forward already there,
e.g. an accelerate hook). A bound method of the site's class pickles and deep-copies (pickle
stores it as getattr(site, "route")); Dynamo guards on its function, which every site shares, so
one graph serves every block; and the original is called as a function, never through a
`type(self).forward` lookup inside the graph (which Dynamo refuses for diffusers' legacy
`Attention` class).

States must exist before the trace that reads them: AttentionSite is a lazy module for Dynamo, so
Dynamo runs its `_infer_parameters` eagerly before tracing a call, which allocates the state for
the shapes seen, for this site and for its role group (routing/sites.py). Eager calls allocate on
first use. A new resolution gets new states; the states of other resolutions stay as they are.

Cond / uncond. Batched CFG (batch 2) gives each batch element its own state rows. Separate cond
and uncond forwards share the site's states unless they run under different branch names:
`with liteattn_ops.branch(model, "uncond"): ...`, or diffusers' `model.cache_context("uncond")`
once the pipeline or model is enabled (routing/pipelines.py).
"""

from __future__ import annotations

import contextlib
import logging
import types
from typing import Iterator, Optional

import torch
from torch import nn

from ..nn.attention import (DEFAULT_BRANCH, LiteAttention, RangesLike, ThresholdLike, _ranges_tensor,
                             _threshold_values, check_use_int8, check_warmup_steps)
from .sites import SITE_ATTR, AttentionSite, RoleGroup, SiteSelector, check_cross, role_key

log = logging.getLogger("liteattn_ops")


# ------------------------------------------------------------------------------------------------
# Finding sites
# ------------------------------------------------------------------------------------------------

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
    `set_processor`; its processor calls SDPA, directly or through diffusers' attention dispatch),
    or any module whose forward's code names `scaled_dot_product_attention`. `sites` overrides it:
    module names, module classes, or a predicate (name, module) -> bool.
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


# ------------------------------------------------------------------------------------------------
# enable / disable
# ------------------------------------------------------------------------------------------------

def enable(model, threshold: ThresholdLike = -10.0, *, must_do: RangesLike = None, must_skip: RangesLike = None,
           cross: str = "sdpa", sites: SiteSelector = None, warmup_steps: int = 0, use_int8: bool = False):
    """Route the SDPA calls of `model` to LiteAttention, eagerly and under torch.compile.

    `model`: an nn.Module (returns the names of the routed modules), or a diffusers
    DiffusionPipeline (enables every transformer component and hooks the pipeline so that every
    call starts fresh skip states; returns the pipeline; see routing/pipelines.py).

    Each module that calls SDPA gets a child `liteattn` (an AttentionSite, which owns its skip
    states) and a routed forward. Eligible self-attention becomes `liteattn.sparse_attention`;
    cross-attention (S_q != S_k) is left to SDPA (`cross="sdpa"`) or runs the dense op
    (`cross="dense"`); ineligible calls are left alone with a reason (`report(model)`).
    `warmup_steps=k`: the first k calls of every state after a reset are dense (k denoising steps
    per branch). `use_int8=True`: the INT8 Q/K mode of the op, for the sparse and the dense calls
    (README "INT8 Q/K mode"). Calling enable again updates the options of the existing sites.
    Inference only: with grad on, calls stay SDPA (warned once).
    """
    from .pipelines import enable_pipeline, is_pipeline, route_cache_context

    if is_pipeline(model):
        return enable_pipeline(model, threshold=threshold, must_do=must_do, must_skip=must_skip, cross=cross,
                               sites=sites, warmup_steps=warmup_steps, use_int8=use_int8)
    if not isinstance(model, nn.Module):
        raise TypeError(f"enable() takes a torch.nn.Module or a diffusers DiffusionPipeline, got {type(model).__name__}")
    names = enable_module(model, threshold, must_do=must_do, must_skip=must_skip, cross=cross, sites=sites,
                          warmup_steps=warmup_steps, use_int8=use_int8)
    if names:
        route_cache_context(model)     # diffusers models: cache_context("uncond") selects a branch
    return names


def enable_module(model: nn.Module, threshold: ThresholdLike = -10.0, *, must_do: RangesLike = None,
                  must_skip: RangesLike = None, cross: str = "sdpa", sites: SiteSelector = None,
                  warmup_steps: int = 0, use_int8: bool = False, groups: Optional[dict] = None,
                  prefix: str = "") -> list[str]:
    """enable() for one module. `groups` (role key -> RoleGroup) is shared by the modules of one
    root (a pipeline's transformers); by default the groups are this module's own."""
    check_cross(cross)
    check_warmup_steps(warmup_steps)
    check_use_int8(use_int8)
    _threshold_values(threshold)
    _ranges_tensor("must_do", must_do)
    _ranges_tensor("must_skip", must_skip)
    found = find_attention_modules(model, sites)
    # Validate everything before changing anything.
    for name, module in found:
        site = module._modules.get(SITE_ATTR)
        if not isinstance(site, AttentionSite):
            if SITE_ATTR in module._modules or hasattr(module, SITE_ATTR):
                raise ValueError(f"{name or type(model).__name__} already has an attribute {SITE_ATTR!r}")
        else:
            site._checked_threshold(threshold)
    if groups is None:
        groups = {}
        for _, site in routed_sites(model):
            if site.group is not None:
                groups.setdefault(site.group.key, site.group)
    names = []
    for name, module in found:
        site = module._modules.get(SITE_ATTR)
        if isinstance(site, AttentionSite):
            site.threshold = threshold
            site.set_ranges(must_do, must_skip)
            site.cross = cross
            site.warmup_steps = warmup_steps
            site.use_int8 = use_int8
        else:
            site = AttentionSite(threshold, must_do=must_do, must_skip=must_skip, cross=cross,
                                 warmup_steps=warmup_steps, use_int8=use_int8)
            module.add_module(SITE_ATTR, site)
            site.attach(module)
        site.routed_name = prefix + name
        key = role_key(module, name)
        if site.group is None or site.group.key != key or groups.get(key) is not site.group:
            if site.group is not None:
                site.group.discard(site)
            site.group = groups.setdefault(key, RoleGroup(key))
        site.group.add(site)
        names.append(name)
    if not names:
        log.warning("liteattn enable: no module of %s calls scaled_dot_product_attention; pass sites=...",
                    type(model).__name__)
    return names


def disable(model):
    """Undo enable(model): original forwards back, site children (and their states) removed.
    For a pipeline: every component, and the pipeline's call hook. Returns what enable returned
    (the module names, or the pipeline)."""
    from .pipelines import disable_pipeline, is_pipeline, unroute_cache_context

    if is_pipeline(model):
        return disable_pipeline(model)
    unroute_cache_context(model)
    names = []
    for name, module in list(model.named_modules()):
        site = module._modules.get(SITE_ATTR)
        if not isinstance(site, AttentionSite):
            continue
        if site.group is not None:
            site.group.discard(site)
            site.group = None
        site.detach(module)
        del module._modules[SITE_ATTR]
        names.append(name)
    return names


def routed_sites(model: nn.Module) -> Iterator[tuple[str, AttentionSite]]:
    """(routed module name, its AttentionSite) for every site of `model`."""
    for name, module in model.named_modules():
        site = module._modules.get(SITE_ATTR)
        if isinstance(site, AttentionSite):
            yield name, site


@contextlib.contextmanager
def branch(model, name: str):
    """Calls inside use (and create) the states of branch `name` (e.g. "uncond") instead of the
    default ones, so separate cond / uncond forwards each keep their own skip states. (diffusers'
    `cache_context(name)` does this by itself on an enabled model.)"""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"branch name must be an identifier, got {name!r}")
    from .pipelines import modules_of

    sites = [site for _, m in modules_of(model) for _, site in routed_sites(m)]
    previous = [site.branch for site in sites]
    for site in sites:
        site.branch = name
    try:
        yield
    finally:
        for site, old in zip(sites, previous):
            site.branch = old


__all__ = ["AttentionSite", "DEFAULT_BRANCH", "branch", "disable", "enable", "find_attention_modules",
           "routed_sites"]
