"""fallback="enable": a model compiled with backend="liteattn" without liteattn_ops.enable().

The only place in the package that looks at Python frames. Kept here, small, with a test for each
way it can fail (tests/test_routing.py::test_enable_on_call_*).

Why it is needed. A backend sees a graph only after Dynamo traced it, too late to give the model
buffers for that graph (a state the backend created would belong to the graph, shared by every
block and instance that reuses it). So the graph is compiled as it is (plain SDPA: exact), and the
function returned to Dynamo, when it runs, finds the module it runs for and calls
enable(module, threshold, cross=..., use_int8=...) on it, once. Enabling changes the module's forward, so
Dynamo's guards retrace the next call, which uses the module's own skip states.

How the module is found. At compile time: one parameter or buffer input of the graph and the
Dynamo source it came from, e.g. L['self']._modules['to_q']._parameters['weight'] (local "self",
then a chain of attribute / dict-item steps). At run time: the frames above the call are searched
(at most 64) for a local of that name whose chain of steps leads to the very tensor the graph got
as that input. The chain is followed step by step from Dynamo's Source objects (no guard string is
evaluated). Under regional compilation one graph serves every block, and each block is found
(and enabled) at its own first call.

Ways it fails, each leaving that graph as plain SDPA with one warning (call enable() first):
  - the graph has no parameter or buffer input (nothing identifies the module);
  - the input's source is not a chain from a local (an unknown Source kind);
  - no frame within reach holds a local whose chain gives the graph's input.

Cost. The first graph is compiled without Inductor (it runs once per module, dense), so only the
second trace of Dynamo is extra; measured in README.md ("torch.compile").
"""

from __future__ import annotations

import logging
import sys
import weakref
from typing import Optional

import torch
from torch import nn

log = logging.getLogger("liteattn_ops")

MAX_DEPTH = 64
NO_PROBE = "graph has no parameter or buffer input"
UNKNOWN_SOURCE = "the input's Dynamo source is not a chain of attributes / items from a local"
NOT_FOUND = "no calling frame holds the module"


def _steps(source) -> Optional[tuple[str, list]]:
    """(local name, [("attr", name) | ("item", key), ...]) for a Dynamo Source chain, or None."""
    steps = []
    while source is not None:
        local = getattr(source, "local_name", None)
        if local is not None:
            return local, steps[::-1]
        member = getattr(source, "member", None)
        index = getattr(source, "index", None)
        if isinstance(member, str):
            steps.append(("attr", member))
        elif index is not None and isinstance(index, (str, int)):
            steps.append(("item", index))
        elif not hasattr(source, "base"):
            return None
        source = getattr(source, "base", None)
    return None


def _follow(root, steps: list):
    obj = root
    for kind, key in steps:
        obj = getattr(obj, key) if kind == "attr" else obj[key]
    return obj


def module_probe(gm: torch.fx.GraphModule):
    """(local name, steps, input index) of the first parameter/buffer input of `gm`, or a reason."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    unknown = False
    for index, node in enumerate(placeholders):
        source = getattr(node, "_dynamo_source", None)
        if source is None and "grapharg" in node.meta:
            source = node.meta["grapharg"].source
        if source is None:
            continue
        name = source.name if isinstance(source.name, str) else source.name()
        if "._parameters[" not in name and "._buffers[" not in name:
            continue
        steps = _steps(source)
        if steps is None:
            unknown = True
            continue
        return steps[0], steps[1], index
    return UNKNOWN_SOURCE if unknown else NO_PROBE


def calling_module(probe, inputs, start_frame) -> Optional[nn.Module]:
    local, steps, index = probe
    if index >= len(inputs):
        return None
    tensor = inputs[index]
    frame = start_frame
    for _ in range(MAX_DEPTH):
        if frame is None:
            return None
        root = frame.f_locals.get(local)
        if isinstance(root, nn.Module):
            try:
                found = _follow(root, steps)
            except (AttributeError, KeyError, IndexError, TypeError):
                found = None
            if found is tensor:
                return root
        frame = frame.f_back
    return None


class EnableOnCall:
    """The compiled graph of modules that were not enabled: runs it (plain SDPA, exact) and enables
    each module it is called for, once; Dynamo's guards then retrace that module's next call."""

    def __init__(self, compiled, gm: torch.fx.GraphModule, threshold, cross: str, use_int8: bool = False):
        self.compiled = compiled
        self.threshold = threshold
        self.cross = cross
        self.use_int8 = use_int8
        self.probe = module_probe(gm)
        self.seen: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
        # The modules this graph runs for play one role (e.g. every block under regional
        # compilation): one set of role groups, so the retrace of one allocates for all.
        self.groups: dict = {}
        self.failure: Optional[str] = self.probe if isinstance(self.probe, str) else None

    def __call__(self, *args):
        boxed = len(args) == 1 and isinstance(args[0], list)  # (Dynamo may pass the inputs as one list)
        inputs = args[0] if boxed else args
        module = None
        if self.failure is None:
            module = calling_module(self.probe, inputs, sys._getframe(1))
            if module is None:
                self.failure = NOT_FOUND
        if module is None:
            _warn(self.failure)
        elif module not in self.seen:
            self.seen.add(module)
            from ..routing.router import enable_module

            names = enable_module(module, self.threshold, cross=self.cross, use_int8=self.use_int8, groups=self.groups)
            log.info("liteattn backend: enabled %d attention sites of %s on its first compiled call; "
                     "skip states are used from the next call", len(names), type(module).__name__)
        return self.compiled(*args)


def _warn(reason: str) -> None:
    from ..core.eligibility import warn_once

    warn_once(f"enable on call: {reason}",
              f"liteattn backend: a graph with eligible self-attention reached the backend as plain SDPA and its "
              f"module could not be enabled at its first call ({reason}); it stays SDPA. Call "
              "liteattn_ops.enable(model) before torch.compile.")
