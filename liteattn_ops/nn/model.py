"""Model-level helpers over every LiteAttention site of a model (the modules placed by hand, and
the sites that liteattn_ops.enable and the compile backend add): reset, stats, set_threshold."""

from __future__ import annotations

from typing import Iterator, Mapping, Union

from torch import nn

from .attention import LiteAttention, ThresholdLike


def attention_sites(model: nn.Module) -> Iterator[tuple[str, LiteAttention]]:
    """(qualified name, LiteAttention) for every attention site of `model`, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, LiteAttention):
            yield name, module


def _is_compiled(model: nn.Module) -> bool:
    """torch.compile(model) (an OptimizedModule) or a model with compiled blocks (module.compile(),
    diffusers' compile_repeated_blocks)."""
    if hasattr(model, "_orig_mod"):
        return True
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())


def _sites_or_raise(model) -> list[tuple[str, LiteAttention]]:
    """The sites of a model, or of every module component of a diffusers pipeline (names then
    start with the component: "transformer.blocks.0.attn1.liteattn")."""
    if not isinstance(model, nn.Module):
        components = getattr(model, "components", None)
        if not isinstance(components, dict):
            raise TypeError(f"model must be a torch.nn.Module or a diffusers pipeline, got {type(model).__name__}")
        sites = [(f"{prefix}.{name}", site) for prefix, m in components.items() if isinstance(m, nn.Module)
                 for name, site in attention_sites(m)]
        if not sites:
            raise ValueError(f"{type(model).__name__} has no LiteAttention sites: call liteattn_ops.enable(pipe)")
        return sites
    sites = list(attention_sites(model))
    if not sites:
        if _is_compiled(model):
            raise ValueError(
                f"{type(getattr(model, '_orig_mod', model)).__name__} is compiled but has no LiteAttention sites yet. "
                "A model compiled with backend='liteattn' without liteattn_ops.enable(model) first gets its sites "
                "at its first compiled call (that call runs exact dense attention; skipping starts at the second), "
                "so there is nothing to reset or report before it. Call the model once, or call "
                "liteattn_ops.enable(model) before torch.compile to have sites, and skipping, from the first call.")
        raise ValueError(f"{type(model).__name__} has no LiteAttention sites: use LiteAttention modules, "
                         "liteattn_ops.enable(model) or torch.compile(model, backend='liteattn')")
    return sites


def reset(model: nn.Module) -> None:
    """Reset every skip state (and call counter) of `model` in place (before each new video)."""
    for _, site in _sites_or_raise(model):
        site.reset()


def set_threshold(model: nn.Module, value: Union[ThresholdLike, Mapping[str, ThresholdLike]]) -> None:
    """Set the threshold of every site (a float or per-head sequence), or per site with a mapping
    {site name: threshold} (names as in stats(model)); takes effect at the next call, in place (no
    recompile). Every value is checked against every site first: when this raises, nothing changed.
    A liteattn_ops.calibration.ThresholdTable is applied with its own checks (site names, heads)."""
    apply_table = getattr(value, "_liteattn_apply", None)   # a ThresholdTable (calibration/ sits above nn/)
    if apply_table is not None:
        return apply_table(model)
    sites = dict(_sites_or_raise(model))
    if isinstance(value, Mapping):
        unknown = set(value) - set(sites)
        if unknown:
            raise ValueError(f"unknown attention sites {sorted(unknown)}; known: {sorted(sites)}")
        checked = {}
        for name, v in value.items():
            try:
                checked[name] = sites[name]._checked_threshold(v)
            except (TypeError, ValueError) as e:
                raise type(e)(f"site {name!r}: {e}") from None
    else:
        checked = {}
        for name, site in sites.items():
            try:
                checked[name] = site._checked_threshold(value)
            except (TypeError, ValueError) as e:
                raise type(e)(f"site {name!r}: {e}") from None
    for name, values in checked.items():
        sites[name]._apply_threshold(values)


def stats(model: nn.Module) -> dict[str, dict]:
    """Per site: live fraction overall and per head of its most recent state (host floats: this
    synchronises), calls since the last reset (counted on the device, compiled runs included),
    threshold, use_int8 (the INT8 Q/K mode), and for routed sites whether diffusers' dispatcher bypasses them. Sites not called
    yet report None."""
    report = {}
    for name, site in _sites_or_raise(model):
        mask = site.live_mask()
        mask = None if mask is None else mask.float()
        report[name] = {
            "live_fraction": None if mask is None else float(mask.mean()),
            "live_fraction_per_head": None if mask is None else mask.mean(dim=(0, 2, 3)).tolist(),
            "calls": site.calls,
            "threshold": site.threshold,
            "use_int8": site.use_int8,
            **site._extra_stats(),
        }
    return report
