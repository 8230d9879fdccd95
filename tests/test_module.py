import logging
import math

import pytest
import torch
import torch.nn.functional as F

import liteattn_ops
from liteattn_ops import LiteAttention
from liteattn_ops.testing import local_qkv


class TwoLayer(torch.nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.layers = torch.nn.ModuleList([LiteAttention(**kwargs), LiteAttention(**kwargs)])

    def forward(self, q, k, v):
        for layer in self.layers:
            q = layer(q, k, v)
        return q


def _inputs(batch=1, heads=2, seed=0):
    return local_qkv((4, 12, 16), batch, heads, 64, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_drop_in_for_sdpa():
    q, k, v = _inputs()
    attn = LiteAttention(threshold=-math.inf)
    torch.testing.assert_close(attn(q, k, v, scale=0.1), F.scaled_dot_product_attention(q, k, v, scale=0.1))
    out, lse = attn(q, k, v, return_lse=True)
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
    assert attn.live_fraction().item() == 1.0


@torch.no_grad()
def test_state_lifecycle(caplog):
    q, k, v = _inputs()
    attn = LiteAttention(threshold=-6.0)
    assert attn.live_mask() is None and attn.live_fraction() is None
    for _ in range(3):
        attn(q, k, v)
    mask = attn.live_mask()
    bm, bn = liteattn_ops.tile_shape(q.shape[-1], q.dtype)
    assert mask.shape == (1, 2, -(-q.shape[2] // bm), -(-k.shape[2] // bn)) and mask.dtype == torch.bool
    assert attn.live_fraction() < 1 and attn.live_fraction(per_head=True).shape == (2,)
    state = attn.state
    attn.reset()
    assert attn.state is state and attn.live_fraction() == 1.0 and attn.calls == 0
    # The state is not part of the model's state_dict (it is per video, not a weight).
    assert "state" not in attn.state_dict()
    # A new resolution gets a new, correctly sized state, with a log line.
    q2, k2, v2 = local_qkv((2, 8, 8), 1, 2, 64)
    with caplog.at_level(logging.INFO, logger="liteattn_ops"):
        attn(q2, k2, v2)
    assert attn.live_mask().shape == (1, 2, 1, 1)
    assert "new skip state" in caplog.text


@torch.no_grad()
def test_per_head_threshold_and_model_helpers():
    model = TwoLayer(threshold=[-4.0, -math.inf])
    q, k, v = _inputs()
    for _ in range(3):
        model(q, k, v)
    report = liteattn_ops.stats(model)
    assert list(report) == ["layers.0", "layers.1"]
    per_head = report["layers.0"]["live_fraction_per_head"]
    assert per_head[0] < 1.0 and per_head[1] == 1.0, per_head
    assert report["layers.0"]["calls"] == 3 and report["layers.0"]["threshold"] == [-4.0, -math.inf]

    # set_threshold: in place on the existing buffer (compiled graphs keep seeing it).
    buffer = model.layers[0].threshold_per_head
    liteattn_ops.set_threshold(model, -2.0)
    assert model.layers[0].threshold_per_head is buffer and buffer.tolist() == [-2.0, -2.0]
    liteattn_ops.set_threshold(model, {"layers.1": [-1.0, -3.0]})
    assert model.layers[1].threshold_per_head.tolist() == [-1.0, -3.0]

    liteattn_ops.reset(model)
    assert all(site["live_fraction"] == 1.0 and site["calls"] == 0 for site in liteattn_ops.stats(model).values())


@torch.no_grad()
def test_must_do_ranges_on_the_module():
    q, k, v = _inputs()
    attn = LiteAttention(threshold=-2.0, must_do=[(0, 1)])
    for _ in range(3):
        attn(q, k, v)
    assert bool(attn.live_mask()[..., 0].all())
    attn.set_ranges(must_skip=[(0, 128)])
    attn(q, k, v)
    assert not bool(attn.live_mask()[..., 0].any())


def test_bad_configuration():
    with pytest.raises(ValueError, match="threshold must be <= 0"):
        LiteAttention(threshold=1.0)
    with pytest.raises(ValueError, match="threshold must be <= 0"):
        LiteAttention(threshold=[-1.0, float("nan")])
    with pytest.raises(ValueError, match="must_do ranges must satisfy"):
        LiteAttention(must_do=[(10, 5)])
    with pytest.raises(ValueError, match="must_skip must be a list"):
        LiteAttention(must_skip=[(1, 2, 3)])
    attn = LiteAttention(threshold=[-1.0, -2.0, -3.0])
    with torch.no_grad(), pytest.raises(ValueError, match="3 values but the attention has 2 heads"):
        attn(*_inputs())
    with pytest.raises(ValueError, match="no LiteAttention sites"):
        liteattn_ops.reset(torch.nn.Linear(2, 2))
    model = TwoLayer()
    with pytest.raises(ValueError, match="unknown attention sites"):
        liteattn_ops.set_threshold(model, {"layers.7": -1.0})


def test_grad_mode_is_refused_clearly():
    q, k, v = _inputs()
    q.requires_grad_(True)
    with pytest.raises(RuntimeError, match="inference-only"):
        LiteAttention()(q, k, v)
