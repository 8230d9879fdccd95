"""The `liteattn` torch.compile backend: the liteattn graph pass, then Inductor.

    liteattn_ops.enable(model, threshold=-10.0)       # sites and their skip states, owned by model
    model = torch.compile(model, backend="liteattn", fullgraph=True)

`backend="liteattn"` is registered through the `torch_dynamo_backends` entry point, so no import
is needed. `liteattn_ops.backend(cross=..., fallback=...)` returns a backend with options.
`mode` and `options` are handled as `torch.compile` handles them for Inductor.

The skip states must be buffers of the model so that Dynamo lifts them as graph inputs (see
liteattn_ops.enable): a state created by a backend would belong to the compiled graph, which
Dynamo reuses for every block of a regionally compiled model and for every instance of a model
class. With enable(model) done before compiling, the traced graph already holds
`liteattn.sparse_attention` on the model's buffers; this backend reports every attention call
(rewritten, or left with its reason), applies the cross / fallback rules, and compiles the rest
with Inductor.

A model compiled without enable(model) (fallback="enable", the default): a backend receives the
graph only after Dynamo traced it, too late to give the model buffers for this graph. So this
graph is compiled as it is (plain SDPA: the first call is exact dense attention) and its compiled
function enables the module it is called for (the `self` whose parameters are the graph's
inputs: the whole model, or each block under regional compilation) the first time it runs.
Enabling changes the module, so Dynamo's guards retrace the next call, which then uses the
module's own skip states. Skipping therefore starts at the second call; call enable(model) before
torch.compile to start at the first.
"""

from __future__ import annotations

import logging
import sys
import weakref
from typing import Any, Optional

import torch
from torch import nn

from . import graph_pass
from ..nn.attention import ThresholdLike, _threshold_values

log = logging.getLogger("liteattn_ops")


def _inductor_config(mode: Optional[str], options: Optional[dict]) -> dict[str, Any]:
    config: dict[str, Any] = {}
    if mode and mode != "default":
        from torch._inductor import list_mode_options

        config.update(list_mode_options(mode))
    if options:
        from torch._inductor import config as inductor_config

        known = inductor_config.get_config_copy()
        for key, value in options.items():
            name = key.replace("-", "_")
            if name not in known:
                raise RuntimeError(f"Unexpected optimization option {key} for the liteattn backend "
                                   "(it takes Inductor's options)")
            config[name] = value
    return config


class LiteAttnBackend:
    """A Dynamo backend: `liteattn_ops.graph_pass.run_pass` on the graph, then Inductor.

    Args:
        cross: "sdpa" (default) leaves cross-attention (S_q != S_k) to SDPA; "dense" runs it with
            the dense `liteattn.attention` op. (Routed modules follow enable(model, cross=...).)
        fallback: for eligible self-attention SDPA whose module has no skip state (model not
            enabled): "enable" (default: the first call runs dense and enables the module, see the
            module docstring), "sdpa" (leave it, warn once), "dense", or "error".
        threshold: the threshold of the sites this backend enables itself (fallback="enable");
            models enabled by the user keep theirs. Change it later with set_threshold(model, ...).
        inductor: False hands the rewritten graph back to Dynamo to run eagerly (for debugging).
    """

    def __init__(self, *, cross: str = "sdpa", fallback: str = "enable", threshold: ThresholdLike = -10.0,
                 inductor: bool = True):
        if cross not in ("sdpa", "dense"):
            raise ValueError(f"cross must be 'sdpa' or 'dense', got {cross!r}")
        if fallback not in ("enable", "sdpa", "dense", "error"):
            raise ValueError(f"fallback must be 'enable', 'sdpa', 'dense' or 'error', got {fallback!r}")
        _threshold_values(threshold)  # validate now, not at the first call
        self.cross = cross
        self.fallback = fallback
        self.threshold = threshold
        self.inductor = inductor
        self.__name__ = "liteattn"

    def uuid(self) -> str:
        return graph_pass.pass_uuid(cross=self.cross, fallback=self.fallback)

    def __call__(self, gm: torch.fx.GraphModule, example_inputs, mode: Optional[str] = None,
                 options: Optional[dict] = None, **unused):
        compile_id = torch._guards.CompileContext.current_compile_id()
        enable_later = self.fallback == "enable"
        report = graph_pass.run_pass(gm, cross=self.cross, fallback="sdpa" if enable_later else self.fallback,
                                     name=f"graph {compile_id}" if compile_id is not None else "graph",
                                     warn_not_a_site=not enable_later)
        if not self.inductor:
            compiled = gm.forward
        else:
            from torch._inductor.compile_fx import compile_fx

            compiled = compile_fx(gm, example_inputs, config_patches=_inductor_config(mode, options))
        if enable_later and any(reason == graph_pass.NOT_A_SITE for _, reason in report.left):
            return _EnableOnCall(compiled, gm, self)
        return compiled

    def __repr__(self) -> str:
        return f"liteattn_ops.backend(cross={self.cross!r}, fallback={self.fallback!r}, threshold={self.threshold!r})"


def backend(*, cross: str = "sdpa", fallback: str = "enable", threshold: ThresholdLike = -10.0,
            inductor: bool = True) -> LiteAttnBackend:
    """A `liteattn` backend with options: torch.compile(model, backend=liteattn_ops.backend(...))."""
    return LiteAttnBackend(cross=cross, fallback=fallback, threshold=threshold, inductor=inductor)


# ------------------------------------------------------------------------------------------------
# Models compiled without enable(): enable the calling module at the graph's first run
# ------------------------------------------------------------------------------------------------

def _source_name(source) -> str:
    name = source.name
    return name if isinstance(name, str) else name()  # a property in newer torch, a method before


def _module_probe(gm: torch.fx.GraphModule) -> Optional[tuple[str, str, int]]:
    """(local name, Dynamo source expression, input index) of one parameter or buffer input of the
    graph, e.g. ("self", "L['self']._modules['to_q']._parameters['weight']", 0); None if it has none."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for index, node in enumerate(placeholders):
        source = getattr(node, "_dynamo_source", None)
        if source is None and "grapharg" in node.meta:
            source = node.meta["grapharg"].source
        if source is None:
            continue
        expr = _source_name(source)
        if expr.startswith("L['") and ("._parameters[" in expr or "._buffers[" in expr):
            return expr[3:expr.index("'", 3)], expr, index
    return None


def _calling_module(probe: tuple[str, str, int], inputs, max_depth: int = 64) -> Optional[nn.Module]:
    """The module whose traced frame is running this graph: the frame up the stack that holds the
    probe's local, for which the probe's source expression is the graph's input tensor itself."""
    local, expr, index = probe
    if index >= len(inputs):
        return None
    tensor = inputs[index]
    frame = sys._getframe(2)
    for _ in range(max_depth):
        if frame is None:
            return None
        root = frame.f_locals.get(local)
        if isinstance(root, nn.Module):
            try:
                found = eval(expr, {"__builtins__": {}}, {"L": {local: root}})  # Dynamo's guard language
            except Exception:
                found = None
            if found is tensor:
                return root
        frame = frame.f_back
    return None


class _EnableOnCall:
    """The compiled graph of modules that were not enabled: runs it (plain SDPA, exact) and enables
    each module it is called for, once; Dynamo's guards then retrace that module's next call."""

    def __init__(self, compiled, gm: torch.fx.GraphModule, backend: LiteAttnBackend):
        self.compiled = compiled
        self.backend = backend
        self.probe = _module_probe(gm)
        self.seen: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()

    def __call__(self, *args):
        boxed = len(args) == 1 and isinstance(args[0], list)  # (Dynamo may pass the inputs as one list)
        inputs = args[0] if boxed else args
        module = None if self.probe is None else _calling_module(self.probe, inputs)
        if module is None:
            graph_pass.warn_not_a_site_once()
        elif module not in self.seen:
            self.seen.add(module)
            from ..routing.router import enable

            names = enable(module, self.backend.threshold, cross=self.backend.cross)
            log.info("liteattn backend: enabled %d attention sites of %s on its first compiled call; "
                     "skip states are used from the next call", len(names), type(module).__name__)
        return self.compiled(*args)


def liteattn(gm: torch.fx.GraphModule, example_inputs, **kwargs):
    """The backend registered as "liteattn" (default options)."""
    return _DEFAULT(gm, example_inputs, **kwargs)


_DEFAULT = LiteAttnBackend()
