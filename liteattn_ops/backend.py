"""The `liteattn` torch.compile backend: the liteattn graph pass, then Inductor.

    liteattn_ops.enable(model, threshold=-10.0)       # sites and their skip states, owned by model
    model = torch.compile(model, backend="liteattn", fullgraph=True)

`backend="liteattn"` is registered through the `torch_dynamo_backends` entry point, so no import
is needed. `liteattn_ops.backend(cross=..., fallback=...)` returns a backend with options.
`mode` and `options` are handled as `torch.compile` handles them for Inductor.

Why enable(model) first: the skip states must be buffers of the model so that Dynamo lifts them
as graph inputs (see liteattn_ops.enable). A backend only receives the graph after Dynamo traced
it, too late to add modules or buffers to the model, and a state it created would belong to the
compiled graph, which Dynamo reuses for every block of a regionally compiled model and for every
instance of a model class. With enable(model) done, the traced graph already holds
`liteattn.sparse_attention` on the model's buffers; this backend reports every attention call
(rewritten, or left with its reason), applies the cross / fallback rules, and compiles the rest
with Inductor. On a model that was not enabled it leaves SDPA (or uses the dense op with
fallback="dense") and warns once.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from . import graph_pass


def _inductor_config(mode: Optional[str], options: Optional[dict], dynamic=None) -> dict[str, Any]:
    config: dict[str, Any] = {}
    if mode and mode != "default":
        from torch._inductor import list_mode_options

        config.update(list_mode_options(mode, dynamic))
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
            enabled): "sdpa" (default, warn once), "dense", or "error".
        inductor: False hands the rewritten graph back to Dynamo to run eagerly (for debugging).
    """

    def __init__(self, *, cross: str = "sdpa", fallback: str = "sdpa", inductor: bool = True):
        if cross not in ("sdpa", "dense"):
            raise ValueError(f"cross must be 'sdpa' or 'dense', got {cross!r}")
        if fallback not in ("sdpa", "dense", "error"):
            raise ValueError(f"fallback must be 'sdpa', 'dense' or 'error', got {fallback!r}")
        self.cross = cross
        self.fallback = fallback
        self.inductor = inductor
        self.__name__ = "liteattn"

    def uuid(self) -> str:
        return graph_pass.pass_uuid(cross=self.cross, fallback=self.fallback)

    def __call__(self, gm: torch.fx.GraphModule, example_inputs, mode: Optional[str] = None,
                 options: Optional[dict] = None, **unused):
        compile_id = torch._guards.CompileContext.current_compile_id()
        graph_pass.run_pass(gm, cross=self.cross, fallback=self.fallback,
                            name=f"graph {compile_id}" if compile_id is not None else "graph")
        if not self.inductor:
            return gm.forward
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs, config_patches=_inductor_config(mode, options))

    def __repr__(self) -> str:
        return f"liteattn_ops.backend(cross={self.cross!r}, fallback={self.fallback!r})"


def backend(*, cross: str = "sdpa", fallback: str = "sdpa", inductor: bool = True) -> LiteAttnBackend:
    """A `liteattn` backend with options: torch.compile(model, backend=liteattn_ops.backend(...))."""
    return LiteAttnBackend(cross=cross, fallback=fallback, inductor=inductor)


def liteattn(gm: torch.fx.GraphModule, example_inputs, **kwargs):
    """The backend registered as "liteattn" (default options)."""
    return _DEFAULT(gm, example_inputs, **kwargs)


_DEFAULT = LiteAttnBackend()
