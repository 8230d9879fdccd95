"""The FX pass that the `liteattn` backend runs on Dynamo's graph.

The match predicate lives apart, in liteattn_ops.core.eligibility (as Inductor keeps
`_sfdp_params_check` apart from its replacements): the eager router uses it too.

* `run_pass(gm, ...)`: looks at every attention node of a Dynamo graph, rewrites the SDPA nodes the
  options ask for into `liteattn.attention` (dense, stateless), with `use_int8=True` puts every
  liteattn node in INT8 Q/K mode, and returns a `PassReport` (also logged, and counted in
  `torch._dynamo.utils.counters["liteattn"]`).

The stateful rewrite itself does not happen here: a skip state has to be a buffer of the model so
that Dynamo lifts it as a graph input (a state created by a backend would belong to the compiled
graph, and be shared by every model instance and every block that reuses the graph). The routed
modules of `liteattn_ops.enable(model)` therefore emit `liteattn.sparse_attention` on their own
state buffers while Dynamo traces them; this pass finds those nodes, counts them as rewritten, and
reports every SDPA call that is left, with its reason.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import logging
import operator
from collections import deque

import torch

from ..core.eligibility import (CROSS, GRAD, NOT_A_SITE, SDPA, SDPA_PARAMS, warn_once, bind_sdpa,
                                ineligible_reason, warn_grad_once)

log = logging.getLogger("liteattn_ops")

# ------------------------------------------------------------------------------------------------
# The pass
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class PassReport:
    """What one run of the pass saw in one graph. Paths are module paths relative to the compiled
    module (Dynamo's nn_module_stack), e.g. "blocks.0.attn1"; "" for the compiled module itself."""

    graph: str
    rewritten: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (path, op)
    left: list[tuple[str, str]] = dataclasses.field(default_factory=list)       # (path, reason)
    int8: list[str] = dataclasses.field(default_factory=list)                   # paths in INT8 Q/K mode

    @property
    def found(self) -> int:
        return len(self.rewritten) + len(self.left)

    def summary(self) -> str:
        int8 = f" ({len(self.int8)} in INT8 Q/K mode)" if self.int8 else ""
        lines = [f"liteattn pass on {self.graph}: {self.found} attention calls found, "
                 f"{len(self.rewritten)} rewritten{int8}, {len(self.left)} left"]
        lines += [f"  rewritten  {path or '<root>'}: {op}" for path, op in self.rewritten]
        lines += [f"  left       {path or '<root>'}: {reason}" for path, reason in self.left]
        return "\n".join(lines)


REPORTS: deque[PassReport] = deque(maxlen=64)  # most recent last


def _module_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    # Dynamo writes "L['self'].blocks[0].attn1" (older: "L__self___blocks_0_attn1"); make it
    # "blocks.0.attn1".
    for prefix in ("L['self'].", "L['self']"):
        if path.startswith(prefix):
            path = path[len(prefix):]
            break
    path = path.replace("[", ".").replace("]", "").replace("'", "").replace("..", ".").strip(".")
    # A routed module's op is traced inside its `liteattn` child, reached as the child itself or
    # through the routed forward (`<module>.forward.__self__`): report the routed module.
    for suffix in (".forward.__self__", ".liteattn"):
        if path.endswith(suffix):
            return path[:-len(suffix)]
    return "" if path in ("liteattn", "forward.__self__") else path


def _fake(arg):
    if isinstance(arg, torch.fx.Node):
        return arg.meta.get("example_value", arg.meta.get("val"))
    return arg


def is_sdpa_node(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target in (SDPA, torch.ops.aten.scaled_dot_product_attention.default)


def _is_op(node: torch.fx.Node, op) -> bool:
    return node.op == "call_function" and node.target in (op, op.default)


def _liteattn_label(node: torch.fx.Node):
    """"liteattn.sparse_attention" / "liteattn.attention" for a node calling that op, else None."""
    if _is_op(node, torch.ops.liteattn.sparse_attention):
        return "liteattn.sparse_attention"
    if _is_op(node, torch.ops.liteattn.attention):
        return "liteattn.attention"
    return None


def _int8_position(node: torch.fx.Node) -> int:
    """Index of `use_int8` in the schema of the liteattn op `node` calls."""
    return 8 if _is_op(node, torch.ops.liteattn.sparse_attention) else 4


def uses_int8(node: torch.fx.Node) -> bool:
    """Whether a liteattn op node runs in INT8 Q/K mode (its `use_int8` argument)."""
    position = _int8_position(node)
    if "use_int8" in node.kwargs:
        return bool(node.kwargs["use_int8"])
    return len(node.args) > position and bool(node.args[position])


def _set_int8(node: torch.fx.Node) -> None:
    position = _int8_position(node)
    if len(node.args) > position:
        node.args = (*node.args[:position], True, *node.args[position + 1:])
    else:
        node.kwargs = {**node.kwargs, "use_int8": True}


def run_pass(gm: torch.fx.GraphModule, *, cross: str = "sdpa", fallback: str = "sdpa",
             name: str = "graph", warn_not_a_site: bool = True, use_int8: bool = False) -> PassReport:
    """Report every attention node of `gm`; rewrite SDPA nodes into `liteattn.attention` where the
    options ask for it; count everything in torch._dynamo.utils.counters["liteattn"].

    cross:    "sdpa" leaves eligible cross-attention (S_q != S_k) to SDPA; "dense" runs it with
              the dense liteattn op.
    fallback: what to do with an eligible self-attention SDPA call that has no skip state (its
              module was not routed by liteattn_ops.enable): "sdpa" leaves it (and warns once),
              "dense" uses the dense op, "error" raises.
    use_int8: True sets `use_int8=True` on every liteattn node (the routed sites' and the dense
              rewrites): the INT8 Q/K mode. False leaves each node as its site emitted it.
    """
    if cross not in ("sdpa", "dense"):
        raise ValueError(f"cross must be 'sdpa' or 'dense', got {cross!r}")
    if fallback not in ("sdpa", "dense", "error"):
        raise ValueError(f"fallback must be 'sdpa', 'dense' or 'error', got {fallback!r}")
    from torch._dynamo.utils import counters

    report = PassReport(graph=name)
    graph = gm.graph
    for node in list(graph.nodes):
        label = _liteattn_label(node)
        if label is not None:
            if use_int8 and not uses_int8(node):
                _set_int8(node)
            if uses_int8(node):
                report.int8.append(_module_path(node))
            report.rewritten.append((_module_path(node), label))
            continue
        if not is_sdpa_node(node):
            continue
        call = bind_sdpa(tuple(_fake(a) for a in node.args), {k: _fake(v) for k, v in node.kwargs.items()})
        path = _module_path(node)
        reason = ineligible_reason(**call, allow_cross=True)
        if reason is None:
            is_cross = call["key"].shape[2] != call["query"].shape[2]
            if is_cross:
                dense = cross == "dense"
                reason = CROSS
            else:
                # Eligible self-attention that reached the graph as SDPA: the router of
                # liteattn_ops.enable would have turned it into the stateful op, so its module is
                # not a site.
                if fallback == "error":
                    raise RuntimeError(f"liteattn: SDPA call in {path or '<root>'} is eligible but has no skip "
                                       "state: call liteattn_ops.enable(model) before torch.compile")
                dense = fallback == "dense"
                reason = NOT_A_SITE
                if not dense and warn_not_a_site:
                    warn_not_a_site_once()
            if dense:
                _replace_with_dense(graph, node, use_int8)
                report.rewritten.append((path, "liteattn.attention"))
                if use_int8:
                    report.int8.append(path)
                continue
        elif reason == GRAD:
            warn_grad_once()
        report.left.append((path, reason))
    graph.lint()
    gm.recompile()

    c = counters["liteattn"]
    c["graphs"] += 1
    c["found"] += report.found
    c["rewritten"] += sum(op == "liteattn.sparse_attention" for _, op in report.rewritten)
    c["dense"] += sum(op == "liteattn.attention" for _, op in report.rewritten)
    c["left"] += len(report.left)
    c["int8"] += len(report.int8)
    for _, reason in report.left:
        c[f"left: {reason}"] += 1
    REPORTS.append(report)
    log.info("%s", report.summary())
    return report


def _replace_with_dense(graph: torch.fx.Graph, node: torch.fx.Node, use_int8: bool = False) -> None:
    """SDPA node -> liteattn.attention(q, k, v, scale[, use_int8=True])[0] (checked eligible: no mask,
    dropout, causal)."""
    args = {**dict(zip(SDPA_PARAMS, node.args)), **node.kwargs}
    with graph.inserting_before(node):
        pair = graph.call_function(torch.ops.liteattn.attention.default,
                                   (args["query"], args["key"], args["value"], args.get("scale")),
                                   {"use_int8": True} if use_int8 else {})
        out = graph.call_function(operator.getitem, (pair, 0))
    out.meta.update(node.meta)
    node.replace_all_uses_with(out)
    graph.erase_node(node)


def warn_not_a_site_once() -> None:
    warn_once("not a site", "liteattn backend: eligible self-attention reached the graph as plain SDPA because its "
                             "module has no skip state; call liteattn_ops.enable(model) before torch.compile "
                             "(see liteattn_ops.report(model))")


def pass_uuid(**options) -> str:
    """Changes when the pass's source or its options change (a cache key, as Inductor's custom
    passes have)."""
    source = inspect.getsource(run_pass) + inspect.getsource(ineligible_reason)
    return hashlib.sha256((source + repr(sorted(options.items()))).encode()).hexdigest()
