"""Ulysses sequence parallelism around LiteAttention.

Every rank of a group of P processes holds a shard of the sequence, q, k, v of logical shape
(B, H, S/P, D). One all-to-all turns them into head shards (B, H/P, S, D): rank r gets heads
[r*H/P, (r+1)*H/P) over the whole sequence, in rank order. The rank runs LiteAttention on those
heads with its own skip state — the state of a head lives on exactly one rank, so states are never
communicated — and a second all-to-all turns the output back into sequence shards (B, H, S/P, D).

The collectives are torch.distributed._functional_collectives (traceable by Dynamo, fullgraph;
NCCL on GPUs, gloo on CPU). q, k and v travel in one all-to-all when they have one shape (self-
attention), so a layer costs two collectives. Nothing reads device values on the host: the only
waits are the collectives' own. The one exception is deliberate and eager-only: when a site sizes a
new skip state (the first call, a new resolution), the ranks compare their input shapes once with
an all_gather_object, so that a rank with another shard length or head count raises a clear error
on every rank instead of hanging or exchanging garbage.

Refused (ValueError naming the argument): heads not divisible by P (padding heads would give
each rank states for heads that do not exist and need the padding undone after every call; choose
P dividing the heads), and shards of unequal length across ranks (an S not divisible by P: pad
the sequence to a multiple of P before sharding, and give the padding tokens a must_skip range).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..core import ops
from ..core.state import state_shape
from ..nn.attention import LiteAttention, RangesLike, ThresholdLike


# ------------------------------------------------------------------------------------------------
# The group
# ------------------------------------------------------------------------------------------------

def _not_member() -> ValueError:
    return ValueError(f"group: this process (global rank {dist.get_rank()}) is not a member of the given process "
                      "group; every rank that calls Ulysses attention must belong to its group")


def _process_group(group):
    """The ProcessGroup of `group` (None: the default group; a 1-D DeviceMesh: its group)."""
    from torch.distributed.device_mesh import DeviceMesh

    if group is None:
        return dist.group.WORLD
    if group is dist.GroupMember.NON_GROUP_MEMBER:   # what new_group returns on the ranks outside it
        raise _not_member()
    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(f"group must be a ProcessGroup or a 1-D DeviceMesh, got a {group.ndim}-D mesh")
        return group.get_group()
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup, a 1-D DeviceMesh or None, "
                        f"got {type(group).__name__}")
    return group


def group_rank_and_size(group=None) -> tuple[int, int]:
    """(this process's rank in `group`, the group's size); `group` None is the default group.
    Raises a clear error when torch.distributed is not initialised or this process is not a member."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("Ulysses attention needs torch.distributed: call torch.distributed.init_process_group "
                           "first (torchrun sets the environment; backend 'nccl' on GPUs, 'gloo' on CPU)")
    pg = _process_group(group)
    rank = dist.get_rank(pg)
    if rank < 0:
        raise _not_member()
    return rank, dist.get_world_size(pg)


# ------------------------------------------------------------------------------------------------
# The two exchanges
# ------------------------------------------------------------------------------------------------

def _all_to_all(x: Tensor, group) -> Tensor:
    """Equal-split all-to-all of a contiguous tensor whose dim 0 is the destination rank."""
    from torch.distributed import _functional_collectives as funcol

    out = funcol.all_to_all_single(x.flatten(), None, None, group)
    return funcol.wait_tensor(out).view(x.shape)


def seq_to_heads(tensors: Sequence[Tensor], world: int, group) -> list[Tensor]:
    """Sequence shards (B, H, S/P, D) -> head shards (B, H/P, S, D), several tensors of one shape in
    one all-to-all. Rank r receives heads [r*H/P, (r+1)*H/P); the sequence is gathered in rank order."""
    batch, heads, seq_local, head_dim = tensors[0].shape
    n = len(tensors)
    # (P, n, B, H/P, S/P, D): block p (heads of rank p) is contiguous and goes to rank p. One copy
    # per tensor, straight into the send buffer.
    send = tensors[0].new_empty((world, n, batch, heads // world, seq_local, head_dim))
    for i, t in enumerate(tensors):
        send[:, i].copy_(t.reshape(batch, world, heads // world, seq_local, head_dim).transpose(0, 1))
    recv = _all_to_all(send, group)          # block p now holds sequence shard p of my heads
    # (P, n, B, H/P, S/P, D) -> n x (B, H/P, P*S/P, D), each contiguous (SDPA layout)
    recv = recv.permute(1, 2, 3, 0, 4, 5).contiguous().view(n, batch, heads // world, world * seq_local, head_dim)
    return list(recv.unbind(0))


def heads_to_seq(x: Tensor, world: int, group) -> Tensor:
    """Head shard (B, H/P, S, D) -> sequence shard (B, H, S/P, D), laid out in memory as
    (B, S/P, H, D) like the op's own output (so `.transpose(1, 2).reshape(B, S/P, H*D)` is free)."""
    batch, heads_local, seq, head_dim = x.shape
    # (P, B, S/P, H/P, D): block p (sequence shard p) goes to rank p.
    send = x.reshape(batch, heads_local, world, seq // world, head_dim).permute(2, 0, 3, 1, 4).contiguous()
    recv = _all_to_all(send, group)          # block p holds heads of rank p for my sequence shard
    # (contiguous() first: with size-1 dims a reshape could return a view in another memory order)
    out = recv.permute(1, 2, 0, 3, 4).contiguous().view(batch, seq // world, world * heads_local, head_dim)
    return out.transpose(1, 2)


def lse_heads_to_seq(lse: Tensor, world: int, group) -> Tensor:
    """float32 (B, H/P, S) -> (B, H, S/P)."""
    batch, heads_local, seq = lse.shape
    send = lse.reshape(batch, heads_local, world, seq // world).permute(2, 0, 1, 3).contiguous()
    recv = _all_to_all(send, group)          # (P, B, H/P, S/P)
    return recv.permute(1, 0, 2, 3).contiguous().view(batch, world * heads_local, seq // world)


# ------------------------------------------------------------------------------------------------
# Checks
# ------------------------------------------------------------------------------------------------

def _check_local(q: Tensor, k: Tensor, v: Tensor, world: int) -> None:
    if not torch.compiler.is_compiling():   # (traced, the op's fake implementation checks them)
        ops.check_inputs(q, k, v)   # 4-D, one dtype/device, head dim, contiguous last dim (clear errors)
    heads = q.shape[1]
    if heads % world:
        raise ValueError(f"q has {heads} heads, which the Ulysses group of {world} ranks cannot split: each rank "
                         f"takes heads/P whole heads. Use a group size that divides {heads} (heads are not padded)")


def _check_consistent(q: Tensor, k: Tensor, world: int, group) -> None:
    """All ranks agree on the shard shapes (eager, once per new skip state: a host sync)."""
    mine = (tuple(q.shape), tuple(k.shape), str(q.dtype), world)
    everyone: list = [None] * world
    dist.all_gather_object(everyone, mine, group=group)
    if any(x != mine for x in everyone):
        lines = "; ".join(f"rank {r}: q {x[0]}, k {x[1]}, {x[2]}, group size {x[3]}" for r, x in enumerate(everyone))
        raise ValueError("Ulysses attention: the ranks of the group disagree on the local shards (every rank "
                         "must hold an equal sequence shard of the same heads; pad the sequence to a multiple of "
                         f"the group size before sharding): {lines}")


def _head_shard_shape(q: Tensor, k: Tensor, world: int) -> tuple[tuple, tuple]:
    """Shapes of q and k after the exchange: (B, H/P, S_q, D), (B, H/P, S_k, D)."""
    batch, heads, seq_q, head_dim = (int(s) for s in q.shape)
    seq_k = int(k.shape[2])
    return (batch, heads // world, seq_q * world, head_dim), (batch, heads // world, seq_k * world, head_dim)


def _needs_new_state(site: LiteAttention, q: Tensor, k: Tensor, world: int) -> bool:
    (batch, heads, seq_q, head_dim), (_, _, seq_k, _) = _head_shard_shape(q, k, world)
    expected = state_shape(batch, heads, seq_q, seq_k, head_dim, q.dtype)
    return not any(tuple(s.shape) == tuple(expected) and s.device == q.device for s in site.states().values())


# ------------------------------------------------------------------------------------------------
# The op
# ------------------------------------------------------------------------------------------------

def _ulysses(q: Tensor, k: Tensor, v: Tensor, attend: Callable, site: LiteAttention, rank_size, group,
             return_lse: bool):
    _, world = rank_size
    _check_local(q, k, v, world)
    pg = _process_group(group)
    if not torch.compiler.is_compiling() and _needs_new_state(site, q, k, world):
        _check_consistent(q, k, world, pg)
    if q.shape == k.shape == v.shape:
        qh, kh, vh = seq_to_heads((q, k, v), world, pg)
    else:   # S_q != S_k (e.g. a sharded context): queries alone, keys and values together
        (qh,) = seq_to_heads((q,), world, pg)
        kh, vh = seq_to_heads((k, v), world, pg)
    out, lse = attend(qh, kh, vh)
    out = heads_to_seq(out, world, pg)
    if return_lse:
        return out, lse_heads_to_seq(lse, world, pg)
    return out


def ulysses_attention(q: Tensor, k: Tensor, v: Tensor, site: LiteAttention, group=None, *,
                      scale: Optional[float] = None, return_lse: bool = False):
    """LiteAttention over the whole sequence from local sequence shards, Ulysses style.

    q, k, v: this rank's sequence shard, logical (B, H, S/P, D) (SDPA layout; every rank holds an
    equal shard, in rank order). `site`: the LiteAttention that owns this rank's skip state; it is
    called with the rank's head shard (B, H/P, S, D), so its threshold is one float or H/P values
    (use `UlyssesLiteAttention` to give all H values and have them sliced). must_do / must_skip
    ranges of the site are positions in the whole sequence. `group`: a ProcessGroup or 1-D
    DeviceMesh of P ranks (default: the default group). Returns out (B, H, S/P, D) in q's dtype
    (memory (B, S/P, H, D)) and, with return_lse, lse float32 (B, H, S/P).
    """
    if not isinstance(site, LiteAttention):
        raise TypeError(f"site must be a liteattn_ops.LiteAttention (it owns this rank's skip state), "
                        f"got {type(site).__name__}")
    rank_size = group_rank_and_size(group)
    return _ulysses(q, k, v, lambda a, b, c: site(a, b, c, scale=scale, return_lse=True), site, rank_size,
                    group, return_lse)


class UlyssesLiteAttention(LiteAttention):
    """Drop-in for `F.scaled_dot_product_attention(q, k, v, scale=...)` on sequence shards: each
    rank of `group` calls it with its (B, H, S/P, D) shard and gets its (B, H, S/P, D) output; the
    module holds the skip state of the rank's H/P heads.

    Args:
        threshold: one float, or one value per head of the *whole* model (H values; each rank uses
            its own H/P), log2 units, <= 0.
        must_do / must_skip: key-token ranges in the whole sequence.
        group: ProcessGroup or 1-D DeviceMesh (default: the default group), fixed for the module.
        use_int8: INT8 Q/K mode (as LiteAttention; every rank holds the whole sequence of its heads,
            so the K smoothing mean is the one a single GPU computes).

    It is a LiteAttention, so liteattn_ops.reset / stats / set_threshold see it; its `state`,
    `live_mask()` and `live_fraction(per_head=True)` cover this rank's heads, [rank*H/P, (rank+1)*H/P).
    """

    def __init__(self, threshold: ThresholdLike = -10.0, *, must_do: RangesLike = None,
                 must_skip: RangesLike = None, group=None, use_int8: bool = False):
        super().__init__(threshold, must_do=must_do, must_skip=must_skip, use_int8=use_int8)
        self.group = group
        self._shard: Optional[tuple[int, int]] = None   # (rank, P), known at the first call

    @property
    def head_range(self) -> Optional[tuple[int, int]]:
        """[start, end) of the heads whose states this rank holds (None before the first call)."""
        if self._shard is None or self.state is None:
            return None
        rank, _ = self._shard
        local = self.state.shape[1]
        return rank * local, (rank + 1) * local

    def _threshold_list(self, values: list[float], heads: int) -> list[float]:
        # Values for every head of the model: this rank's heads are [rank*heads, (rank+1)*heads).
        if len(values) not in (1, heads) and self._shard is not None:
            rank, world = self._shard
            if len(values) != heads * world:
                raise ValueError(f"threshold has {len(values)} values but the attention has {heads * world} heads "
                                 f"({heads} on each of {world} ranks); give one float or one value per head")
            values = values[rank * heads:(rank + 1) * heads]
        return super()._threshold_list(values, heads)

    def _infer_parameters(self, module, args, kwargs=None):
        """Dynamo is about to trace a call: size the state for the head shard, not the input shard."""
        q, k = args[0], args[1]
        self._shard = group_rank_and_size(self.group)
        _check_local(q, k, args[2], self._shard[1])
        q_shape, k_shape = _head_shard_shape(q, k, self._shard[1])
        self._allocate(q.new_empty(q_shape), k.new_empty(k_shape), 0)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None,
                return_lse: bool = False):
        if self._shard is None or not torch.compiler.is_compiling():
            self._shard = group_rank_and_size(self.group)
        attend = lambda a, b, c: LiteAttention.forward(self, a, b, c, scale=scale, return_lse=True)  # noqa: E731
        return _ulysses(q, k, v, attend, self, self._shard, self.group, return_lse)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={None if self._shard is None else self._shard[1]}"
