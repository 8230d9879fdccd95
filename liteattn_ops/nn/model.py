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


def _sites_or_raise(model: nn.Module) -> list[tuple[str, LiteAttention]]:
    sites = list(attention_sites(model))
    if not sites:
        raise ValueError(f"{type(model).__name__} has no LiteAttention sites: use LiteAttention modules, "
                         "liteattn_ops.enable(model) or torch.compile(model, backend='liteattn')")
    return sites


def reset(model: nn.Module) -> None:
    """Reset every skip state of `model` in place (call it before each new video)."""
    for _, site in _sites_or_raise(model):
        site.reset()


def set_threshold(model: nn.Module, value: Union[ThresholdLike, Mapping[str, ThresholdLike]]) -> None:
    """Set the threshold of every site (a float or per-head sequence), or per site with a mapping
    {site name: threshold} (names as in stats(model)); takes effect at the next call."""
    sites = dict(_sites_or_raise(model))
    if isinstance(value, Mapping):
        unknown = set(value) - set(sites)
        if unknown:
            raise ValueError(f"unknown attention sites {sorted(unknown)}; known: {sorted(sites)}")
        for name, v in value.items():
            sites[name].threshold = v
    else:
        for site in sites.values():
            site.threshold = value


def stats(model: nn.Module) -> dict[str, dict]:
    """Per site: live fraction overall and per head (host floats: this synchronises), calls since
    the last reset, threshold. Sites not called yet report None."""
    report = {}
    for name, site in _sites_or_raise(model):
        mask = site.live_mask()
        mask = None if mask is None else mask.float()
        report[name] = {
            "live_fraction": None if mask is None else float(mask.mean()),
            "live_fraction_per_head": None if mask is None else mask.mean(dim=(0, 2, 3)).tolist(),
            "calls": site.calls,
            "threshold": site.threshold,
        }
    return report
