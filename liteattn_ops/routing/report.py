"""report(model) / format_report(model): what happened to each SDPA call of each routed module."""

from __future__ import annotations

from .pipelines import modules_of
from .router import routed_sites


def report(model) -> dict[str, dict]:
    """Per routed module: what happened to each SDPA call (slot = its index within one forward):
    {"op": "liteattn.sparse_attention" | "liteattn.attention"} or {"left": reason}, the shapes
    seen, the skip states the site owns, and "bypassed": the diffusers attention backend that
    runs the module's attention instead of SDPA (None when LiteAttention sees its calls). Also
    filled by compiled runs (recorded while Dynamo traces). For a pipeline, names start with the
    component ("transformer.blocks.0.attn1"). The backend's per-graph reports are in
    liteattn_ops.compile.graph_pass.REPORTS."""
    out = {}
    for prefix, module in modules_of(model):
        for name, site in routed_sites(module):
            out[prefix + name] = {
                "calls": dict(sorted(site.decisions.items())),
                "states": {key: tuple(t.shape) for key, t in site.states().items()},
                "bypassed": site.bypassed,
            }
    return out


def format_report(model) -> str:
    """report(model) as text, one line per SDPA call site."""
    lines = []
    for name, entry in report(model).items():
        label = name or "<root>"
        if entry["bypassed"] is not None:
            lines.append(f"{label}: bypassed (diffusers attention backend {entry['bypassed']!r}, not SDPA)")
            continue
        for slot, decision in entry["calls"].items():
            what = decision.get("op") or f"left: {decision['left']}"
            lines.append(f"{label}[{slot}]: {what}  shapes {decision['shapes']}")
        if not entry["calls"]:
            lines.append(f"{label}: not called yet")
    return "\n".join(lines)
