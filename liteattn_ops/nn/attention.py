"""Eager API: the LiteAttention module, which owns the skip states of one attention call site
(the one state store of the package: the routed sites of liteattn_ops.enable are LiteAttentions
too), and FlashLiteAttention, the same module called with FlashAttention's (B, S, H, D) layout.

The state store. A LiteAttention keeps its skip states as non-persistent buffers, one per
(call slot, branch, shape) key, so `model.to(...)` moves them, the state_dict does not change,
and torch.compile lifts them as graph inputs (a graph reused by several modules updates each
module's own buffers). Next to each state: a 0-d int64 counter of the calls since the last
reset (incremented on the device, also inside compiled graphs and CUDA graphs: no host sync),
which `calls`, `stats(model)` and `warmup_steps` read. Thresholds are float32 buffers, one per
head count seen (a module whose forward calls attention with two head counts gets two), kept
float32 through `model.half()` / `.to(dtype)`. Every buffer is created with inference mode off,
so a model first run under `torch.inference_mode()` keeps working outside it.

Naming. A LiteAttention placed by hand is one attention call: its state buffer is `state` (slot
0, default branch), sized for the most recent shape (a new shape replaces it, with a log line).
A routed site (`AttentionSite`, liteattn_ops.routing) keeps one state per key,
`state_<slot>_<branch>_<B>x<H>x<Sq>x<Sk>x<D>_<dtype>`, so alternating resolutions each continue
where they left off and a compiled graph per shape keeps its buffers.
"""

from __future__ import annotations

import logging
import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin

from ..core import ops
from ..core.state import live_mask, new_state, reset_state

log = logging.getLogger("liteattn_ops")

# Argument parsing lives in core/params.py; these names stay importable from here.
from ..core.params import RangesLike, ThresholdLike  # noqa: E402
from ..core.params import ranges_tensor as _ranges_tensor  # noqa: E402
from ..core.params import threshold_values as _threshold_values  # noqa: E402

DEFAULT_BRANCH = "default"
THRESHOLD_BUFFER = "threshold_per_head"


def _state_key(q, k) -> Optional[tuple]:
    """(B, H, S_q, S_k, D, dtype) of a call (ints, also for fake tensors), or None when q/k are not
    4-D tensors."""
    if not (isinstance(q, Tensor) and isinstance(k, Tensor) and q.dim() == 4 and k.dim() == 4):
        return None
    batch, heads, seqlen_q, head_dim = (int(s) for s in q.shape)
    return (batch, heads, seqlen_q, int(k.shape[2]), head_dim, q.dtype)


def check_use_int8(value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"use_int8 must be a bool (True: INT8 Q/K mode, see README 'INT8 Q/K mode'), got "
                        f"{type(value).__name__} {value!r}")
    return value


def check_warmup_steps(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"warmup_steps must be an int >= 0 (dense calls at the start of each video), got {value!r}")
    return value


def _writable(module: nn.Module, name: str) -> Tensor:
    """The buffer `name`, safe to update in place here: a buffer that became an inference tensor
    (e.g. `model.to(...)` run under torch.inference_mode()) cannot be written outside inference
    mode, so it is replaced by a normal copy (a new address: compiled graphs re-guard once)."""
    t = module._buffers[name]
    if t.is_inference() and not torch.is_inference_mode_enabled():
        with torch.inference_mode(False):
            t = t.clone()
        module._buffers[name] = t
    return t


def flat_ranges(name: str, ranges) -> Optional[list[tuple[int, int]]]:
    """The original LiteAttention's range format, `[start_0, end_0, start_1, end_1, ...]` (key-token
    indices, end exclusive, any order of the pairs), as (start, end) pairs. Pairs, an (R, 2) tensor
    or None pass through unchanged."""
    if ranges is None or isinstance(ranges, Tensor):
        return ranges
    if isinstance(ranges, (str, bytes)) or not isinstance(ranges, Sequence):
        raise TypeError(f"{name} must be a flat list [start_0, end_0, start_1, end_1, ...] of key-token indices "
                        f"(end exclusive) or a list of (start, end) pairs, got {type(ranges).__name__}")
    if ranges and all(isinstance(x, int) and not isinstance(x, bool) for x in ranges):
        if len(ranges) % 2:
            raise ValueError(f"{name} as a flat list needs an even number of bounds [start_0, end_0, start_1, "
                             f"end_1, ...], got {len(ranges)}: {list(ranges)}")
        return [(ranges[i], ranges[i + 1]) for i in range(0, len(ranges), 2)]
    return ranges


def _current_trace() -> Optional[int]:
    """An id of the Dynamo trace running now (its output graph), or None outside a trace."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
    except (ImportError, AttributeError):
        return None
    return None if tx is None else id(tx.output)


def restart_if_stale(called: list, allocated: list) -> None:
    """Dynamo snapshots a module's dicts (_buffers, ...) the first time a trace reads them. When
    buffers are added to a module this trace has already read (a second SDPA call of one forward
    with new shapes, e.g. another head count), the trace would not see them: restart it once (the
    restarted trace finds everything allocated, so it does not restart again: the callers only
    ever add buffers)."""
    trace = _current_trace()
    if trace is None:
        return
    stale = any(m.__dict__.get("_seen_in_trace") == trace for m in allocated)
    for m in called:
        m.__dict__["_seen_in_trace"] = trace
    if stale:
        from torch._dynamo.exc import RestartAnalysis

        raise RestartAnalysis("liteattn: new skip-state buffers on a module this trace already read")


class LiteAttention(LazyModuleMixin, nn.Module):
    """Drop-in for `F.scaled_dot_product_attention(q, k, v, scale=...)` that skips KV tiles found
    negligible in earlier calls. Owns the skip states of one attention call site.

    Args:
        threshold: log2-units threshold (<= 0), one float or one per head; -inf never skips.
        must_do: key-token [start, end) ranges whose tiles are always computed.
        must_skip: key-token ranges whose tiles (entirely inside) are never computed.
        warmup_steps: the first `warmup_steps` calls of each state after a reset run dense
            (threshold -inf), chosen on the device: no recompile, no host sync.
        use_int8: INT8 Q/K mode: scores from per-block int8 q and mean-smoothed k (the op's
            `use_int8`; README "INT8 Q/K mode"). The skip state is the same as in bf16 mode.

    States are allocated at the first call for a shape (see the module docstring). Inference only.
    It is a lazy module only for Dynamo: Dynamo then calls `_infer_parameters` eagerly before it
    traces a call, which allocates the buffers the graph will read (the mixin's __init__ is not
    run, so nothing lazy happens in eager mode).
    """

    cls_to_become = None
    _per_shape = False      # AttentionSite: one state per shape

    def __init__(self, threshold: ThresholdLike = -10.0, *, must_do: RangesLike = None,
                 must_skip: RangesLike = None, warmup_steps: int = 0, use_int8: bool = False):
        nn.Module.__init__(self)
        self._threshold = _threshold_values(threshold)
        self._must_do = _ranges_tensor("must_do", must_do)
        self._must_skip = _ranges_tensor("must_skip", must_skip)
        self.warmup_steps = check_warmup_steps(warmup_steps)
        self.use_int8 = check_use_int8(use_int8)
        self.register_buffer("state", None, persistent=False)
        self.register_buffer(THRESHOLD_BUFFER, None, persistent=False)
        self.register_buffer("must_do_ranges", None, persistent=False)
        self.register_buffer("must_skip_ranges", None, persistent=False)
        self.branch = DEFAULT_BRANCH
        self._slots: dict[str, tuple] = {}        # state buffer name -> (slot, branch, key)
        self._thresholds: dict[int, str] = {}     # heads -> threshold buffer name
        self._current: Optional[str] = None       # the most recently allocated / used state
        self._initialize_hook = None              # Dynamo treats a module with this attribute as lazy

    # -- configuration ----------------------------------------------------------------------
    @property
    def threshold(self) -> list[float]:
        return list(self._threshold)

    @threshold.setter
    def threshold(self, value: ThresholdLike) -> None:
        values = self._checked_threshold(value)
        self._apply_threshold(values)

    def _checked_threshold(self, value: ThresholdLike) -> list[float]:
        """Parse and check `value` against every head count this module already has (nothing
        changes when it raises)."""
        values = _threshold_values(value)
        for heads in self._thresholds:
            self._threshold_list(values, heads)
        return values

    def _apply_threshold(self, values: list[float]) -> None:
        self._threshold = values
        for heads, name in self._thresholds.items():
            # In place: compiled graphs and CUDA graphs keep the buffer's address.
            buffer = _writable(self, name)
            buffer.copy_(torch.tensor(self._threshold_list(values, heads), dtype=torch.float32))

    def set_ranges(self, must_do: RangesLike = None, must_skip: RangesLike = None) -> None:
        """Replace the must-do / must-skip key ranges (takes effect at the next call)."""
        must_do, must_skip = _ranges_tensor("must_do", must_do), _ranges_tensor("must_skip", must_skip)
        self._must_do, self._must_skip = must_do, must_skip
        device = self._device()
        with torch.inference_mode(False):
            self.must_do_ranges = None if must_do is None else must_do.to(device)
            self.must_skip_ranges = None if must_skip is None else must_skip.to(device)

    def _device(self):
        for name in self._slots:
            return self._buffers[name].device
        return "cpu"

    def _threshold_list(self, values: list[float], heads: int) -> list[float]:
        if len(values) == 1:
            return values * heads
        if len(values) != heads:
            raise ValueError(f"threshold has {len(values)} values but the attention has {heads} heads; "
                             "give one float or one value per head")
        return list(values)

    def _threshold_tensor(self, heads: int, device) -> Tensor:
        return torch.tensor(self._threshold_list(self._threshold, heads), dtype=torch.float32, device=device)

    def _apply(self, fn, recurse=True):
        # model.half() / .to(dtype) cast every float buffer; the op wants float32 thresholds.
        super()._apply(fn, recurse)
        for heads, name in self._thresholds.items():
            t = self._buffers.get(name)
            if t is not None and t.dtype != torch.float32:
                with torch.inference_mode(False):
                    self._buffers[name] = self._threshold_tensor(heads, t.device)
        return self

    # -- the state store --------------------------------------------------------------------
    def state_name(self, q: Tensor, k: Tensor, slot: int = 0) -> str:
        """The buffer name of the state for this call (slot = index of the call in its forward)."""
        if not self._per_shape:
            return "state" if (slot, self.branch) == (0, DEFAULT_BRANCH) else f"state_{slot}_{self.branch}"
        batch, heads, seqlen_q, seqlen_k, head_dim, dtype = _state_key(q, k)
        dtype_name = str(dtype).removeprefix("torch.")
        return f"state_{slot}_{self.branch}_{batch}x{heads}x{seqlen_q}x{seqlen_k}x{head_dim}_{dtype_name}"

    @staticmethod
    def _counter_name(state: str) -> str:
        return f"{state}_calls"

    def _threshold_name(self, heads: int) -> str:
        name = self._thresholds.get(heads)
        if name is None:
            name = THRESHOLD_BUFFER if not self._thresholds else f"{THRESHOLD_BUFFER}_{heads}"
        return name

    def _needs_allocation(self, name: str, q: Tensor, k: Tensor) -> bool:
        state = self._buffers.get(name)
        if state is None or state.device != q.device:
            return True
        if not self._per_shape and self._slots[name][2] != _state_key(q, k):
            return True
        thr = self._buffers.get(self._thresholds.get(int(q.shape[1]), ""))
        return thr is None or thr.dtype != torch.float32 or thr.device != q.device

    def _allocate(self, q: Tensor, k: Tensor, slot: int, *, member: bool = False) -> bool:
        """Make sure the state for this call exists (real tensors, even when q, k are fake), with
        inference mode off so the buffers stay writable outside it.

        member=True: allocating for a site of the same role as the one being traced; only what is
        missing is created, nothing is replaced (that site may live on another device)."""
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        name = self.state_name(q, k, slot)
        key = _state_key(q, k)
        batch, heads, seqlen_q, seqlen_k, head_dim, dtype = key
        device = q.device
        created = False
        with unset_fake_temporarily(), torch.no_grad(), torch.inference_mode(False):
            thr_name = self._threshold_name(heads)
            thr = self._buffers.get(thr_name)
            if thr is None or not member and (thr.dtype != torch.float32 or thr.device != device):
                tensor = self._threshold_tensor(heads, device)   # raises for a wrong head count
                self.register_buffer(thr_name, tensor, persistent=False)
                self._thresholds[heads] = thr_name
                created = True
            for attr, ranges in (("must_do_ranges", self._must_do), ("must_skip_ranges", self._must_skip)):
                current = getattr(self, attr)
                if ranges is not None and (current is None or not member and current.device != device):
                    setattr(self, attr, ranges.to(device))
                    created = True
            state = self._buffers.get(name)
            replace = state is not None and not member and (
                state.device != device or not self._per_shape and self._slots[name][2] != key)
            if state is None or replace:
                if state is not None and not self._per_shape and self._slots[name][2] != key:
                    log.info("LiteAttention: input shape changed from %s to %s: new skip state",
                             self._slots[name][2][:5], key[:5])
                elif self._slots and state is None:
                    log.info("liteattn site: new skip state %s", name)
                self.register_buffer(name, new_state(batch, heads, seqlen_q, seqlen_k, head_dim, dtype, device),
                                     persistent=False)
                self.register_buffer(self._counter_name(name), torch.zeros((), dtype=torch.int64, device=device),
                                     persistent=False)
                self._slots[name] = (slot, self.branch, key)
                created = True
            # The most recent state is the one live_mask / live_fraction / stats(model) show (a
            # same-role allocation only fills in a site that has none yet).
            if not member or self._current is None:
                self._current = name
        return created

    def _infer_parameters(self, module, args, kwargs=None):
        """Called by Dynamo, eagerly, before it traces a call of this module (fake args)."""
        kwargs = kwargs or {}
        q, k = args[0], args[1]
        if _state_key(q, k) is not None:
            # (no restart here: a hand-placed LiteAttention is one call, and a new shape replaces its
            # state, so a restarted trace could allocate again; routed sites only ever add buffers)
            self._allocate(q, k, int(kwargs.get("slot", 0)))

    def _replicate_for_data_parallel(self):  # LazyModuleMixin refuses; nothing here is lazy
        return nn.Module._replicate_for_data_parallel(self)

    def states(self) -> dict[str, Tensor]:
        """All skip states of this module: buffer name -> int32 tensor."""
        return {name: self._buffers[name] for name in self._slots if self._buffers.get(name) is not None}

    def reset(self) -> None:
        """Every state (all slots, branches, shapes) back to all-live and every call counter to 0,
        in place: the next video starts from dense attention."""
        for name in self.states():
            reset_state(_writable(self, name))
            _writable(self, self._counter_name(name)).zero_()

    @property
    def calls(self) -> int:
        """Calls since the last reset, summed over this module's states (reads device counters:
        this synchronises)."""
        counters = [self._buffers[self._counter_name(name)] for name in self.states()]
        return int(sum(int(c) for c in counters))

    def live_mask(self, name: Optional[str] = None) -> Optional[Tensor]:
        """bool (B, H, Mt, Nt), True where a KV tile is live, of the state `name` (default: the most
        recently allocated one); None before the first call."""
        name = name or self._current
        if name is None or self._buffers.get(name) is None:
            return None
        _, _, (_, _, _, seqlen_k, head_dim, dtype) = self._slots[name]
        return live_mask(self._buffers[name], seqlen_k, head_dim, dtype)

    def live_fraction(self, per_head: bool = False, name: Optional[str] = None) -> Optional[Tensor]:
        """Fraction of live tiles (0-d tensor), or per head ((H,) tensor); computed on the device."""
        mask = self.live_mask(name)
        if mask is None:
            return None
        mask = mask.float()
        return mask.mean(dim=(0, 2, 3)) if per_head else mask.mean()

    # -- call -------------------------------------------------------------------------------
    def _sparse(self, q: Tensor, k: Tensor, v: Tensor, scale: Optional[float], slot: int):
        """The stateful op on this call's state (allocated here in eager mode; under Dynamo the
        lazy-module hook did it before the trace)."""
        name = self.state_name(q, k, slot)
        if self._needs_allocation(name, q, k):
            if torch.compiler.is_exporting():
                # A state created while torch.export traces would become a constant of the program.
                raise RuntimeError(
                    f"LiteAttention: torch.export reached an attention site with no skip state for these shapes "
                    f"({name}, q {tuple(q.shape)}): run the model once on inputs of the export shapes before "
                    "torch.export.export, or use liteattn_ops.export(model, args)")
            if not torch.compiler.is_compiling():
                ops.check_inputs(q, k, v)  # clear errors before anything is allocated for these inputs
            self._allocate(q, k, slot)
        state = self._buffers[name]
        thr = self._buffers[self._thresholds[int(q.shape[1])]]
        exporting = torch.compiler.is_exporting()
        counter = self._buffers[self._counter_name(name)]
        if self.warmup_steps and not exporting:
            # Dense for the first calls after a reset, decided on the device (no recompile).
            thr = torch.where(counter < self.warmup_steps, float("-inf"), thr)
        out, lse = torch.ops.liteattn.sparse_attention(
            q, k, v, state, thr, self.must_do_ranges, self.must_skip_ranges, scale, **self._mode())
        if not exporting:  # an exported program keeps only the states as mutated buffers
            counter.add_(1)
        self._current = name
        return out, lse

    def forward(self, q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None,
                return_lse: bool = False):
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            raise RuntimeError("LiteAttention is inference-only (the skip state is not differentiable): "
                               "run under torch.no_grad() / torch.inference_mode(), or liteattn_ops.disable(model)")
        out, lse = self._sparse(q, k, v, scale, 0)
        return (out, lse) if return_lse else out

    def _mode(self) -> dict:
        """Keyword arguments of the op for this module's mode: `use_int8=True` only when set, so a
        bf16-mode graph reads as before."""
        return {"use_int8": True} if self.use_int8 else {}

    def _extra_stats(self) -> dict:
        """More entries for stats(model) (routed sites add their dispatcher status)."""
        return {}

    def extra_repr(self) -> str:
        thr = self._threshold[0] if len(self._threshold) == 1 else self._threshold
        extra = f", warmup_steps={self.warmup_steps}" if self.warmup_steps else ""
        extra += ", use_int8=True" if self.use_int8 else ""
        return f"threshold={thr}{extra}"


class FlashLiteAttention(LiteAttention):
    """LiteAttention with FlashAttention's calling convention, as the original LiteAttention:

        attn = liteattn_ops.FlashLiteAttention(threshold=-10.0)     # one object per layer
        out = attn(q, k, v)                                           # (B, S, H, D) in and out
        out, lse = attn(q, k, v, scale, must_do_list=[0, 512], return_lse=True)

    q, k, v: (batch, seq_len, heads, head_dim) with a contiguous last dim; returns (B, S_q, H, D)
    (and the float32 log-sum-exp, (B, H, S_q), natural log). `must_do_list` / `must_skip_list`
    take the original's flat format `[start_0, end_0, start_1, end_1, ...]` (key-token indices,
    end exclusive, pairs in any order) or (start, end) pairs; given at a call, they replace the
    module's ranges (as `set_ranges`) when they differ from the current ones. The state, the
    threshold and everything else are LiteAttention's: the same call in the SDPA layout,
    `LiteAttention()(q.transpose(1, 2), ...)`, gives the same output and state.
    """

    def _infer_parameters(self, module, args, kwargs=None):
        q, k = args[0], args[1]
        if _state_key(q, k) is not None:
            self._allocate(q.transpose(1, 2), k.transpose(1, 2), 0)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None,
                must_do_list=None, must_skip_list=None, return_lse: bool = False):
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, Tensor) or t.dim() != 4:
                raise ValueError(f"{name} must be a 4-D tensor (batch, seq_len, heads, head_dim), got "
                                 f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        if must_do_list is not None or must_skip_list is not None:
            must_do = _ranges_tensor("must_do_list", flat_ranges("must_do_list", must_do_list))
            must_skip = _ranges_tensor("must_skip_list", flat_ranges("must_skip_list", must_skip_list))
            if not (_same(must_do, self._must_do) and _same(must_skip, self._must_skip)):
                self.set_ranges(must_do, must_skip)
        out, lse = super().forward(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale, return_lse=True)
        out = out.transpose(1, 2)   # the op's output is laid out (B, S, H, D): this view is contiguous
        return (out, lse) if return_lse else out


def _same(a: Optional[Tensor], b: Optional[Tensor]) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and bool(torch.equal(a, b))
