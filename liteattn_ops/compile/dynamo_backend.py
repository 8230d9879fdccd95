"""The `liteattn` torch.compile backend: the liteattn graph pass, then Inductor.

    liteattn_ops.enable(model, threshold=-10.0)       # sites and their skip states, owned by model
    model = torch.compile(model, backend="liteattn", fullgraph=True)

`backend="liteattn"` is registered through the `torch_dynamo_backends` entry point, so no import
is needed. `liteattn_ops.backend(cross=..., fallback=..., use_int8=...)` returns a backend with options.
`mode` and `options` are handled as `torch.compile` handles them for Inductor.

The skip states must be buffers of the model so that Dynamo lifts them as graph inputs (see
liteattn_ops.enable): a state created by a backend would belong to the compiled graph, which
Dynamo reuses for every block of a regionally compiled model and for every instance of a model
class. With enable(model) done before compiling, the traced graph already holds
`liteattn.sparse_attention` on the model's buffers; this backend reports every attention call
(rewritten, or left with its reason), applies the cross / fallback rules, and compiles the rest
with Inductor.

A model compiled without enable(model) (fallback="enable", the default): see
liteattn_ops/compile/enable_on_call.py. The first call runs exact dense attention (that graph is
not given to Inductor), enables the module, and the next call retraces with the module's own skip
states; call enable(model) before torch.compile to skip from the first call.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from . import graph_pass
from .enable_on_call import EnableOnCall
from ..nn.attention import ThresholdLike, _threshold_values, check_use_int8

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
        use_int8: True runs every liteattn call of the compiled graphs in INT8 Q/K mode: the
            routed sites' calls (whatever enable(model, use_int8=...) chose), the dense rewrites and
            the sites this backend enables itself. False (default) keeps each site's own mode.
    """

    def __init__(self, *, cross: str = "sdpa", fallback: str = "enable", threshold: ThresholdLike = -10.0,
                 inductor: bool = True, use_int8: bool = False):
        if cross not in ("sdpa", "dense"):
            raise ValueError(f"cross must be 'sdpa' or 'dense', got {cross!r}")
        if fallback not in ("enable", "sdpa", "dense", "error"):
            raise ValueError(f"fallback must be 'enable', 'sdpa', 'dense' or 'error', got {fallback!r}")
        _threshold_values(threshold)  # validate now, not at the first call
        self.use_int8 = check_use_int8(use_int8)
        self.cross = cross
        self.fallback = fallback
        self.threshold = threshold
        self.inductor = inductor
        self.__name__ = "liteattn"

    def uuid(self) -> str:
        return graph_pass.pass_uuid(cross=self.cross, fallback=self.fallback, use_int8=self.use_int8)

    def __call__(self, gm: torch.fx.GraphModule, example_inputs, mode: Optional[str] = None,
                 options: Optional[dict] = None, **unused):
        compile_id = torch._guards.CompileContext.current_compile_id()
        enable_later = self.fallback == "enable"
        report = graph_pass.run_pass(gm, cross=self.cross, fallback="sdpa" if enable_later else self.fallback,
                                     name=f"graph {compile_id}" if compile_id is not None else "graph",
                                     warn_not_a_site=not enable_later, use_int8=self.use_int8)
        config = _inductor_config(mode, options)   # options checked for every graph
        if enable_later and any(reason == graph_pass.NOT_A_SITE for _, reason in report.left):
            # This graph runs once per module (dense), then the module is enabled and Dynamo
            # retraces: Inductor would compile it for one call, so it runs as traced.
            return EnableOnCall(gm.forward, gm, self.threshold, self.cross, self.use_int8)
        if not self.inductor:
            return gm.forward
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs, config_patches=config)

    def __repr__(self) -> str:
        int8 = ", use_int8=True" if self.use_int8 else ""
        return (f"liteattn_ops.backend(cross={self.cross!r}, fallback={self.fallback!r}, "
                f"threshold={self.threshold!r}{int8})")


def backend(*, cross: str = "sdpa", fallback: str = "enable", threshold: ThresholdLike = -10.0,
            inductor: bool = True, use_int8: bool = False) -> LiteAttnBackend:
    """A `liteattn` backend with options: torch.compile(model, backend=liteattn_ops.backend(...))."""
    return LiteAttnBackend(cross=cross, fallback=fallback, threshold=threshold, inductor=inductor,
                           use_int8=use_int8)


def liteattn(gm: torch.fx.GraphModule, example_inputs, **kwargs):
    """The backend registered as "liteattn" (default options)."""
    return _DEFAULT(gm, example_inputs, **kwargs)


_DEFAULT = LiteAttnBackend()
