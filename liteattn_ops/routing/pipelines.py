"""diffusers pipelines: enable(pipe), a fresh skip state for every video, CFG branches.

    pipe = liteattn_ops.enable(WanPipeline.from_pretrained(...), threshold=-10.0, warmup_steps=2)
    video_a = pipe(prompt_a).frames        # every call starts with every tile live
    video_b = pipe(prompt_b).frames        # == what a fresh pipeline gives for prompt_b
    liteattn_ops.disable(pipe)

What enable(pipe) does:
- every transformer component (`transformer`, `transformer_2`, ...: a diffusers model from
  `diffusers.models.transformers`, or any component whose name starts with "transformer") is
  enabled, with role groups shared by all of them (one compiled graph serves Wan2.2's two
  experts). UNets are left as they are, with a log line; text encoders and VAEs are not touched.
- New video = new call. The pipeline instance gets a call hook: its class is swapped for a
  subclass (made once per pipeline class, same name and module) whose `__call__` runs
  `new_video(pipe)` (every state of every component back to all-live, every call counter and
  warm-up count to 0, in place: no recompile) and then the pipeline's own `__call__`. Only this
  instance is affected; disable(pipe) puts the original class back. (A pickled pipeline loads as
  its original class, without the hook.)
- CFG branches. Each enabled component gets an instance `cache_context` that enters diffusers'
  own `cache_context(name)` and `branch(component, name)`: the "cond" and "uncond" forwards that
  diffusers' pipelines run under those names keep their own skip states (under torch.compile: one
  graph per branch name, then cached).

A model used without a pipeline keeps the explicit `liteattn_ops.reset(model)`, or
`liteattn_ops.new_video(model)` (also usable as `with liteattn_ops.new_video(model): ...`). Its
`cache_context` is routed to branches as soon as the model is enabled.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import sys
from typing import Iterator

from torch import nn

log = logging.getLogger("liteattn_ops")


def _diffusers():
    return sys.modules.get("diffusers")


def is_pipeline(obj) -> bool:
    diffusers = _diffusers()
    if diffusers is None or isinstance(obj, nn.Module):
        return False
    return isinstance(obj, diffusers.DiffusionPipeline)


def modules_of(obj) -> list[tuple[str, nn.Module]]:
    """(name prefix, module): [("", obj)] for a module; ("transformer.", pipe.transformer), ... for
    every nn.Module component of a pipeline."""
    if isinstance(obj, nn.Module):
        return [("", obj)]
    components = getattr(obj, "components", None)
    if isinstance(components, dict):
        return [(f"{name}.", m) for name, m in components.items() if isinstance(m, nn.Module)]
    raise TypeError(f"expected a torch.nn.Module or a diffusers pipeline, got {type(obj).__name__}")


def _kind(name: str, module: nn.Module) -> str:
    cls = type(getattr(module, "_orig_mod", module))
    where = cls.__module__
    if ".unets." in where or "UNet" in cls.__name__:
        return "unet"
    if ".transformers." in where or name.startswith("transformer"):
        return "transformer"
    return "other"


def transformer_components(pipe) -> list[tuple[str, nn.Module]]:
    return [(name.removesuffix("."), m) for name, m in modules_of(pipe) if _kind(name, m) == "transformer"]


# ------------------------------------------------------------------------------------------------
# cache_context -> branch
# ------------------------------------------------------------------------------------------------

def _branch_name(name) -> str:
    name = re.sub(r"\W", "_", str(name))
    return name if name.isidentifier() else f"b_{name}"


@contextlib.contextmanager
def _cache_context(model: nn.Module, name, *args, **kwargs):
    from .router import branch

    with type(model).cache_context(model, name, *args, **kwargs), branch(model, _branch_name(name)):
        yield


def route_cache_context(model: nn.Module) -> None:
    """Make model.cache_context(name) also select the skip-state branch `name` (instance
    attribute; picklable; removed by unroute_cache_context)."""
    if callable(getattr(type(model), "cache_context", None)) and "cache_context" not in model.__dict__:
        model.__dict__["cache_context"] = functools.partial(_cache_context, model)


def unroute_cache_context(model: nn.Module) -> None:
    hook = model.__dict__.get("cache_context")
    if isinstance(hook, functools.partial) and hook.func is _cache_context:
        del model.__dict__["cache_context"]


# ------------------------------------------------------------------------------------------------
# new video
# ------------------------------------------------------------------------------------------------

class _NewVideo:
    """What new_video returns: also a (no-op) context manager, so `with new_video(model):` reads
    like the block it starts."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def new_video(model_or_pipe) -> _NewVideo:
    """Start a new video: every skip state of the model (or of every enabled component of the
    pipeline) back to all-live, every call counter and warm-up count to 0, in place (no
    recompile). An enabled pipeline does this at the start of every call by itself."""
    from ..nn.model import attention_sites

    found = False
    for _, module in modules_of(model_or_pipe):
        for _, site in attention_sites(module):
            site.reset()
            found = True
    if not found:
        raise ValueError(f"{type(model_or_pipe).__name__} has no LiteAttention sites: call liteattn_ops.enable(...) "
                         "first")
    return _NewVideo()


# ------------------------------------------------------------------------------------------------
# The pipeline's call hook: a per-instance subclass
# ------------------------------------------------------------------------------------------------

_HOOKED: dict[type, type] = {}
_BASE = "_liteattn_base_class"


def _hooked_class(cls: type) -> type:
    sub = _HOOKED.get(cls)
    if sub is None:
        def __call__(self, *args, **kwargs):
            new_video(self)
            return cls.__call__(self, *args, **kwargs)

        __call__.__doc__ = cls.__call__.__doc__
        sub = type(cls.__name__, (cls,), {"__call__": __call__, _BASE: cls, "__module__": cls.__module__,
                                          "__qualname__": cls.__qualname__})
        _HOOKED[cls] = sub
    return sub


def enable_pipeline(pipe, **options):
    from .router import enable_module

    groups: dict = {}
    enabled = []
    for name, module in modules_of(pipe):
        kind = _kind(name, module)
        if kind == "unet":
            log.info("liteattn enable: pipeline component %s (%s) is a UNet: left as it is", name.removesuffix("."),
                     type(module).__name__)
        elif kind == "transformer":
            enable_module(module, groups=groups, prefix=name, **options)
            route_cache_context(module)
            enabled.append(name.removesuffix("."))
    if not enabled:
        raise ValueError(f"{type(pipe).__name__} has no transformer component to enable (components: "
                         f"{sorted(n.removesuffix('.') for n, _ in modules_of(pipe))}); enable a model directly")
    cls = type(pipe)
    if not hasattr(cls, _BASE):
        object.__setattr__(pipe, "__class__", _hooked_class(cls))
    log.info("liteattn enable: %s: enabled %s; every call starts fresh skip states", cls.__name__, enabled)
    return pipe


def disable_pipeline(pipe):
    from .router import disable

    for name, module in modules_of(pipe):
        if _kind(name, module) == "transformer":
            disable(module)
            unroute_cache_context(module)
    base = getattr(type(pipe), _BASE, None)
    if base is not None:
        object.__setattr__(pipe, "__class__", base)
    return pipe


def iter_pipeline_sites(pipe) -> Iterator:
    from .router import routed_sites

    for prefix, module in modules_of(pipe):
        for name, site in routed_sites(module):
            yield prefix + name, site
