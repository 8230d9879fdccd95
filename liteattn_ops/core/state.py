"""The skip state of one attention call site.

Format (shared by the CPU reference and the CUDA kernel):

    an int32 tensor of shape (B, H, Mt, W), contiguous, on the device of q,
    Mt = ceil(S_q / BM), Nt = ceil(S_k / BN), W = ceil(Nt / 32),
    bit (n % 32) of word n // 32 of row (b, h, m) is 1 when KV tile n is live for query tile m.

Bits >= Nt are don't-care (a reset sets them, the op never changes them). A fresh or reset state
is all ones (`fill_(-1)`): every tile live. Reset is in place, so compiled graphs and CUDA graphs
that hold the tensor's address keep working. Size: B*H*Mt*W*4 bytes, e.g. 12 heads at 32760
tokens with 128x176 tiles: 12 * 256 * 6 * 4 = 72 KiB.
"""

from __future__ import annotations

import torch

from .tiling import num_tiles, tile_shape

ALL_LIVE = -1
_BITS = 32


def state_shape(batch: int, heads: int, seqlen_q: int, seqlen_k: int, head_dim: int, dtype: torch.dtype):
    block_m, block_n = tile_shape(head_dim, dtype)
    return (batch, heads, num_tiles(seqlen_q, block_m), num_tiles(num_tiles(seqlen_k, block_n), _BITS))


def new_state(batch: int, heads: int, seqlen_q: int, seqlen_k: int, head_dim: int,
              dtype: torch.dtype, device=None) -> torch.Tensor:
    """A fresh state (every tile live) for attention of q (B, H, S_q, D) over k/v (B, H, S_k, D)."""
    shape = state_shape(batch, heads, seqlen_q, seqlen_k, head_dim, dtype)
    return torch.full(shape, ALL_LIVE, dtype=torch.int32, device=device)


def reset_state(state: torch.Tensor) -> torch.Tensor:
    """Make every tile live again, in place."""
    return state.fill_(ALL_LIVE)


def unpack_bits(words: torch.Tensor, nbits: int) -> torch.Tensor:
    """int32 words (..., W) -> bool (..., nbits), bit j of word w is element 32*w + j."""
    shifts = torch.arange(_BITS, dtype=torch.int32, device=words.device)
    bits = torch.bitwise_and(torch.bitwise_right_shift(words.unsqueeze(-1), shifts), 1)
    return bits.flatten(-2)[..., :nbits].bool()


def pack_bits(mask: torch.Tensor, fill: bool = True) -> torch.Tensor:
    """bool (..., N) -> int32 words (..., ceil(N/32)); bits past N are set to `fill`."""
    n = mask.shape[-1]
    words = num_tiles(n, _BITS)
    padded = torch.full((*mask.shape[:-1], words * _BITS), fill, dtype=torch.bool, device=mask.device)
    padded[..., :n] = mask
    weights = torch.bitwise_left_shift(torch.ones((), dtype=torch.int64, device=mask.device),
                                       torch.arange(_BITS, dtype=torch.int64, device=mask.device))
    value = (padded.view(*mask.shape[:-1], words, _BITS).long() * weights).sum(-1)
    value = torch.where(value >= 2**31, value - 2**32, value)  # reinterpret as two's complement
    return value.to(torch.int32)


def live_mask(state: torch.Tensor, seqlen_k: int, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Decoded state: bool (B, H, Mt, Nt), True where a KV tile is live.

    (seqlen_k, head_dim, dtype) must be those the state was made for: Nt = ceil(seqlen_k / BN)
    must need exactly the state's W = ceil(Nt / 32) words (shapes only: no device read)."""
    if not isinstance(state, torch.Tensor):
        raise TypeError(f"state must be an int32 tensor from liteattn_ops.new_state(...), got {type(state).__name__}")
    if state.dtype != torch.int32 or state.dim() == 0:
        # (B, H, Mt, W), or a stack of such states (..., W): the words are the last dim.
        raise TypeError(f"state must be an int32 (B, H, Mt, W) bitmask from liteattn_ops.new_state(...), got "
                        f"dtype {state.dtype} and shape {tuple(state.shape)}")
    if isinstance(seqlen_k, bool) or not isinstance(seqlen_k, (int, torch.SymInt)):
        raise TypeError(f"seqlen_k must be an int (the key length the state was made for), got {type(seqlen_k).__name__}")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype (the dtype of q the state was made for), got {type(dtype).__name__}")
    _, block_n = tile_shape(head_dim, dtype)
    n_tiles = num_tiles(seqlen_k, block_n)
    words = num_tiles(n_tiles, _BITS)
    torch._check_with(
        ValueError, seqlen_k >= 1 and words == state.shape[-1],
        lambda: f"seqlen_k={seqlen_k} with head_dim {head_dim} {dtype} ({n_tiles} key tiles of {block_n}) needs "
                f"{words} words per row, but the state has {state.shape[-1]} (shape {tuple(state.shape)}): pass the "
                "seqlen_k, head_dim and dtype the state was made for")
    return unpack_bits(state, n_tiles)


def live_fraction(state: torch.Tensor, seqlen_k: int, head_dim: int, dtype: torch.dtype,
                  per_head: bool = False) -> torch.Tensor:
    """Fraction of live tiles, overall (0-d) or per head (H,); a device tensor, no host sync."""
    mask = live_mask(state, seqlen_k, head_dim, dtype).float()
    return mask.mean(dim=(0, 2, 3)) if per_head else mask.mean()


def check_state(state: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> None:
    """Raise ValueError/TypeError when `state` does not fit attention of q over k."""
    if not isinstance(state, torch.Tensor):
        raise TypeError(f"state must be a torch.Tensor, got {type(state).__name__}")
    if state.dtype != torch.int32:
        raise TypeError(f"state must be an int32 bitmask (see liteattn_ops.state), got dtype {state.dtype}")
    if state.device != q.device:
        raise ValueError(f"state is on {state.device} but q is on {q.device}")
    batch, heads, seqlen_q, head_dim = q.shape
    expected = state_shape(batch, heads, seqlen_q, k.shape[2], head_dim, q.dtype)
    torch._check_with(
        ValueError, tuple(state.shape) == tuple(expected),
        lambda: f"state of shape {tuple(state.shape)} does not match this call: q {tuple(q.shape)}, "
                f"k {tuple(k.shape)}, tile {tile_shape(head_dim, q.dtype)} need (B, H, Mt, W) = {tuple(expected)}; "
                "create it with liteattn_ops.new_state(...) for these shapes")
    torch._check_with(ValueError, state.is_contiguous(), lambda: "state must be contiguous")
