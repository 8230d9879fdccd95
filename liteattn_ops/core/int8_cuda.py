"""INT8 Q/K mode on CUDA (issue 12; the exact semantics: out/INT8_SPEC.md, emulated by
liteattn_ops.core.quant and reference.sparse_attention_reference(..., use_int8=True)).

    launch_int8(q, k, v, state, threshold, must_do, must_skip, scale) -> (out, lse)

runs on the current stream, with no host synchronisation (CUDA-graph capturable):

1. the pre-pass `_C.quantize_qk` (csrc/int8_prepass.cu, two kernels): k's per-channel smoothing mean mu, q per
   BM-row block and k - mu per BN-row block into int8 (B, H, S, D) with float32 scales (B, H, Mt) / (B, H, Nt),
   and q[i] . mu per query row;
2. the forward kernel in INT8 mode (`_C.forward(int8=True)`, FwdTraits::kInt8): s8 x s8 -> s32 wgmma for
   Q K^T, the scores scaled per tile pair, then the softmax, skip vote and P V (v unquantized) of the 16-bit mode.
   The LSE gets scale * q[i] . mu added: softmax does not see the per-row constant the smoothing removes, but
   the LSE does, and without it LSEs of calls with different k (a text/video split, sequence parallelism)
   would not merge. (out/INT8_SPEC.md step 4 as first written leaves this term out; see NOTES.md "INT8 mode".)

`state` is read and updated in place exactly as by liteattn_ops.core.ops._launch (None: the dense path). The
int8 buffers, scales and scratch come from PyTorch's caching allocator per call; its stream order makes their
reuse after the launches are queued safe, as for _launch's schedule scratch.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import ops, quant
from .extension import extension
from .tiling import num_tiles, tile_shape


def _int8_extension():
    ext = extension()
    if not getattr(ext, "HAS_INT8", False):
        raise RuntimeError("liteattn_ops._C was built without the INT8 Q/K kernels (cmake -DLITEATTN_BUILD_INT8=OFF); "
                           "rebuild with LITEATTN_BUILD_INT8=ON or call the op with use_int8=False")
    return ext


class Prepass(NamedTuple):
    """What the pre-pass writes: `quantized` as liteattn_ops.core.quant.quantize_qk computes it (bit for bit,
    except where the mean of a channel rounds at a tie of k's dtype), and q_mu (B, H, S_q) float32 = q[i] . mu
    (the LSE correction; float32, summation order unspecified)."""

    quantized: quant.QuantizedQK
    q_mu: Tensor


def quantize(q: Tensor, k: Tensor) -> quant.QuantizedQK:
    """The pre-pass's int8 operands: prepass(q, k).quantized."""
    return prepass(q, k).quantized


def prepass(q: Tensor, k: Tensor) -> Prepass:
    """Runs the pre-pass on the current stream (no host synchronisation)."""
    ext = _int8_extension()
    q, k = (ops._tma_ready(ext, t) for t in (q, k))
    batch, heads, seqlen_q, head_dim = q.shape
    seqlen_k = k.shape[2]
    block_m, block_n = tile_shape(head_dim, q.dtype)
    device = q.device
    q8 = torch.empty((batch, heads, seqlen_q, head_dim), dtype=torch.int8, device=device)
    k8 = torch.empty((batch, heads, seqlen_k, head_dim), dtype=torch.int8, device=device)
    q_scale = torch.empty((batch, heads, num_tiles(seqlen_q, block_m)), dtype=torch.float32, device=device)
    k_scale = torch.empty((batch, heads, num_tiles(seqlen_k, block_n)), dtype=torch.float32, device=device)
    mu = torch.empty((batch, heads, head_dim), dtype=torch.float32, device=device)
    q_mu = torch.empty((batch, heads, seqlen_q), dtype=torch.float32, device=device)
    partial = torch.empty((batch, heads, ext.INT8_MEAN_MAX_SPLITS, head_dim), dtype=torch.float32, device=device)
    with torch.cuda.device(device):
        ext.quantize_qk(
            q=q.data_ptr(), k=k.data_ptr(), batch=batch, heads=heads, seqlen_q=seqlen_q, seqlen_k=seqlen_k,
            head_dim=head_dim, dtype=str(q.dtype).removeprefix("torch."), q_stride=q.stride()[:3],
            k_stride=k.stride()[:3], q8=q8.data_ptr(), k8=k8.data_ptr(), q_scale=q_scale.data_ptr(),
            k_scale=k_scale.data_ptr(), k_mean=mu.data_ptr(), q_mu=q_mu.data_ptr(), partial=partial.data_ptr(),
            stream=torch.cuda.current_stream(device).cuda_stream,
        )
    return Prepass(quant.QuantizedQK(q8, q_scale, k8, k_scale, mu), q_mu)


def forward_int8(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, state: Optional[Tensor] = None,
                 threshold: Optional[Tensor] = None, must_do: Optional[Tensor] = None,
                 must_skip: Optional[Tensor] = None, scale: Optional[float] = None, schedule=True,
                 split_tail: bool = True) -> None:
    """Pre-pass and INT8-mode kernel into caller-provided `out` (logical (B, H, S_q, D), q.dtype, even strides)
    and `lse` (B, H, S_q) float32 (the tests poison them). schedule: True (the op's path: the kernel orders
    the query tiles in fresh scratch), False (natural order) or an int32 (B, H, Mt) scratch tensor.
    split_tail: as in ops.launch_forward."""
    ext = _int8_extension()
    ops._check_cuda_device(q.device.index if q.device.index is not None else torch.cuda.current_device())
    v = ops._tma_ready(ext, v)
    quantized, q_mu = prepass(q, k)
    ops.launch_forward(ext, quantized.q8, quantized.k8, v, out, lse, q.shape, state, threshold, must_do, must_skip,
                       scale, schedule, int8=(quantized.q_scale, quantized.k_scale, q_mu), split_tail=split_tail)


def launch_int8(q: Tensor, k: Tensor, v: Tensor, state: Optional[Tensor], threshold: Optional[Tensor],
                must_do: Optional[Tensor], must_skip: Optional[Tensor], scale: Optional[float]) -> tuple[Tensor, Tensor]:
    """The CUDA implementation of the ops with use_int8=True: (out, lse) as ops._launch returns them; `state`
    (None for the dense op) is updated in place. Inputs are already checked by the op (ops.check_inputs)."""
    out, lse = ops._empty_outputs(q)
    forward_int8(q, k, v, out, lse, state, threshold, must_do, must_skip, scale)
    return out, lse
