"""Export: torch.export programs, .pt2 files and AOTInductor packages of models whose attention
runs through the stateful `liteattn::sparse_attention` op.

    ep = liteattn_ops.export(model, args)                 # torch.export.ExportedProgram
    torch.export.save(ep, "model.pt2")
    ep = liteattn_ops.load("model.pt2")                   # torch.export.load + compatibility check
    out = ep.module()(*args)                              # skip states evolve call after call
    liteattn_ops.reset_program(ep)                        # new video: every tile live again

    path = liteattn_ops.aoti_compile_and_package(ep, package_path="model_aoti.pt2")
    runner = liteattn_ops.aoti_load_package(path)         # callable; owns the skip states
    out = runner(*args); runner.reset(); runner.live_fraction()

Every skip state is a buffer of the program (after `run_decompositions()` it is listed in
`graph_signature.buffers_to_mutate`); the op updates it in place on every call.

What a program records. `export` writes a JSON-serialisable record under
`graph_module.meta["custom"]["liteattn_ops"]` (torch.export keeps that field through copies,
`run_decompositions()`, save/load and re-export) and, for AOTInductor packages, under the
package metadata key "liteattn_ops":

    {"format_version": 1, "liteattn_ops_version": "0.1.0",
     "sites": [{"name": "blocks.0.attn", "state": "blocks.0.attn.state",
                "q_shape": [B, H, S_q, D], "k_shape": [B, H, S_k, D], "dtype": "bfloat16",
                "device": "cuda", "tile": [BM, BN], "state_shape": [B, H, Mt, W]}, ...]}

`check_program` (called by `load` and `aoti_load_package`) compares it with this installation:
a different FORMAT_VERSION (op schema or skip-state layout) or a different tile shape for a site's
(head_dim, dtype) raises ProgramMismatchError before anything runs. A program loaded with plain
`torch.export.load` skips that check; the op itself still rejects a state whose shape does not fit
the call, with a ValueError that names the tile shape.

Loading needs the op registered: `import liteattn_ops` before `torch.export.load` or
`torch._inductor.aoti_load_package`; without it PyTorch raises its own error about the unknown
operator `liteattn::sparse_attention`.

Shapes are static. A skip state is sized for one (batch, heads, S_q, S_k, head_dim) and the state
of a video is only meaningful for one token layout, so `export` refuses a dynamic dimension that
reaches an attention site, at export time, naming the site; export one program per resolution.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from .module import LiteAttention, attention_sites
from .state import live_fraction as _state_live_fraction
from .state import reset_state, state_shape
from .tiling import tile_shape

log = logging.getLogger("liteattn_ops")

FORMAT_VERSION = 1
"""Version of the exported-program contract: the op schemas and the skip-state layout. Bump it
whenever either changes; programs recorded with another version are refused at load."""

METADATA_KEY = "liteattn_ops"

__all__ = [
    "FORMAT_VERSION", "LiteAttentionPackage", "ProgramMismatchError", "aoti_compile_and_package",
    "aoti_load_package", "check_program", "export", "exported_states", "load", "program_metadata",
    "reset_program",
]


class ProgramMismatchError(RuntimeError):
    """A saved program or package does not fit this installation of liteattn_ops."""


# ------------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------------

def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _call_qk(args: tuple, kwargs: dict) -> tuple[Tensor, Tensor]:
    """q and k of a LiteAttention.forward(q, k, v, ...) call, positional or keyword."""
    q = args[0] if len(args) > 0 else kwargs["q"]
    k = args[1] if len(args) > 1 else kwargs["k"]
    return q, k


@contextlib.contextmanager
def _site_hooks(sites: list[tuple[str, LiteAttention]], hook):
    handles = [site.register_forward_pre_hook(
        lambda mod, args, kwargs, name=name: hook(name, mod, args, kwargs), with_kwargs=True)
        for name, site in sites]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _size_states(model: nn.Module, sites, args: tuple, kwargs: dict) -> list[dict]:
    """Run `model` once on the example inputs so that every site allocates its skip state for
    these shapes; return one record per site (the order of the model's modules)."""
    seen: dict[str, dict] = {}

    def record(name, mod, call_args, call_kwargs):
        q, k = _call_qk(call_args, call_kwargs)
        head_dim, dtype = q.shape[-1], q.dtype
        seen[name] = {
            "name": name, "state": f"{name}.state" if name else "state",
            "q_shape": list(q.shape), "k_shape": list(k.shape), "dtype": _dtype_name(dtype),
            "device": q.device.type, "tile": list(tile_shape(head_dim, dtype)),
            "state_shape": list(state_shape(q.shape[0], q.shape[1], q.shape[2], k.shape[2], head_dim, dtype)),
        }

    with _site_hooks(sites, record), torch.no_grad():
        model(*args, **kwargs)
    missing = [name for name, _ in sites if name not in seen]
    if missing:
        raise ValueError(f"liteattn_ops.export: attention sites {missing} were not called by the example inputs; "
                         "their skip states cannot be sized (export needs every LiteAttention site to run)")
    return [seen[name] for name, _ in sites]


def _refuse_dynamic(name, mod, call_args, call_kwargs):
    """Forward pre-hook active while torch.export traces: a symbolic batch, head count or sequence
    length at a site would need a skip state of run-time size, which a buffer cannot have."""
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    q, k = _call_qk(call_args, call_kwargs)
    dims = {f"q.shape[{i}]": s for i, s in enumerate(q.shape)}
    dims.update({f"k.shape[{i}]": s for i, s in enumerate(k.shape)})
    dynamic = [f"{where} = {s}" for where, s in dims.items() if not is_concrete_int(s)]
    if dynamic:
        raise ValueError(
            f"liteattn_ops.export: attention site '{name}' gets dynamic dimensions ({', '.join(dynamic)}). "
            f"Its skip state is a buffer of one fixed shape (B, H, Mt, W) = {tuple(mod.state.shape)}, sized for "
            "one (batch, heads, seq_len) and meaningful for one token layout only, so the batch size and the "
            "sequence lengths that reach attention must be static. Export one program per resolution "
            "(leave those dimensions out of dynamic_shapes, or mark them Dim.STATIC).")


def export(model: nn.Module, args: tuple, kwargs: Optional[dict] = None, *,
           dynamic_shapes=None, strict: bool = False, **options) -> torch.export.ExportedProgram:
    """torch.export.export for a model with LiteAttention sites; returns an ExportedProgram whose
    graph calls `torch.ops.liteattn.sparse_attention` with each site's skip state as a buffer.

    Runs `model` once on (args, kwargs) without grad to size every site's skip state, then resets
    the model's states (a new video). The program gets its own copies of the states, all live, so
    the program and the model evolve independently. Thresholds and must-do/must-skip ranges are
    taken as they are now. The record described in the module docstring is attached.

    dynamic_shapes / strict / **options go to torch.export.export. Dimensions that reach an
    attention site must be static (ValueError at export time otherwise, naming the site).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(args, tuple):
        raise TypeError(f"args must be a tuple of example inputs, got {type(args).__name__}")
    kwargs = dict(kwargs or {})
    sites = list(attention_sites(model))
    if not sites:
        raise ValueError(f"{type(model).__name__} has no LiteAttention sites, so there is nothing for liteattn_ops "
                         "to export: use LiteAttention modules (or liteattn_ops.enable(model)), or plain torch.export")
    records = _size_states(model, sites, args, kwargs)
    for _, site in sites:
        site.reset()

    with _site_hooks(sites, _refuse_dynamic), torch.no_grad():
        ep = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=strict, **options)

    # The traced program holds the model's own state tensors; give it copies so that running the
    # program and running the model do not disturb each other.
    for rec in records:
        for store in (ep.constants, ep.state_dict):
            if rec["state"] in store:
                store[rec["state"]] = store[rec["state"]].clone()
    ep.graph_module.meta.setdefault("custom", {})[METADATA_KEY] = {
        "format_version": FORMAT_VERSION, "liteattn_ops_version": _package_version(), "sites": records,
        "inputs": _input_specs(ep),
    }
    states = exported_states(ep)
    log.info("liteattn_ops.export: %d attention sites, skip states %s", len(states),
             {name: tuple(t.shape) for name, t in states.items()})
    return ep


def _input_specs(ep: torch.export.ExportedProgram) -> list[dict]:
    """Shape, dtype and device of each tensor user input, in the program's flat input order."""
    user_inputs = set(ep.graph_signature.user_inputs)
    specs = []
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs:
            val = node.meta.get("val")
            if isinstance(val, Tensor):
                specs.append({"shape": [int(s) for s in val.shape], "dtype": _dtype_name(val.dtype),
                              "device": val.device.type})
    return specs


def _package_version() -> str:
    from . import __version__
    return __version__


# ------------------------------------------------------------------------------------------------
# Metadata and checks
# ------------------------------------------------------------------------------------------------

def program_metadata(program) -> Optional[dict]:
    """The liteattn_ops record of an ExportedProgram (or of an AOTInductor package runner), or None
    for a program not made by liteattn_ops.export."""
    if isinstance(program, LiteAttentionPackage):
        return program.metadata
    if isinstance(program, torch.export.ExportedProgram):
        return program.graph_module.meta.get("custom", {}).get(METADATA_KEY)
    if isinstance(program, dict):
        return program
    raise TypeError(f"expected an ExportedProgram or a LiteAttentionPackage, got {type(program).__name__}")


def check_program(program) -> dict:
    """Raise ProgramMismatchError when `program` (an ExportedProgram, a package runner or a record)
    was exported by a liteattn_ops whose op format or tile shapes differ from this one; return its
    record."""
    meta = program_metadata(program)
    if meta is None:
        raise ProgramMismatchError("this program carries no liteattn_ops record: it was not made by "
                                   "liteattn_ops.export, so its skip states cannot be checked")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ProgramMismatchError(
            f"program exported with liteattn_ops {meta.get('liteattn_ops_version')} (op/state format version "
            f"{version}); this liteattn_ops {_package_version()} has format version {FORMAT_VERSION}. "
            "Re-export the model with this version.")
    for site in meta["sites"]:
        dtype = getattr(torch, site["dtype"])
        head_dim = site["q_shape"][-1]
        now = list(tile_shape(head_dim, dtype))
        if now != site["tile"]:
            raise ProgramMismatchError(
                f"attention site '{site['name']}' was exported with {site['tile'][0]}x{site['tile'][1]} tiles for "
                f"head_dim {head_dim} {site['dtype']}, but this liteattn_ops uses {now[0]}x{now[1]}: its skip "
                "state has the wrong layout. Re-export the model with this version.")
        q, k = site["q_shape"], site["k_shape"]
        expected = list(state_shape(q[0], q[1], q[2], k[2], head_dim, dtype))
        if expected != site["state_shape"]:
            raise ProgramMismatchError(f"attention site '{site['name']}': recorded state shape {site['state_shape']} "
                                       f"!= {expected} computed by this liteattn_ops. Re-export the model.")
    return meta


def load(f, **kwargs) -> torch.export.ExportedProgram:
    """torch.export.load(f, **kwargs), then check_program. Raises ProgramMismatchError for a program
    exported by an incompatible liteattn_ops (see check_program)."""
    ep = torch.export.load(f, **kwargs)
    meta = check_program(ep)
    for site in meta["sites"]:
        state = exported_states(ep).get(site["state"])
        if state is None or list(state.shape) != site["state_shape"]:
            raise ProgramMismatchError(f"attention site '{site['name']}': the program's state buffer "
                                       f"{None if state is None else tuple(state.shape)} does not match its record "
                                       f"{site['state_shape']}")
    return ep


# ------------------------------------------------------------------------------------------------
# States of exported programs
# ------------------------------------------------------------------------------------------------

def _state_names_in_graph(graph: torch.fx.Graph) -> list[str]:
    """Targets of the state arguments of the liteattn op in an unlifted graph (get_attr nodes)."""
    names = []
    for node in graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.liteattn.sparse_attention.default:
            state = node.kwargs.get("state", node.args[3] if len(node.args) > 3 else None)
            if isinstance(state, torch.fx.Node) and state.op == "get_attr":
                names.append(state.target)
    return names


def exported_states(program) -> dict[str, Tensor]:
    """{state buffer name: tensor} of an ExportedProgram, a module from `ep.module()`, or a package
    runner. The tensors are the ones the program updates: fill them in place, never replace them.

    Note: every `ep.module()` of one ExportedProgram shares the program's state tensors. To run two
    videos at once, load the program twice."""
    if isinstance(program, LiteAttentionPackage):
        return dict(program.states)
    if isinstance(program, torch.export.ExportedProgram):
        meta = program_metadata(program)
        names = [s["state"] for s in meta["sites"]] if meta else []
        out = {}
        for name in names:
            for store in (program.constants, program.state_dict):
                if name in store:
                    out[name] = store[name]
        return out
    if isinstance(program, nn.Module):
        if isinstance(program, torch.fx.GraphModule):
            return {name: program.get_buffer(name) for name in _state_names_in_graph(program.graph)}
        return {f"{name}.state" if name else "state": site.state
                for name, site in attention_sites(program) if site.state is not None}
    raise TypeError(f"expected an ExportedProgram, a module from ep.module() or a LiteAttentionPackage, "
                    f"got {type(program).__name__}")


def reset_program(program) -> None:
    """Make every tile live again in every skip state of `program`, in place (a new video)."""
    states = exported_states(program)
    if not states:
        raise ValueError(f"no liteattn skip states found in this {type(program).__name__}")
    for state in states.values():
        reset_state(state)


# ------------------------------------------------------------------------------------------------
# AOTInductor
# ------------------------------------------------------------------------------------------------

def aoti_compile_and_package(ep: torch.export.ExportedProgram, package_path: Union[None, str, os.PathLike] = None,
                             inductor_configs: Optional[dict[str, Any]] = None, **kwargs) -> str:
    """torch._inductor.aoti_compile_and_package with the liteattn_ops record added to the package
    metadata (key "liteattn_ops"), so that aoti_load_package can check it. The op stays a call
    through the PyTorch dispatcher inside the compiled model."""
    meta = check_program(ep)
    configs = dict(inductor_configs or {})
    metadata = dict(configs.get("aot_inductor.metadata", {}))
    metadata[METADATA_KEY] = json.dumps(meta)
    configs["aot_inductor.metadata"] = metadata
    return torch._inductor.aoti_compile_and_package(
        ep, package_path=None if package_path is None else os.fspath(package_path), inductor_configs=configs, **kwargs)


class LiteAttentionPackage:
    """A loaded AOTInductor package whose skip states are tensors owned by this object.

    The states are handed to the compiled model as user-managed constants: the model reads and
    updates these very tensors, so `reset()` (an in-place fill) starts a new video and `states`
    can be inspected at any time. Call it like the original model.
    """

    def __init__(self, compiled, metadata: dict, device_index: int = -1):
        self.compiled = compiled
        self.metadata = metadata
        self.states: dict[str, Tensor] = {}
        for site in metadata["sites"]:
            device = torch.device(site["device"])
            if device.type == "cuda":
                device = torch.device("cuda", device_index if device_index >= 0 else torch.cuda.current_device())
            self.states[site["state"]] = torch.full(site["state_shape"], -1, dtype=torch.int32, device=device)
        compiled.load_constants(self.states, check_full_update=False, user_managed=True)

    def __call__(self, *args, **kwargs):
        self._check_inputs(args, kwargs)
        return self.compiled(*args, **kwargs)

    def _check_inputs(self, args: tuple, kwargs: dict) -> None:
        """The compiled model does not check its inputs; a tensor of another shape would be read
        out of bounds and the skip states would be indexed wrongly. Host-side metadata only."""
        from torch.export._tree_utils import reorder_kwargs
        from torch.utils import _pytree as pytree

        specs = self.metadata.get("inputs", [])
        in_spec = pytree.treespec_loads(self.compiled.loader.get_call_spec()[0])
        flat = [x for x in pytree.tree_leaves((args, reorder_kwargs(kwargs, in_spec))) if isinstance(x, Tensor)]
        if len(flat) != len(specs):
            raise ValueError(f"this package takes {len(specs)} tensor inputs, got {len(flat)}")
        for i, (t, spec) in enumerate(zip(flat, specs)):
            if list(t.shape) != spec["shape"] or _dtype_name(t.dtype) != spec["dtype"] or t.device.type != spec["device"]:
                raise ValueError(
                    f"tensor input {i} is {tuple(t.shape)} {_dtype_name(t.dtype)} on {t.device.type}, but this package "
                    f"was exported for {tuple(spec['shape'])} {spec['dtype']} on {spec['device']}: its skip states fit "
                    "only that shape. Export and compile one package per shape.")

    def reset(self) -> None:
        """Every tile live again, in place (the compiled model keeps the same addresses)."""
        for state in self.states.values():
            reset_state(state)

    def live_fraction(self, per_head: bool = False) -> dict[str, Tensor]:
        """{site name: fraction of live tiles} (0-d tensor, or (H,) with per_head), on the device."""
        out = {}
        for site in self.metadata["sites"]:
            out[site["name"]] = _state_live_fraction(self.states[site["state"]], site["k_shape"][2],
                                                     site["q_shape"][-1], getattr(torch, site["dtype"]),
                                                     per_head=per_head)
        return out


def aoti_load_package(path: Union[str, os.PathLike], device_index: int = -1) -> LiteAttentionPackage:
    """torch._inductor.aoti_load_package + check_program; returns a LiteAttentionPackage that owns
    the skip states (fresh: every tile live)."""
    compiled = torch._inductor.aoti_load_package(str(path), device_index=device_index)
    raw = compiled.get_metadata().get(METADATA_KEY)
    if raw is None:
        raise ProgramMismatchError(f"{path} carries no liteattn_ops record: compile it with "
                                   "liteattn_ops.aoti_compile_and_package")
    meta = check_program(json.loads(raw))
    missing = {s["state"] for s in meta["sites"]} - set(compiled.get_constant_fqns())
    if missing:
        raise ProgramMismatchError(f"{path}: the compiled model has no constants {sorted(missing)} for the skip "
                                   "states listed in its record")
    return LiteAttentionPackage(compiled, meta, device_index)
