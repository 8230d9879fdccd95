"""The skip state under CUDA-graph capture and replay (Hopper GPU, the kernel): a captured call
updates the very state tensor on every replay exactly as eager calls do, an in-place reset between
replays starts a new video, and must-do / must-skip ranges captured with the call keep applying.

Every test is marked `cuda`; conftest.py skips them without a Hopper GPU and a built `_C`."""

from __future__ import annotations

import pytest
import torch

import liteattn_ops
from liteattn_ops.core.state import live_mask, new_state, reset_state
from liteattn_ops.testing import local_qkv

pytestmark = pytest.mark.cuda

SEQ, HEADS, STEPS = 2048, 2, 5


def _inputs(head_dim, steps=STEPS):
    """Structured (local) inputs for consecutive denoising steps, bf16 on the GPU: tiles far from
    the diagonal become negligible, and which ones changes a little from step to step."""
    gen = torch.Generator().manual_seed(head_dim)
    q0, k0, v0 = local_qkv((2, 32, 32), 1, HEADS, head_dim, length_scale=3.0, sharpness=30.0, generator=gen)
    out = []
    for step in range(steps):
        noise = 0.03 * step
        out.append(tuple((t + noise * torch.randn(t.shape, generator=gen)).to("cuda", torch.bfloat16)
                         for t in (q0, k0, v0)))
    return out


def _eager_run(steps, threshold, must_do, must_skip, head_dim):
    """States and outputs of eager calls of the op over the steps, from a fresh state."""
    state = new_state(1, HEADS, SEQ, SEQ, head_dim, torch.bfloat16, "cuda")
    states, outs = [], []
    for q, k, v in steps:
        out, lse = torch.ops.liteattn.sparse_attention(q, k, v, state, threshold, must_do, must_skip)
        states.append(state.clone())
        outs.append((out.clone(), lse.clone()))
    torch.cuda.synchronize()
    return states, outs


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("with_ranges", [False, True])
def test_replays_update_the_state_like_eager_calls(head_dim, with_ranges):
    steps = _inputs(head_dim)
    threshold = torch.full((HEADS,), -6.0, device="cuda")
    _, block_n = liteattn_ops.tile_shape(head_dim, torch.bfloat16)
    skip_tile = 1024 // block_n  # a must-skip range of exactly one tile
    must_do = torch.tensor([[0, 64]], device="cuda", dtype=torch.int32) if with_ranges else None
    must_skip = (torch.tensor([[skip_tile * block_n, (skip_tile + 1) * block_n]], device="cuda", dtype=torch.int32)
                 if with_ranges else None)
    eager_states, eager_outs = _eager_run(steps, threshold, must_do, must_skip, head_dim)
    live = [live_mask(s, SEQ, head_dim, torch.bfloat16) for s in eager_states]
    assert float(live[-1].float().mean()) < 0.9, "the inputs drop too few tiles for this test to mean anything"
    # (With the diagonal-first visit order these inputs settle at the first call, so the check that
    # matters is that the first call already drops tiles: a replay that did not write the state
    # would leave it all live after each reset and differ from the eager states below.)
    assert not bool(live[0].all()), "the first eager call drops no tile: replays would not be checked"

    # Static inputs; warm up on a side stream with a scratch state (the real one stays fresh).
    q, k, v = (t.clone() for t in steps[0])
    state = new_state(1, HEADS, SEQ, SEQ, head_dim, torch.bfloat16, "cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.ops.liteattn.sparse_attention(q, k, v, state.clone(), threshold, must_do, must_skip)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = torch.ops.liteattn.sparse_attention(q, k, v, state, threshold, must_do, must_skip)
    torch.cuda.synchronize()
    assert bool((state == -1).all()), "capturing the call changed the state (it must only be recorded)"
    address = state.data_ptr()

    for video in range(2):                      # the second video after an in-place reset
        reset_state(state)
        for i, (qi, ki, vi) in enumerate(steps):
            q.copy_(qi), k.copy_(ki), v.copy_(vi)
            graph.replay()
            torch.cuda.synchronize()
            where = f"video {video}, step {i}"
            assert torch.equal(state, eager_states[i]), (
                f"{where}: {int((live_mask(state, SEQ, head_dim, torch.bfloat16) != live[i]).sum())} tiles differ "
                "from the eager call's state")
            assert torch.equal(out, eager_outs[i][0]) and torch.equal(lse, eager_outs[i][1]), f"{where}: output differs"
            if with_ranges:
                mask = live_mask(state, SEQ, head_dim, torch.bfloat16)
                assert bool(mask[..., 0].all()), f"{where}: the must-do tile left the live set"
                assert not bool(mask[..., skip_tile].any()), f"{where}: the must-skip tile is live"
    assert state.data_ptr() == address


def test_threshold_written_in_place_reaches_the_graph():
    """A threshold changed in place between replays (what set_threshold does) is read by the next
    replay: -inf stops every removal, so the state stays as it was."""
    head_dim = 128
    steps = _inputs(head_dim, steps=3)
    threshold = torch.full((HEADS,), -6.0, device="cuda")
    q, k, v = (t.clone() for t in steps[0])
    state = new_state(1, HEADS, SEQ, SEQ, head_dim, torch.bfloat16, "cuda")
    torch.ops.liteattn.sparse_attention(q, k, v, state.clone(), threshold)          # warm-up, scratch state
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.ops.liteattn.sparse_attention(q, k, v, state, threshold)
    threshold.fill_(float("-inf"))
    graph.replay()
    torch.cuda.synchronize()
    assert bool((state == -1).all()), "a tile was removed with threshold -inf"
    threshold.fill_(-6.0)
    graph.replay()
    torch.cuda.synchronize()
    after = state.clone()
    assert not bool((after == -1).all()), "threshold -6 removed nothing: the graph did not see the new threshold"
    threshold.fill_(float("-inf"))
    for _ in range(2):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(state, after), "threshold -inf changed the state"
