"""The routing layer and the state store: scoped interception, pickling, inference mode, head
counts, threshold validation, dtype casts, device call counters, scale, FA layout, the legacy
diffusers Attention class, the enable-at-first-call path and its failure modes, error messages."""

from __future__ import annotations

import copy
import io
import math
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import liteattn_ops
from liteattn_ops.compile import enable_on_call
from liteattn_ops.core import eligibility
from liteattn_ops.routing.router import routed_sites
from liteattn_ops.testing import local_qkv


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def quick():
    return liteattn_ops.backend(inductor=False)


class Attention(nn.Module):
    """x -> SDPA over `heads` heads; `scale` reaches SDPA as scale=."""

    def __init__(self, dim=128, heads=2, scale=None):
        super().__init__()
        self.heads, self.scale = heads, scale
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        with torch.no_grad():
            self.qkv.weight[dim:2 * dim] = self.qkv.weight[:dim]     # local attention: tiles drop
            self.qkv.weight[:2 * dim] *= 2.0

    def forward(self, x):
        b, s, c = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return y.transpose(1, 2).reshape(b, s, c)


class TwoHeadCounts(nn.Module):
    """One forward, two SDPA calls with different head counts (2 heads of 64, 1 head of 128)."""

    def __init__(self, dim=128):
        super().__init__()
        torch.manual_seed(0)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)

    def forward(self, x):
        b, s, c = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, c).unbind(2)
        two = F.scaled_dot_product_attention(*(t.view(b, s, 2, 64).transpose(1, 2) for t in (q, k, v)))
        one = F.scaled_dot_product_attention(*(t.view(b, s, 1, 128).transpose(1, 2) for t in (q, k, v)))
        return two.transpose(1, 2).reshape(b, s, c) + one.transpose(1, 2).reshape(b, s, c)


def net(seed=0, depth=2, **kwargs):
    torch.manual_seed(seed)
    return nn.Sequential(*[Attention(**kwargs) for _ in range(depth)]).eval()


def x_in(seq=512, seed=1):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(seq // 128, 128, generator=g).repeat_interleave(128, 0)
    return (torch.randn(1, seq, 128, generator=g) * 0.5 + centers)


def states(model):
    model = getattr(model, "_orig_mod", model)
    return {f"{n}.{k}": t.clone() for n, s in routed_sites(model) for k, t in s.states().items()}


def assert_same_states(a, b):
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------------------------------------
# Scoped interception
# ------------------------------------------------------------------------------------------------

def test_sdpa_is_never_replaced_and_routing_is_scoped():
    original = F.scaled_dot_product_attention
    model = net()
    liteattn_ops.enable(model, threshold=-4.0)
    seen = []

    class Probe(nn.Module):                       # SDPA called from a non-routed module
        def forward(self, q):
            seen.append(F.scaled_dot_product_attention is original)
            return F.scaled_dot_product_attention(q, q, q)

    q = torch.randn(1, 2, 256, 64)
    with torch.no_grad():
        model(x_in())
        out = Probe()(q)
    assert seen == [True] and F.scaled_dot_product_attention is original
    assert torch.equal(out, torch._C._nn.scaled_dot_product_attention(q, q, q))
    assert model[0].liteattn.calls == 1
    liteattn_ops.disable(model)
    assert F.scaled_dot_product_attention is original


def test_routing_traces_fullgraph_without_recompile():
    model, ref = net(), net()
    for m in (model, ref):
        liteattn_ops.enable(m, threshold=-4.0)
    cnt = CompileCounterWithBackend(quick())
    compiled = torch.compile(model, backend=cnt, fullgraph=True)
    with torch.no_grad():
        for step in range(3):
            x = x_in(seed=step)
            torch.testing.assert_close(compiled(x), ref(x), rtol=0, atol=1e-5)
    assert cnt.frame_count == 1
    assert_same_states(states(model), states(ref))
    assert min(s["live_fraction"] for s in liteattn_ops.stats(model).values()) < 1.0


def test_a_routed_call_keeps_its_scale():
    """scale= must reach the op: with threshold -inf the routed model equals SDPA at that scale
    (and not SDPA at the default scale), eager and compiled."""
    model, plain = net(scale=0.3), net(scale=0.3)
    liteattn_ops.enable(model, threshold=float("-inf"))
    x = x_in()
    with torch.no_grad():
        expected = plain(x)
        default_scale = nn.Sequential(*[copy.deepcopy(m) for m in plain])
        for m in default_scale:
            m.scale = None
        assert (default_scale(x) - expected).abs().max() > 1e-2      # the scale matters here
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        compiled = torch.compile(model, backend=quick(), fullgraph=True)
        torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Pickle, deepcopy, torch.save (issue 14.2)
# ------------------------------------------------------------------------------------------------

def _roundtrips(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    yield "torch.save", torch.load(buffer, weights_only=False)
    yield "pickle", pickle.loads(pickle.dumps(model))
    yield "deepcopy", copy.deepcopy(model)


def test_enabled_model_survives_save_pickle_and_deepcopy():
    model = net()
    liteattn_ops.enable(model, threshold=-4.0)
    with torch.no_grad():
        model(x_in(seed=0))
        for how, clone in _roundtrips(model):
            assert_same_states(states(clone), states(model))
            assert clone[0].forward.__self__ is clone[0].liteattn, how     # routed to its own site
            out = clone(x_in(seed=1))
            torch.testing.assert_close(out, copy.deepcopy(model)(x_in(seed=1)), rtol=0, atol=0)
            assert clone[0].liteattn.calls == 2, how
            assert liteattn_ops.disable(clone) == ["0", "1"]
        assert model[0].liteattn.calls == 1          # the copies never touched the original


# ------------------------------------------------------------------------------------------------
# Inference mode (14.1), head counts (14.3), thresholds (14.4, 14.6), calls (14.7)
# ------------------------------------------------------------------------------------------------

def test_states_made_under_inference_mode_work_outside_it():
    q, k, v = local_qkv((4, 8, 8), 1, 2, 64)
    attn = liteattn_ops.LiteAttention(threshold=-4.0)
    model = net()
    liteattn_ops.enable(model, threshold=-4.0)
    with torch.inference_mode():
        attn(q, k, v)
        model(x_in())
    attn.reset()
    liteattn_ops.reset(model)
    attn.threshold = -3.0
    liteattn_ops.set_threshold(model, -3.0)
    with torch.no_grad():
        attn(q, k, v)
        model(x_in())
    assert attn.calls == 1 and model[0].liteattn.calls == 1
    assert not any(t.is_inference() for t in attn.buffers())
    with torch.inference_mode():             # and back inside
        attn(q, k, v)
        attn.reset()
    # buffers that did become inference tensors (as model.to(device) under inference mode makes
    # them) are replaced by normal copies when written outside it
    site = model[0].liteattn
    with torch.inference_mode():
        for name in list(site._buffers):
            if site._buffers[name] is not None:
                site._buffers[name] = site._buffers[name].clone()
    assert site.threshold_per_head.is_inference()
    liteattn_ops.set_threshold(model, -2.0)
    liteattn_ops.reset(model)
    assert site.threshold_per_head.tolist() == [-2.0, -2.0] and site.calls == 0
    with torch.no_grad():
        model(x_in())
    assert site.calls == 1


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_two_sdpa_calls_with_different_head_counts(compiled):
    model, ref = TwoHeadCounts(), TwoHeadCounts()
    liteattn_ops.enable(model, threshold=float("-inf"))
    run = torch.compile(model, backend=quick(), fullgraph=True) if compiled else model
    x = x_in()
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(run(x), ref(x), rtol=1e-5, atol=1e-5)
    site = model.liteattn
    assert sorted(site.states()) == ["state_0_default_1x2x512x512x64_float32", "state_1_default_1x1x512x512x128_float32"]
    assert site.threshold_per_head.shape == (2,) and site.threshold_per_head_1.shape == (1,)
    liteattn_ops.set_threshold(model, -3.0)
    assert site.threshold_per_head_1.tolist() == [-3.0]
    with pytest.raises(ValueError, match="3 values but the attention has 2 heads"):
        liteattn_ops.set_threshold(model, [-1.0, -2.0, -3.0])


def test_failed_threshold_assignment_changes_nothing():
    q, k, v = local_qkv((4, 8, 8), 1, 2, 64)
    attn = liteattn_ops.LiteAttention(threshold=-4.0)
    with torch.no_grad():
        attn(q, k, v)
    with pytest.raises(ValueError, match="3 values but the attention has 2 heads"):
        attn.threshold = [-1.0, -2.0, -3.0]
    assert attn.threshold == [-4.0] and attn.threshold_per_head.tolist() == [-4.0, -4.0]

    model = nn.ModuleDict({"a": liteattn_ops.LiteAttention(-4.0), "b": liteattn_ops.LiteAttention(-4.0)})
    with pytest.raises(ValueError, match="site 'b'.*threshold must be <= 0"):
        liteattn_ops.set_threshold(model, {"a": -3.0, "b": 2.0})
    assert model["a"].threshold == [-4.0]          # validated everything first: a unchanged
    with torch.no_grad():
        model["a"](q, k, v)
    with pytest.raises(ValueError, match="site 'a'.*2 heads"):
        liteattn_ops.set_threshold(model, [-1.0, -2.0, -3.0])    # b has no heads yet, a has 2
    assert model["b"].threshold == [-4.0] and model["a"].threshold_per_head.tolist() == [-4.0, -4.0]


def test_half_keeps_thresholds_float32():
    q, k, v = local_qkv((4, 8, 8), 1, 2, 64)
    attn = liteattn_ops.LiteAttention(threshold=-4.0)
    with torch.no_grad():
        first = attn(q, k, v)
        attn.half()
        assert attn.threshold_per_head.dtype == torch.float32
        attn.reset()
        torch.testing.assert_close(attn(q, k, v), first, rtol=0, atol=0)   # float32 inputs still work
        attn.to(torch.bfloat16)
        assert attn.threshold_per_head.dtype == torch.float32


def test_calls_are_counted_on_the_device_when_compiled():
    model = net()
    liteattn_ops.enable(model, threshold=-4.0)
    compiled = torch.compile(model, backend=quick(), fullgraph=True)
    with torch.no_grad():
        for _ in range(3):
            compiled(x_in())
    assert [s["calls"] for s in liteattn_ops.stats(compiled).values()] == [3, 3]
    liteattn_ops.reset(compiled)
    assert [s["calls"] for s in liteattn_ops.stats(compiled).values()] == [0, 0]


def test_model_to_moves_states_and_thresholds():
    model = net()
    liteattn_ops.enable(model, threshold=-4.0)
    with torch.no_grad():
        model(x_in())
    model.to("meta")
    site = model[0].liteattn
    assert {t.device.type for t in site.buffers()} == {"meta"}
    assert site.threshold_per_head.dtype == torch.float32


def test_one_recompile_per_new_shape():
    model = net()
    liteattn_ops.enable(model, threshold=-4.0)
    cnt = CompileCounterWithBackend(quick())
    compiled = torch.compile(model, backend=cnt, fullgraph=True, dynamic=False)
    with torch.no_grad():
        for seq in (512, 512, 256, 512, 256, 256):
            compiled(x_in(seq))
    assert cnt.frame_count == 2
    assert sorted(model[0].liteattn.states()) == ["state_0_default_1x2x256x256x64_float32",
                                                  "state_0_default_1x2x512x512x64_float32"]


# ------------------------------------------------------------------------------------------------
# FlashAttention layout (issue 9.6)
# ------------------------------------------------------------------------------------------------

def test_flash_layout_equals_sdpa_layout():
    q, k, v = local_qkv((4, 8, 16), 1, 2, 64)                 # (B, H, S, D), 512 tokens
    fq, fk, fv = (t.transpose(1, 2).contiguous() for t in (q, k, v))   # (B, S, H, D)
    flash = liteattn_ops.FlashLiteAttention(threshold=-4.0)
    sdpa = liteattn_ops.LiteAttention(threshold=-4.0, must_do=[(0, 100), (400, 450)])
    with torch.no_grad():
        for step in range(3):
            out, lse = flash(fq, fk, fv, 0.25, must_do_list=[400, 450, 0, 100], return_lse=True)
            ref, ref_lse = sdpa(q, k, v, 0.25, return_lse=True)
            assert out.shape == fq.shape and out.is_contiguous()
            assert torch.equal(out, ref.transpose(1, 2)) and torch.equal(lse, ref_lse)
            assert torch.equal(flash.live_mask(), sdpa.live_mask())
    assert flash.live_fraction() < 1.0
    assert bool(flash.live_mask()[..., 0].all())                # must-do tile kept
    with torch.no_grad():
        flash(fq, fk, fv, must_skip_list=[(0, 128)])
    assert not bool(flash.live_mask()[..., 0].any())
    with pytest.raises(ValueError, match="even number of bounds"):
        flash(fq, fk, fv, must_do_list=[0, 10, 20])
    with pytest.raises(ValueError, match=r"must_do_list ranges must satisfy 0 <= start < end"):
        flash(fq, fk, fv, must_do_list=[10, 0])
    with pytest.raises(ValueError, match="4-D tensor"):
        flash(fq[0], fk, fv)


# ------------------------------------------------------------------------------------------------
# Every diffusers attention class traces (issue 9.7): the legacy Attention of CogVideoX
# ------------------------------------------------------------------------------------------------

def test_cogvideox_legacy_attention_traces_fullgraph():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    plain = diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=1, sample_width=16, sample_height=16, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=16).eval()
    from diffusers.models.attention_processor import Attention as LegacyAttention

    assert type(plain.transformer_blocks[0].attn1) is LegacyAttention
    model, ref = copy.deepcopy(plain), copy.deepcopy(plain)
    for m in (model, ref):
        assert liteattn_ops.enable(m, threshold=-2.0) == ["transformer_blocks.0.attn1"]
    cnt = CompileCounterWithBackend(quick())
    compiled = torch.compile(model, backend=cnt, fullgraph=True)
    with torch.no_grad():
        for step in range(2):
            g = torch.Generator().manual_seed(step)
            args = (torch.randn(1, 3, 4, 16, 16, generator=g), torch.randn(1, 16, 16, generator=g),
                    torch.tensor([500 - 100 * step]))
            torch.testing.assert_close(compiled(*args, return_dict=False)[0], ref(*args, return_dict=False)[0],
                                       rtol=0, atol=1e-5)
    assert cnt.frame_count == 1
    assert_same_states(states(model), states(ref))
    report = liteattn_ops.report(model)["transformer_blocks.0.attn1"]
    assert report["calls"][0]["op"] == "liteattn.sparse_attention"      # joint text + video: S_q == S_k


# ------------------------------------------------------------------------------------------------
# Errors (issue 9.8)
# ------------------------------------------------------------------------------------------------

def test_reset_and_stats_on_a_compiled_model_before_its_first_call_explain():
    model = net()
    compiled = torch.compile(model, backend="liteattn")
    for fn in (liteattn_ops.reset, liteattn_ops.stats):
        with pytest.raises(ValueError, match="compiled but has no LiteAttention sites yet.*first compiled call"):
            fn(compiled)
    regional = net()
    for block in regional:
        block.compile(backend="liteattn")
    with pytest.raises(ValueError, match="compiled but has no LiteAttention sites yet"):
        liteattn_ops.reset(regional)
    with pytest.raises(ValueError, match="no LiteAttention sites: use LiteAttention modules"):
        liteattn_ops.reset(net())
    with pytest.raises(TypeError, match="torch.nn.Module or a diffusers pipeline"):
        liteattn_ops.stats("model")


# ------------------------------------------------------------------------------------------------
# fallback="enable" (compile/enable_on_call.py): the path and each way it can fail
# ------------------------------------------------------------------------------------------------

def test_enable_on_call_enables_at_the_first_call_and_compiles_twice():
    model, ref = net(), net()
    cnt = CompileCounterWithBackend(liteattn_ops.backend(threshold=-4.0, inductor=False))
    compiled = torch.compile(model, backend=cnt, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x_in(seed=0)), ref(x_in(seed=0)), rtol=0, atol=1e-5)   # dense
        liteattn_ops.enable(ref, threshold=-4.0)
        for step in range(1, 3):
            torch.testing.assert_close(compiled(x_in(seed=step)), ref(x_in(seed=step)), rtol=0, atol=1e-5)
    assert_same_states(states(model), states(ref))
    assert cnt.frame_count == 2


def test_enable_on_call_without_parameters_warns_and_stays_sdpa():
    class NoParams(nn.Module):
        def forward(self, q):
            return F.scaled_dot_product_attention(q, q, q)

    eligibility._WARNED.clear()
    q = torch.randn(1, 2, 256, 64)
    with torch.no_grad(), pytest.warns(UserWarning, match=enable_on_call.NO_PROBE):
        out = torch.compile(NoParams(), backend=liteattn_ops.backend(inductor=False), fullgraph=True)(q)
    assert torch.equal(out, torch._C._nn.scaled_dot_product_attention(q, q, q))


def test_enable_on_call_unknown_source_and_module_not_found():
    class Odd:                                  # a Source kind with neither member, index nor base
        name = "L['self']._parameters['weight']"

    assert enable_on_call._steps(Odd()) is None
    model = net()
    gm_inputs = [p for p in model.parameters()]
    probe = ("self", [("item", 0), ("attr", "qkv"), ("attr", "weight")], 0)
    assert enable_on_call.calling_module(probe, gm_inputs, None) is None        # no frame
    self = model                                                                  # noqa: F841 (found via frames)
    import sys

    assert enable_on_call.calling_module(probe, gm_inputs, sys._getframe()) is model
    assert enable_on_call.calling_module(probe, [torch.zeros(1)], sys._getframe()) is None   # another tensor
    eligibility._WARNED.clear()
    runner = enable_on_call.EnableOnCall(lambda *a: "ran", torch.fx.symbolic_trace(nn.Linear(2, 2)), -4.0, "sdpa")
    runner.probe, runner.failure = probe, None
    with pytest.warns(UserWarning, match=enable_on_call.NOT_FOUND):
        assert runner(torch.zeros(1)) == "ran"
