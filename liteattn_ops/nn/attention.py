"""Eager API: the LiteAttention module (one attention call site with its own skip state) and the
model-level helpers reset / stats / set_threshold."""

from __future__ import annotations

import logging
import math
from typing import Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..core import ops
from ..core.state import live_mask, new_state, reset_state

log = logging.getLogger("liteattn_ops")

# Argument parsing lives in core/params.py; these names stay importable from here.
from ..core.params import RangesLike, ThresholdLike  # noqa: E402
from ..core.params import ranges_tensor as _ranges_tensor  # noqa: E402
from ..core.params import threshold_values as _threshold_values  # noqa: E402


def _state_key(q, k) -> Optional[tuple]:
    """(B, H, S_q, S_k, D, dtype, device) of a call, or None when q/k are not 4-D tensors."""
    if not (isinstance(q, Tensor) and isinstance(k, Tensor) and q.dim() == 4 and k.dim() == 4):
        return None
    batch, heads, seqlen_q, head_dim = q.shape
    return (batch, heads, seqlen_q, k.shape[2], head_dim, q.dtype, q.device)


class LiteAttention(nn.Module):
    """Drop-in for `F.scaled_dot_product_attention(q, k, v, scale=...)` that skips KV tiles found
    negligible in earlier calls. Owns the skip state of one attention call site.

    Args:
        threshold: log2-units threshold (<= 0), one float or one per head; -inf never skips.
        must_do: key-token [start, end) ranges whose tiles are always computed.
        must_skip: key-token ranges whose tiles (entirely inside) are never computed.

    The state is a non-persistent buffer, allocated at the first call and re-allocated (with a log
    line) when (batch, heads, seq lens, head_dim, dtype, device) change. Inference only.
    """

    def __init__(self, threshold: ThresholdLike = -10.0, *, must_do: RangesLike = None,
                 must_skip: RangesLike = None):
        super().__init__()
        self._threshold = _threshold_values(threshold)
        self._must_do = _ranges_tensor("must_do", must_do)
        self._must_skip = _ranges_tensor("must_skip", must_skip)
        self.register_buffer("state", None, persistent=False)
        self.register_buffer("threshold_per_head", None, persistent=False)
        self.register_buffer("must_do_ranges", None, persistent=False)
        self.register_buffer("must_skip_ranges", None, persistent=False)
        self._key: Optional[tuple] = None
        self.calls = 0  # calls since the last reset

    # -- configuration ----------------------------------------------------------------------
    @property
    def threshold(self) -> list[float]:
        return list(self._threshold)

    @threshold.setter
    def threshold(self, value: ThresholdLike) -> None:
        self._threshold = _threshold_values(value)
        if self.threshold_per_head is not None:
            # In place: compiled graphs and CUDA graphs keep the buffer's address.
            self.threshold_per_head.copy_(self._threshold_tensor(self.threshold_per_head.shape[0], "cpu"))

    def set_ranges(self, must_do: RangesLike = None, must_skip: RangesLike = None) -> None:
        """Replace the must-do / must-skip key ranges (takes effect at the next call)."""
        self._must_do = _ranges_tensor("must_do", must_do)
        self._must_skip = _ranges_tensor("must_skip", must_skip)
        self.must_do_ranges = None if self._must_do is None else self._must_do.to(self._device())
        self.must_skip_ranges = None if self._must_skip is None else self._must_skip.to(self._device())

    def _device(self):
        return self.state.device if self.state is not None else "cpu"

    def _threshold_tensor(self, heads: int, device) -> Tensor:
        values = self._threshold
        if len(values) == 1:
            values = values * heads
        if len(values) != heads:
            raise ValueError(f"threshold has {len(self._threshold)} values but the attention has {heads} heads; "
                             "give one float or one value per head")
        return torch.tensor(values, dtype=torch.float32, device=device)

    # -- state ------------------------------------------------------------------------------
    def _ensure_state(self, q: Tensor, k: Tensor, v: Tensor) -> None:
        """A state sized for these inputs (inputs checked only when a new state is needed: the op
        itself checks every call)."""
        key = _state_key(q, k)
        if key is not None and key == self._key:
            return
        ops.check_inputs(q, k, v)  # clear errors before anything is allocated for these inputs
        batch, heads, seqlen_q, seqlen_k, head_dim, dtype, device = key
        if torch.compiler.is_exporting():
            # A state created while torch.export traces would be a fake tensor left in the module.
            raise RuntimeError(
                f"LiteAttention: torch.export reached a site whose skip state is missing or sized for other shapes "
                f"(have {None if self._key is None else self._key[:5]}, need {key[:5]}): run the model once on "
                "inputs of the export shapes before torch.export.export, or use liteattn_ops.export(model, args)")
        if self._key is not None:
            log.info("LiteAttention: input shape changed from %s to %s: new skip state", self._key[:5], key[:5])
        self.state = new_state(batch, heads, seqlen_q, seqlen_k, head_dim, dtype, device)
        self.threshold_per_head = self._threshold_tensor(heads, device)
        self.must_do_ranges = None if self._must_do is None else self._must_do.to(device)
        self.must_skip_ranges = None if self._must_skip is None else self._must_skip.to(device)
        self._key = key
        self.calls = 0

    def reset(self) -> None:
        """Make every tile live again (in place); the next video starts from dense attention."""
        if self.state is not None:
            reset_state(self.state)
        self.calls = 0

    def live_mask(self) -> Optional[Tensor]:
        """bool (B, H, Mt, Nt), True where a KV tile is live; None before the first call."""
        if self.state is None:
            return None
        _, _, _, seqlen_k, head_dim, dtype, _ = self._key
        return live_mask(self.state, seqlen_k, head_dim, dtype)

    def live_fraction(self, per_head: bool = False) -> Optional[Tensor]:
        """Fraction of live tiles (0-d tensor), or per head ((H,) tensor); computed on the device."""
        mask = self.live_mask()
        if mask is None:
            return None
        mask = mask.float()
        return mask.mean(dim=(0, 2, 3)) if per_head else mask.mean()

    # -- call -------------------------------------------------------------------------------
    def forward(self, q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None,
                return_lse: bool = False):
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            raise RuntimeError("LiteAttention is inference-only (the skip state is not differentiable): "
                               "run under torch.no_grad() / torch.inference_mode(), or liteattn_ops.disable(model)")
        self._ensure_state(q, k, v)
        out, lse = torch.ops.liteattn.sparse_attention(
            q, k, v, self.state, self.threshold_per_head, self.must_do_ranges, self.must_skip_ranges, scale)
        self.calls += 1
        return (out, lse) if return_lse else out

    def extra_repr(self) -> str:
        thr = self._threshold[0] if len(self._threshold) == 1 else self._threshold
        return f"threshold={thr}"
