"""liteattn_ops.enable / disable / branch / report in eager mode (no torch.compile)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import liteattn_ops
from liteattn_ops.compile import graph_pass
from liteattn_ops.core import eligibility
from liteattn_ops.routing.router import AttentionSite, find_attention_modules, routed_sites


class Attention(nn.Module):
    def __init__(self, dim=128, heads=2, calls=1):
        super().__init__()
        self.heads, self.calls = heads, calls
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)

    def forward(self, x):
        b, s, c = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        for _ in range(self.calls - 1):
            y = y + F.scaled_dot_product_attention(q * 0.5, k, v)
        return y.transpose(1, 2).reshape(b, s, c)


class Net(nn.Module):
    def __init__(self, calls=1):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([Attention(calls=calls) for _ in range(2)])
        self.head = nn.Linear(128, 128)

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return self.head(x)


def inputs(seq=256, batch=1):
    torch.manual_seed(1)
    return torch.randn(batch, seq, 128) * 2


def test_sites_are_found_without_inputs_and_selectable():
    net = Net()
    assert [name for name, _ in find_attention_modules(net)] == ["layers.0", "layers.1"]
    assert [name for name, _ in find_attention_modules(net, sites=["layers.1"])] == ["layers.1"]
    assert [name for name, _ in find_attention_modules(net, sites=[Attention])] == ["layers.0", "layers.1"]
    assert [name for name, _ in find_attention_modules(net, sites=lambda n, m: n.endswith("0"))] == ["layers.0"]
    keys = set(net.state_dict())
    assert liteattn_ops.enable(net) == ["layers.0", "layers.1"]
    assert set(net.state_dict()) == keys                     # states are non-persistent buffers
    assert isinstance(net.layers[0].liteattn, AttentionSite)
    assert [name for name, _ in liteattn_ops.attention_sites(net)] == ["layers.0.liteattn", "layers.1.liteattn"]


def test_enable_matches_liteattention_and_disable_restores_sdpa():
    net = Net()
    x = inputs()
    with torch.no_grad():
        plain = net(x)
        liteattn_ops.enable(net, threshold=float("-inf"))
        torch.testing.assert_close(net(x), plain, rtol=1e-5, atol=1e-5)

        # The routed call is exactly LiteAttention on the same q, k, v.
        liteattn_ops.set_threshold(net, -2.0)
        liteattn_ops.reset(net)
        layer = net.layers[0]
        b, s, c = x.shape
        q, k, v = layer.qkv(x).view(b, s, 3, 2, 64).permute(2, 0, 3, 1, 4)
        manual = liteattn_ops.LiteAttention(threshold=-2.0)
        expected = manual(q, k, v).transpose(1, 2).reshape(b, s, c)
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
        assert torch.equal(layer.liteattn.live_mask(), manual.live_mask())
        assert layer.liteattn.calls == 1

        assert liteattn_ops.disable(net) == ["layers.0", "layers.1"]
        assert not hasattr(net.layers[0], "liteattn") and "forward" not in net.layers[0].__dict__
        torch.testing.assert_close(net(x), plain)


def test_enable_twice_updates_the_sites():
    net = Net()
    liteattn_ops.enable(net, threshold=-3.0)
    site = net.layers[0].liteattn
    with torch.no_grad():
        net(inputs())
    liteattn_ops.enable(net, threshold=-5.0, cross="dense")
    assert net.layers[0].liteattn is site and site.threshold == [-5.0] and site.cross == "dense"
    assert site.threshold_per_head.tolist() == [-5.0, -5.0]


def test_two_calls_in_one_forward_get_two_slots():
    net = Net(calls=2)
    liteattn_ops.enable(net, threshold=-1.0)
    with torch.no_grad():
        net(inputs())
    site = net.layers[0].liteattn
    assert sorted(site.states()) == ["state_0_default_1x2x256x256x64_float32", "state_1_default_1x2x256x256x64_float32"]
    assert sorted(liteattn_ops.report(net)["layers.0"]["calls"]) == [0, 1]


def test_reset_stats_branch_and_resolutions():
    net = Net()
    liteattn_ops.enable(net, threshold=-1.0)
    with torch.no_grad():
        net(inputs(256))
        with liteattn_ops.branch(net, "uncond"):
            net(inputs(256))
        net(inputs(384))
    site = net.layers[1].liteattn
    assert sorted(site.states()) == ["state_0_default_1x2x256x256x64_float32", "state_0_default_1x2x384x384x64_float32",
                                     "state_0_uncond_1x2x256x256x64_float32"]
    assert site.branch == "default"
    stats = liteattn_ops.stats(net)["layers.1.liteattn"]
    assert stats["calls"] == 3 and stats["live_fraction"] is not None   # the most recent state (384 tokens)
    liteattn_ops.reset(net)
    assert all(bool((t == -1).all()) for t in site.states().values())
    with pytest.raises(ValueError, match="identifier"):
        with liteattn_ops.branch(net, "not a name"):
            pass


def test_report_and_reasons_in_eager():
    class Mixed(nn.Module):
        def forward(self, q, k, v):
            a = F.scaled_dot_product_attention(q, k, v)                       # slot 0: self
            b = F.scaled_dot_product_attention(q, k[:, :, :64], v[:, :, :64])  # slot 1: cross
            c = F.scaled_dot_product_attention(q, k, v, is_causal=True)       # slot 2: causal
            d = F.scaled_dot_product_attention(q.double(), k.double(), v.double())  # slot 3: dtype
            return a + b + c + d.float()

    model = Mixed()
    assert liteattn_ops.enable(model) == [""]
    q, k, v = torch.randn(3, 1, 2, 256, 64).unbind(0)
    with torch.no_grad():
        model(q, k, v)
    calls = liteattn_ops.report(model)[""]["calls"]
    assert calls[0]["op"] == "liteattn.sparse_attention"
    assert calls[1]["left"] == graph_pass.CROSS
    assert calls[2]["left"] == "causal"
    assert calls[3]["left"] == "dtype torch.float64 unsupported on CPU"
    assert calls[1]["shapes"] == [((1, 2, 256, 64), (1, 2, 64, 64))]
    assert "<root>[2]: left: causal" in liteattn_ops.format_report(model)


def test_sdpa_outside_routed_modules_is_untouched():
    original = F.scaled_dot_product_attention
    net = Net()
    liteattn_ops.enable(net)
    assert F.scaled_dot_product_attention is original is torch._C._nn.scaled_dot_product_attention
    q, k, v = torch.randn(3, 1, 2, 256, 64).unbind(0)
    with torch.no_grad():
        net(inputs())                                   # routed calls inside ...
        out = F.scaled_dot_product_attention(q, k, v)   # ... none outside
    assert net.layers[0].liteattn.calls == 1
    torch.testing.assert_close(out, torch._C._nn.scaled_dot_product_attention(q, k, v), rtol=0, atol=0)
    liteattn_ops.disable(net)
    assert F.scaled_dot_product_attention is original


def test_instance_forward_override_is_kept():
    net = Net()
    layer = net.layers[0]
    original = layer.forward
    layer.forward = lambda x: original(x) * 2        # e.g. an accelerate-style hook
    x = inputs()
    with torch.no_grad():
        before = net(x)
        liteattn_ops.enable(net, threshold=float("-inf"))
        torch.testing.assert_close(net(x), before, rtol=1e-5, atol=1e-5)
        assert layer.liteattn.calls == 1
        liteattn_ops.disable(net)
        torch.testing.assert_close(net(x), before)
    assert layer.forward is not original and "forward" in layer.__dict__


def test_grad_mode_eager_warns_once_and_backpropagates():
    net = Net()
    liteattn_ops.enable(net)
    x = inputs()
    eligibility._WARNED.discard("grad")
    with pytest.warns(UserWarning, match="inference-only"):
        out = net(x)
    out.sum().backward()
    assert net.layers[0].qkv.weight.grad is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        net(x)
    assert liteattn_ops.report(net)["layers.0"]["calls"][0]["left"] == graph_pass.GRAD
    assert net.layers[0].liteattn.states() == {}


def test_model_to_dtype_keeps_thresholds_float32():
    net = Net()
    liteattn_ops.enable(net, threshold=-2.0)
    with torch.no_grad():
        net(inputs())
        net.to(torch.bfloat16)          # casts the float32 threshold buffers too
        net(inputs().bfloat16())
    site = net.layers[0].liteattn
    assert site.threshold_per_head.dtype == torch.float32
    assert "state_0_default_1x2x256x256x64_bfloat16" in site.states()


def test_threads_route_to_their_own_models():
    import threading

    nets = [Net(), Net()]
    refs = [Net(), Net()]
    for net in nets + refs:
        liteattn_ops.enable(net, threshold=-1.0)
    xs = [inputs(256), inputs(256) * 3]
    with torch.no_grad():
        expected = [ref(x) for ref, x in zip(refs, xs) for _ in range(3)][2::3]
    results = [None, None]

    def work(i):
        with torch.no_grad():
            for _ in range(3):
                results[i] = nets[i](xs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        torch.testing.assert_close(results[i], expected[i], rtol=0, atol=0)
        for (_, a), (_, b) in zip(routed_sites(nets[i]), routed_sites(refs[i])):
            assert a.states().keys() == b.states().keys()
            assert all(torch.equal(a.states()[k], b.states()[k]) for k in a.states())
