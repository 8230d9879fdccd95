"""Export: torch.export programs, .pt2 files and AOTInductor packages of models whose attention
runs through the stateful `liteattn::sparse_attention` op.

    ep = liteattn_ops.export(model, args)                 # torch.export.ExportedProgram
    torch.export.save(ep, "model.pt2")
    ep = liteattn_ops.load("model.pt2")                   # torch.export.load + check; fresh states
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

    {"format_version": 2, "liteattn_ops_version": "0.1.0",
     "states": [{"site": "blocks.0.attn", "state": "blocks.0.attn.state",
                 "q_shape": [B, H, S_q, D], "k_shape": [B, H, S_k, D], "dtype": "bfloat16",
                 "device": "cuda", "tile": [BM, BN], "state_shape": [B, H, Mt, W],
                 "use_int8": false}, ...],                                            # INT8 Q/K mode
     "inputs": [{"shape": [...], "dtype": "bfloat16", "device": "cuda"}, ...],    # tensor inputs
     "attention": {"rewritten": [[module path, op], ...], "left": [[module path, reason], ...],
                   "int8": [module path of each call in INT8 Q/K mode, ...]}}

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

from ..nn.attention import LiteAttention
from ..nn.model import attention_sites
from ..core.state import live_fraction as _state_live_fraction
from ..core.state import new_state, reset_state, state_shape
from ..core.tiling import tile_shape

log = logging.getLogger("liteattn_ops")

FORMAT_VERSION = 3
"""Version of the exported-program contract: the op schemas and the skip-state layout. Bump it
whenever either changes; programs recorded with another version are refused at load.
2: head dim 64 uses 192 x 128 tiles (was 128 x 128); the ops take `use_int8`.
3: head dim 128 uses 128 x 176 tiles (was 128 x 128)."""

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


_ENABLE_OPTIONS = ("threshold", "must_do", "must_skip", "cross", "sites", "use_int8")


@contextlib.contextmanager
def _refuse_dynamic_shapes(sites: list[tuple[str, LiteAttention]]):
    """While torch.export traces: a symbolic batch, head count or sequence length reaching a site
    would need a skip state of run-time size, which a buffer cannot have. Raise, naming the site."""
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    def check(name, mod, call_args, call_kwargs):
        if call_kwargs.get("left") is not None:      # a call the router leaves to SDPA: no state
            return
        q = call_args[0] if len(call_args) > 0 else call_kwargs["q"]
        k = call_args[1] if len(call_args) > 1 else call_kwargs["k"]
        if q is None or k is None:                   # a site bypassed by diffusers' dispatcher: no state
            return
        dims = [(f"q.shape[{i}]", s) for i, s in enumerate(q.shape)] + \
               [(f"k.shape[{i}]", s) for i, s in enumerate(k.shape)]
        # Under strict export Dynamo traces this hook: there a static dim is a plain int (and
        # is_concrete_int may not be traced); under non-strict export a static dim may be a SymInt.
        concrete = (lambda s: isinstance(s, int)) if torch.compiler.is_dynamo_compiling() else is_concrete_int
        dynamic = [f"{where} = {s}" for where, s in dims if not concrete(s)]
        if dynamic:
            raise ValueError(
                f"liteattn_ops.export: attention site '{name}' gets dynamic dimensions ({', '.join(dynamic)}). "
                "Its skip state is a buffer of one fixed shape (B, H, ceil(S_q/BM), ceil(ceil(S_k/BN)/32)), "
                "sized for one (batch, heads, seq_len) and meaningful for one token layout only, so the batch "
                "size and the sequence lengths that reach attention must be static. Export one program per "
                "resolution (leave those dimensions out of dynamic_shapes, or mark them Dim.STATIC).")

    handles = [site.register_forward_pre_hook(
        lambda mod, a, kw, name=name: check(name, mod, a, kw), with_kwargs=True) for name, site in sites]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _prepare(model: nn.Module, enable_options: dict) -> list[tuple[str, LiteAttention]]:
    """The model's LiteAttention sites; routes its SDPA calls first (liteattn_ops.enable, the same
    rewrite the compile backend relies on) when it has none or when enable options are given."""
    sites = list(attention_sites(model))
    if enable_options or not sites:
        from ..routing.router import AttentionSite, enable

        if sites and not any(isinstance(site, AttentionSite) for _, site in sites):
            raise ValueError(f"{sorted(enable_options)} are options of liteattn_ops.enable, but this model "
                             "uses LiteAttention modules directly: configure those instead")
        enable(model, **enable_options)
        sites = list(attention_sites(model))
    if not sites:
        raise ValueError(f"{type(model).__name__} has no attention that liteattn_ops can take over: no "
                         "LiteAttention module and no scaled_dot_product_attention call that enable() routes "
                         "(see liteattn_ops.report(model)); use plain torch.export")
    return sites


def _state_records(ep: torch.export.ExportedProgram) -> list[dict]:
    """One record per skip state the graph uses, read from the graph itself: which buffer, the
    q/k shapes of the call, the tile shape, the state shape and the mode (use_int8)."""
    from ..compile.graph_pass import uses_int8

    inputs_to_buffers = ep.graph_signature.inputs_to_buffers
    records, seen = [], set()
    for node in ep.graph.nodes:
        if not (node.op == "call_function" and node.target is torch.ops.liteattn.sparse_attention.default):
            continue
        q, k, state = node.args[0], node.args[1], node.kwargs.get("state", node.args[3])
        name = inputs_to_buffers.get(state.name) if isinstance(state, torch.fx.Node) else None
        if name is None:
            raise RuntimeError(f"liteattn_ops.export: the skip state of {node.name} is not a buffer of the model "
                               f"({state}); the program would not keep it across calls")
        if name in seen:
            continue
        seen.add(name)
        qv, kv = q.meta["val"], k.meta["val"]
        head_dim, dtype = int(qv.shape[-1]), qv.dtype
        shape_q, shape_k = [int(s) for s in qv.shape], [int(s) for s in kv.shape]
        records.append({
            "site": name.rpartition(".")[0], "state": name, "q_shape": shape_q, "k_shape": shape_k,
            "dtype": _dtype_name(dtype), "device": qv.device.type, "tile": list(tile_shape(head_dim, dtype)),
            "state_shape": list(state_shape(shape_q[0], shape_q[1], shape_q[2], shape_k[2], head_dim, dtype)),
            "use_int8": uses_int8(node),
        })
    return records


def export(model: nn.Module, args: tuple, kwargs: Optional[dict] = None, *,
           dynamic_shapes=None, strict: bool = False, **options) -> torch.export.ExportedProgram:
    """torch.export.export with LiteAttention: returns an ExportedProgram whose graph calls
    `torch.ops.liteattn.sparse_attention` with each skip state as a buffer of the program.

    1. A model without LiteAttention sites is first routed with `liteattn_ops.enable(model, ...)`
       (the rewrite the "liteattn" compile backend uses); the options threshold, must_do,
       must_skip, cross, sites and use_int8 go to enable(). A model with sites is used as it is.
    2. `model` runs once on (args, kwargs), without grad, so that every site sizes its skip states
       for these shapes; then the model's states are reset (a new video).
    3. torch.export.export(model, args, kwargs, dynamic_shapes=..., strict=..., **other options)
       under torch.no_grad(). Dimensions that reach an attention site must be static: a dynamic
       one raises ValueError here, naming the site.
    4. The compile backend's pass (liteattn_ops.graph_pass.run_pass) reports every attention call
       of the graph and applies its cross-attention rule; the program gets its own copies of the
       states (all live) and the record described in the module docstring.

    Thresholds and must-do/must-skip ranges are taken as they are now (they are buffers of the
    program); `thresholds=table` (a liteattn_ops.calibration.ThresholdTable) sets them from a
    calibrated table first. Inference only.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(args, tuple):
        raise TypeError(f"args must be a tuple of example inputs, got {type(args).__name__}")
    kwargs = dict(kwargs or {})
    enable_options = {key: options.pop(key) for key in _ENABLE_OPTIONS if key in options}
    thresholds = options.pop("thresholds", None)   # a calibration ThresholdTable (or any set_threshold value)
    cross = enable_options.get("cross", "sdpa")
    sites = _prepare(model, enable_options)
    if thresholds is not None:
        from ..nn.model import set_threshold

        set_threshold(model, thresholds)   # checked against the sites; fixed in the program from here on

    with torch.no_grad():
        model(*args, **kwargs)
    for _, site in sites:
        site.reset()

    with _refuse_dynamic_shapes(sites), torch.no_grad():
        ep = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=strict, **options)

    from ..compile.graph_pass import run_pass

    report = run_pass(ep.graph_module, cross=cross, fallback="sdpa", name=f"export of {type(model).__name__}")
    records = _state_records(ep)
    if not records:
        raise ValueError(f"liteattn_ops.export: no attention call of {type(model).__name__} became "
                         f"liteattn.sparse_attention with these inputs:\n{report.summary()}")
    # The traced program holds the model's own state tensors; give it copies so that running the
    # program and running the model do not disturb each other.
    for rec in records:
        for store in (ep.constants, ep.state_dict):
            if rec["state"] in store:
                store[rec["state"]] = reset_state(store[rec["state"]].clone())   # fresh: every tile live
    ep.graph_module.meta.setdefault("custom", {})[METADATA_KEY] = {
        "format_version": FORMAT_VERSION, "liteattn_ops_version": _package_version(), "states": records,
        "inputs": _input_specs(ep),
        "attention": {"rewritten": report.rewritten, "left": report.left, "int8": report.int8},
    }
    log.info("liteattn_ops.export: skip states %s\n%s",
             {rec["state"]: tuple(rec["state_shape"]) for rec in records}, report.summary())
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
    from .. import __version__
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
    for rec in meta["states"]:
        dtype = getattr(torch, rec["dtype"])
        head_dim = rec["q_shape"][-1]
        now = list(tile_shape(head_dim, dtype))
        if now != rec["tile"]:
            raise ProgramMismatchError(
                f"skip state '{rec['state']}' was exported with {rec['tile'][0]}x{rec['tile'][1]} tiles for "
                f"head_dim {head_dim} {rec['dtype']}, but this liteattn_ops uses {now[0]}x{now[1]}: the state has "
                "the wrong layout. Re-export the model with this version.")
        q, k = rec["q_shape"], rec["k_shape"]
        expected = list(state_shape(q[0], q[1], q[2], k[2], head_dim, dtype))
        if expected != rec["state_shape"]:
            raise ProgramMismatchError(f"skip state '{rec['state']}': recorded shape {rec['state_shape']} != "
                                       f"{expected} computed by this liteattn_ops. Re-export the model.")
    return meta


def load(f, **kwargs) -> torch.export.ExportedProgram:
    """torch.export.load(f, **kwargs), then check_program; the loaded program's skip states are
    fresh (every tile live), whatever they were when the file was saved: a program saved after it
    ran would otherwise start its first video with the last one's skip decisions. Raises
    ProgramMismatchError for a program exported by an incompatible liteattn_ops (see
    check_program)."""
    ep = torch.export.load(f, **kwargs)
    meta = check_program(ep)
    states = exported_states(ep)
    for rec in meta["states"]:
        state = states.get(rec["state"])
        if state is None or list(state.shape) != rec["state_shape"]:
            raise ProgramMismatchError(f"skip state '{rec['state']}': the program's buffer "
                                       f"{None if state is None else tuple(state.shape)} does not match its record "
                                       f"{rec['state_shape']}")
    evolved = [name for name, state in states.items() if not bool((state == -1).all())]
    if evolved:
        log.info("liteattn_ops.load: %d skip states were saved after the program ran; reset to fresh (all live): %s",
                 len(evolved), evolved)
    for state in states.values():
        reset_state(state)
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
        names = [rec["state"] for rec in meta["states"]] if meta else []
        out = {}
        for name in names:
            for store in (program.constants, program.state_dict):
                if name in store:
                    out[name] = store[name]
        return out
    if isinstance(program, torch.fx.GraphModule):
        return {name: program.get_buffer(name) for name in _state_names_in_graph(program.graph)}
    raise TypeError(f"expected an ExportedProgram, a module from ep.module() or a LiteAttentionPackage, "
                    f"got {type(program).__name__} (for an eager model use liteattn_ops.reset / stats)")


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
        for rec in metadata["states"]:
            device = torch.device(rec["device"])
            if device.type == "cuda":
                device = torch.device("cuda", device_index if device_index >= 0 else torch.cuda.current_device())
            (batch, heads, seqlen_q, head_dim), seqlen_k = rec["q_shape"], rec["k_shape"][2]
            self.states[rec["state"]] = new_state(batch, heads, seqlen_q, seqlen_k, head_dim, getattr(torch, rec["dtype"]),
                                                  device)
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
        """{state buffer name: fraction of live tiles} (0-d tensor, or (H,) with per_head), on the device."""
        out = {}
        for rec in self.metadata["states"]:
            out[rec["state"]] = _state_live_fraction(self.states[rec["state"]], rec["k_shape"][2],
                                                     rec["q_shape"][-1], getattr(torch, rec["dtype"]),
                                                     per_head=per_head)
        return out


def _package_record(metadata: dict[str, str], path) -> dict:
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        raise ProgramMismatchError(f"{path} carries no liteattn_ops record: compile it with "
                                   "liteattn_ops.aoti_compile_and_package")
    return check_program(json.loads(raw))


def aoti_load_package(path: Union[str, os.PathLike], device_index: int = -1) -> LiteAttentionPackage:
    """torch._inductor.aoti_load_package + check_program; returns a LiteAttentionPackage that owns
    the skip states (fresh: every tile live)."""
    read_metadata = getattr(torch._C._aoti.AOTIModelPackageLoader, "load_metadata_from_package", None)
    if read_metadata is not None:      # check the record before the compiled model is loaded
        _package_record(read_metadata(str(path), "model"), path)
    compiled = torch._inductor.aoti_load_package(str(path), device_index=device_index)
    meta = _package_record(compiled.get_metadata(), path)
    missing = {rec["state"] for rec in meta["states"]} - set(compiled.get_constant_fqns())
    if missing:
        raise ProgramMismatchError(f"{path}: the compiled model has no constants {sorted(missing)} for the skip "
                                   "states listed in its record")
    return LiteAttentionPackage(compiled, meta, device_index)
