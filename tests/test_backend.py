"""The `liteattn` torch.compile backend with model-owned skip states (liteattn_ops.enable).

Most tests compile with `liteattn_ops.backend(inductor=False)` (Dynamo + the liteattn pass, the
graph then runs without Inductor) to stay quick on a 2-core CPU; the tests that are about the
generated code use Inductor.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from expecttest import TestCase
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import liteattn_ops
from liteattn_ops.compile import graph_pass
from liteattn_ops.core import eligibility
from liteattn_ops.routing.router import routed_sites

DIM, HEADS, SEQ, CTX = 128, 2, 512, 8     # head_dim 64, 4 query/key tiles of 128


# ------------------------------------------------------------------------------------------------
# A plain PyTorch DiT (self-attention, cross-attention, MLP)
# ------------------------------------------------------------------------------------------------

class SelfAttention(nn.Module):
    def __init__(self, dim=DIM, heads=HEADS, **sdpa_kwargs):
        super().__init__()
        self.heads, self.sdpa_kwargs = heads, sdpa_kwargs
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        b, s, c = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, **self.sdpa_kwargs)
        return self.proj(y.transpose(1, 2).reshape(b, s, c))


class CrossAttention(nn.Module):
    def __init__(self, dim=DIM, heads=HEADS):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x, ctx):
        b, s, c = x.shape
        q = self.q(x).view(b, s, self.heads, -1).transpose(1, 2)
        k, v = self.kv(ctx).view(b, ctx.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, s, c))


class Block(nn.Module):
    def __init__(self, dim=DIM, heads=HEADS):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), SelfAttention(dim, heads)
        self.norm2, self.cross = nn.LayerNorm(dim), CrossAttention(dim, heads)
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, ctx):
        x = x + self.attn(self.norm1(x))
        x = x + self.cross(self.norm2(x), ctx)
        return x + self.mlp(self.norm3(x))


class TinyDiT(nn.Module):
    def __init__(self, depth=2, dim=DIM, heads=HEADS):
        super().__init__()
        self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(depth)])

    def forward(self, x, ctx):
        for block in self.blocks:
            x = block(x, ctx)
        return x


def tiny_dit(seed=0, depth=2) -> TinyDiT:
    """Random weights with W_k = W_q (scaled), so tokens of one cluster attend to each other and
    a threshold of -4 drops some tiles (live fraction between 0.25 and 1)."""
    torch.manual_seed(seed)
    model = TinyDiT(depth).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, SelfAttention):
                module.qkv.weight[DIM:2 * DIM] = module.qkv.weight[:DIM]
                module.qkv.weight[:2 * DIM] *= 1.5
    return model


def enabled_pair(threshold=-4.0, depth=2, **enable_options):
    """A TinyDiT and an identical eager reference, both routed with the same enable() options."""
    model, ref = tiny_dit(depth=depth), tiny_dit(depth=depth)
    for m in (model, ref):
        liteattn_ops.enable(m, threshold=threshold, **enable_options)
    return model, ref


def tiny_inputs(step=0, batch=1, seq=SEQ, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(seq // 128, DIM, generator=g).repeat_interleave(128, 0)
    x = torch.randn(batch, seq, DIM, generator=g) * 0.5 + centers
    x = x + 0.05 * step * torch.randn(batch, seq, DIM, generator=g)
    return x, torch.randn(batch, CTX, DIM, generator=g)


def states_of(model):
    model = getattr(model, "_orig_mod", model)   # torch.compile's wrapper
    return {f"{name}.{key}": t.clone() for name, site in routed_sites(model) for key, t in site.states().items()}


def assert_same_states(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def quick():
    """Dynamo + the liteattn pass; the graph runs without Inductor (fast tests)."""
    return liteattn_ops.backend(inductor=False)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------
# The rewritten graph, readable
# ------------------------------------------------------------------------------------------------

class GraphSnapshot(TestCase):
    # expecttest.TestCase, not torch._dynamo.test_case.TestCase: the latter wraps
    # assertExpectedInline, which then needs skip=1 to find the literal to update.
    def setUp(self):
        torch._dynamo.reset()

    def test_block_graph(self):
        block = tiny_dit(depth=1).blocks[0]
        liteattn_ops.enable(block, threshold=-4.0)
        graphs = []

        def capture(gm, example_inputs):
            graph_pass.run_pass(gm)
            graphs.append(gm)
            return gm.forward

        x, ctx = tiny_inputs()
        with torch.no_grad():
            torch.compile(block, backend=capture, fullgraph=True)(x, ctx)
        (gm,) = graphs
        self.assertExpectedInline(_attention_lines(gm), """\
layer_norm = torch.nn.functional.layer_norm(l_x_, (128,), l_self_modules_norm1_parameters_weight_, l_self_modules_norm1_parameters_bias_, 1e-05)
linear = torch._C._nn.linear(layer_norm, l_self_modules_attn_modules_qkv_parameters_weight_, None)
view = linear.view(1, 512, 3, 2, 64)
permute = view.permute(2, 0, 3, 1, 4)
q = permute[0]
k = permute[1]
v = permute[2]
sparse_attention = torch.ops.liteattn.sparse_attention(q, k, v, l_self_modules_attn_forward_self_buffers_state_0_default_1x2x512x512x64_float32_, l_self_modules_attn_forward_self_buffers_threshold_per_head_, None, None, None)
out = sparse_attention[0]
add_ = l_self_modules_attn_forward_self_buffers_state_0_default_1x2x512x512x64_float32_calls_.add_(1)
transpose = out.transpose(1, 2)
reshape = transpose.reshape(1, 512, 128)
linear_1 = torch._C._nn.linear(reshape, l_self_modules_attn_modules_proj_parameters_weight_, None)
x = l_x_ + linear_1
layer_norm_1 = torch.nn.functional.layer_norm(x, (128,), l_self_modules_norm2_parameters_weight_, l_self_modules_norm2_parameters_bias_, 1e-05)
linear_2 = torch._C._nn.linear(layer_norm_1, l_self_modules_cross_modules_q_parameters_weight_, None)
view_1 = linear_2.view(1, 512, 2, -1)
q_1 = view_1.transpose(1, 2)
linear_3 = torch._C._nn.linear(l_ctx_, l_self_modules_cross_modules_kv_parameters_weight_, None)
view_2 = linear_3.view(1, 8, 2, 2, -1)
permute_1 = view_2.permute(2, 0, 3, 1, 4)
k_1 = permute_1[0]
v_1 = permute_1[1]
y = torch._C._nn.scaled_dot_product_attention(q_1, k_1, v_1)
transpose_2 = y.transpose(1, 2)
reshape_1 = transpose_2.reshape(1, 512, 128)
linear_4 = torch._C._nn.linear(reshape_1, l_self_modules_cross_modules_proj_parameters_weight_, None)
x_1 = x + linear_4
layer_norm_2 = torch.nn.functional.layer_norm(x_1, (128,), l_self_modules_norm3_parameters_weight_, l_self_modules_norm3_parameters_bias_, 1e-05)
input_1 = torch._C._nn.linear(layer_norm_2, l_self_modules_mlp_modules_0_parameters_weight_, l_self_modules_mlp_modules_0_parameters_bias_)
input_2 = torch._C._nn.gelu(input_1, approximate = 'none')
input_3 = torch._C._nn.linear(input_2, l_self_modules_mlp_modules_2_parameters_weight_, l_self_modules_mlp_modules_2_parameters_bias_)
add_2 = x_1 + input_3
return (add_2,)""")


def _attention_lines(gm) -> str:
    """The graph's body without the placeholder aliases and the `x = None` frees."""
    keep = []
    for line in gm.code.splitlines()[1:]:
        code = line.strip().split(";")[0]
        if code and not code.startswith("def ") and not (code.startswith("l_") and "= L_" in code):
            keep.append(code)
    return "\n".join(k for k in keep if k)


# ------------------------------------------------------------------------------------------------
# Parity: compiled == eager, step after step, outputs and states
# ------------------------------------------------------------------------------------------------

def run_steps(model, steps=3, **inputs):
    outs = []
    with torch.no_grad():
        for step in range(steps):
            outs.append(model(*tiny_inputs(step, **inputs)))
    return outs


def test_compiled_equals_eager_step_for_step():
    compiled, eager = enabled_pair(threshold=-4.0)
    cnt = CompileCounterWithBackend(quick())
    cmodel = torch.compile(compiled, backend=cnt, fullgraph=True)
    with torch.no_grad():
        for step in range(3):
            x, ctx = tiny_inputs(step)
            torch.testing.assert_close(cmodel(x, ctx), eager(x, ctx), rtol=0, atol=1e-5)
            assert_same_states(states_of(cmodel), states_of(eager))
    assert cnt.frame_count == 1
    fractions = [s["live_fraction"] for s in liteattn_ops.stats(eager).values() if s["live_fraction"] is not None]
    assert fractions and all(0.25 <= f < 1 for f in fractions)          # tiles were really skipped
    assert counters["liteattn"]["rewritten"] == 2 and counters["liteattn"][f"left: {graph_pass.CROSS}"] == 2


def test_threshold_minus_inf_equals_sdpa():
    plain, compiled = tiny_dit(), tiny_dit()
    liteattn_ops.enable(compiled, threshold=float("-inf"))
    cmodel = torch.compile(compiled, backend=quick(), fullgraph=True)
    with torch.no_grad():
        for step in range(2):
            x, ctx = tiny_inputs(step)
            torch.testing.assert_close(cmodel(x, ctx), plain(x, ctx), rtol=1e-5, atol=1e-5)
    assert all(bool((t == -1).all()) for t in states_of(compiled).values())


# ------------------------------------------------------------------------------------------------
# Ownership: per instance, per block, per resolution, per branch
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("together", [True, False], ids=["one-root", "separately"])
def test_two_instances_have_their_own_states(together):
    a, b = tiny_dit(seed=0), tiny_dit(seed=1)
    a_ref, b_ref = copy.deepcopy(a), copy.deepcopy(b)
    for m in (a_ref, b_ref):
        liteattn_ops.enable(m, threshold=-4.0)
    if together:       # one root (as enable(pipe) does for a pipeline's two experts): shared roles
        liteattn_ops.enable(nn.ModuleList([a, b]), threshold=-4.0)
    else:              # separate roots: tracing one never allocates in the other
        liteattn_ops.enable(a, threshold=-4.0)
        liteattn_ops.enable(b, threshold=-4.0)
    cnt = CompileCounterWithBackend(quick())
    ca, cb = torch.compile(a, backend=cnt, fullgraph=True), torch.compile(b, backend=cnt, fullgraph=True)
    with torch.no_grad():
        for step in range(3):
            xa, ctx = tiny_inputs(step, seed=0)
            xb, _ = tiny_inputs(step, seed=5)
            torch.testing.assert_close(ca(xa, ctx), a_ref(xa, ctx), rtol=0, atol=1e-5)
            if step == 0 and not together:
                assert not states_of(b)          # a's trace allocated nothing in b
            torch.testing.assert_close(cb(xb, ctx), b_ref(xb, ctx), rtol=0, atol=1e-5)
    assert_same_states(states_of(a), states_of(a_ref))
    assert_same_states(states_of(b), states_of(b_ref))
    sa, sb = states_of(a), states_of(b)
    assert all(sa[k].data_ptr() != sb[k].data_ptr() for k in sa)
    assert any(not torch.equal(sa[k], sb[k]) for k in sa)
    # one root: one graph serves both instances, each with its own buffers; else one graph each
    assert cnt.frame_count == (1 if together else 2)


def test_regional_compile_each_block_keeps_its_state():
    model, ref = enabled_pair(threshold=-4.0, depth=3)
    cnt = CompileCounterWithBackend(quick())
    for block in model.blocks:
        block.compile(backend=cnt, fullgraph=True)
    with torch.no_grad():
        for step in range(3):
            x, ctx = tiny_inputs(step)
            torch.testing.assert_close(model(x, ctx), ref(x, ctx), rtol=0, atol=1e-5)
    assert cnt.frame_count == 1          # one graph for every block
    states = states_of(model)
    assert_same_states(states, states_of(ref))
    per_block = [v for k, v in states.items() if ".attn." in k]
    assert len(per_block) == 3 and len({t.data_ptr() for t in per_block}) == 3


@pytest.mark.parametrize("dynamic", [None, True], ids=["auto", "dynamic"])
def test_resolution_change_gets_fresh_state_and_keeps_the_other(dynamic):
    model, ref = enabled_pair(threshold=-4.0)
    # dynamic=True works too: the state's shape specialises the sequence length (one graph each)
    cmodel = torch.compile(model, backend=quick(), fullgraph=True, dynamic=dynamic)
    with torch.no_grad():
        for seq in ((512, 512, 256, 512, 256) if dynamic is None else (512, 256, 512)):
            x, ctx = tiny_inputs(seq=seq, step=seq)
            torch.testing.assert_close(cmodel(x, ctx), ref(x, ctx), rtol=0, atol=1e-5)
    states = states_of(model)
    assert_same_states(states, states_of(ref))
    site = model.blocks[0].attn.liteattn
    assert sorted(site.states()) == ["state_0_default_1x2x256x256x64_float32", "state_0_default_1x2x512x512x64_float32"]
    assert site.states()["state_0_default_1x2x256x256x64_float32"].shape == (1, 2, 2, 1)


def test_batch_two_has_a_state_row_per_sample():
    model, ref = enabled_pair(threshold=-4.0)
    cmodel = torch.compile(model, backend=quick(), fullgraph=True)
    run_steps(cmodel, steps=2, batch=2)
    run_steps(ref, steps=2, batch=2)
    assert_same_states(states_of(model), states_of(ref))
    state = model.blocks[0].attn.liteattn.states()["state_0_default_2x2x512x512x64_float32"]
    assert state.shape == (2, 2, -(-512 // liteattn_ops.tile_shape(64, torch.float32)[0]), 1)


def test_cond_uncond_share_by_default_and_branch_separates():
    model, ref = enabled_pair(threshold=-4.0)
    cnt = CompileCounterWithBackend(quick())
    cmodel = torch.compile(model, backend=cnt, fullgraph=True)
    with torch.no_grad():
        for step in range(2):
            x, ctx = tiny_inputs(step)
            _, uncond = tiny_inputs(step, seed=9)
            for m in (cmodel, ref):           # default: both calls update the one state
                m(x, ctx), m(x, uncond)
    assert_same_states(states_of(model), states_of(ref))
    assert cnt.frame_count == 1
    with torch.no_grad():
        for step in range(2):
            x, ctx = tiny_inputs(step)
            _, uncond = tiny_inputs(step, seed=9)
            for m in (cmodel, ref):
                m(x, ctx)
                with liteattn_ops.branch(m, "uncond"):
                    m(x, uncond)
    assert_same_states(states_of(model), states_of(ref))
    assert "state_0_uncond_1x2x512x512x64_float32" in model.blocks[0].attn.liteattn.states()
    assert cnt.frame_count == 2          # one more graph for the "uncond" branch, then cached


# ------------------------------------------------------------------------------------------------
# Recompiles, thresholds, reset / stats on the compiled model
# ------------------------------------------------------------------------------------------------

def test_no_recompile_on_second_call_or_threshold_change():
    model, ref = enabled_pair(threshold=-4.0)
    cnt = CompileCounterWithBackend(quick())
    cmodel = torch.compile(model, backend=cnt, fullgraph=True)
    x, ctx = tiny_inputs()
    with torch.no_grad():
        cmodel(x, ctx), cmodel(x, ctx)
        assert cnt.frame_count == 1
        liteattn_ops.reset(cmodel)
        liteattn_ops.reset(ref)
        liteattn_ops.set_threshold(cmodel, -1.0)
        liteattn_ops.set_threshold(ref, -1.0)
        torch.testing.assert_close(cmodel(x, ctx), ref(x, ctx), rtol=0, atol=1e-5)
    assert cnt.frame_count == 1
    assert_same_states(states_of(model), states_of(ref))
    stats = liteattn_ops.stats(cmodel)       # names as named_modules() gives them: "_orig_mod." first
    assert stats["_orig_mod.blocks.0.attn.liteattn"]["threshold"] == [-1.0]
    assert stats["_orig_mod.blocks.0.attn.liteattn"]["live_fraction"] < 1.0


def test_inductor_calls_the_op_in_place_on_the_state():
    from torch._inductor.utils import run_and_get_code
    from torch.testing import FileCheck

    block = tiny_dit(depth=1).blocks[0]
    liteattn_ops.enable(block, threshold=-4.0)
    ref = copy.deepcopy(block)
    cnt = CompileCounterWithBackend("liteattn")          # the registered name, Inductor behind it
    cblock = torch.compile(block, backend=cnt, fullgraph=True)
    x, ctx = tiny_inputs()
    with torch.no_grad():
        out, (code, *_) = run_and_get_code(cblock, x, ctx)
        torch.testing.assert_close(out, ref(x, ctx), rtol=1e-4, atol=1e-4)
        cblock(x, ctx)
        ref(x, ctx)
    state_name = "state_0_default_1x2x512x512x64_float32"
    FileCheck().check("torch.ops.liteattn.sparse_attention.default(").check_not(".copy_(").run(code)
    # (the call counter's add_ is fused into a kernel that updates it in place: no copy either)
    assert ".copy_(" not in code and "aten.copy_.default(" not in code
    assert block.attn.liteattn.calls == 2 == ref.attn.liteattn.calls     # counted on the device, compiled
    assert torch.equal(block.attn.liteattn.states()[state_name], ref.attn.liteattn.states()[state_name])
    assert cnt.frame_count == 1


@pytest.mark.parametrize("mode, options, expected", [
    ("reduce-overhead", None, {"triton.cudagraphs": True}),
    ("max-autotune-no-cudagraphs", None, {"max_autotune": True, "coordinate_descent_tuning": True}),
    (None, {"max-autotune": True, "epilogue_fusion": False}, {"max_autotune": True, "epilogue_fusion": False}),
    ("default", None, {}),
])
def test_mode_and_options_reach_inductor(monkeypatch, mode, options, expected):
    """What torch.compile(mode=..., options=...) hands the backend must reach Inductor's compile_fx
    as config patches (the expected patches are written out here, not computed by the backend's
    own helper)."""
    import torch._inductor.compile_fx as compile_fx_module

    seen = []
    real = compile_fx_module.compile_fx

    def recording(gm, example_inputs, *args, config_patches=None, **kwargs):
        seen.append(dict(config_patches or {}))
        return gm.forward            # run the graph as traced (no Inductor: quick)

    monkeypatch.setattr(compile_fx_module, "compile_fx", recording)
    assert "liteattn" in torch._dynamo.list_backends()      # the entry point
    block = tiny_dit(depth=1).blocks[0]
    liteattn_ops.enable(block)
    x, ctx = tiny_inputs()
    kwargs = {"options": options} if options else {"mode": mode}
    with torch.no_grad():
        torch.compile(block, backend="liteattn", fullgraph=True, **kwargs)(x, ctx)
    assert seen == [expected]
    assert real is not recording


def test_unknown_inductor_option_is_refused():
    block = tiny_dit(depth=1).blocks[0]
    liteattn_ops.enable(block)
    x, ctx = tiny_inputs()
    with pytest.raises(Exception, match="Unexpected optimization option"):
        with torch.no_grad():
            torch.compile(block, backend="liteattn", options={"not_an_option": 1})(x, ctx)


# ------------------------------------------------------------------------------------------------
# Eligibility, report, unprepared models, grad mode
# ------------------------------------------------------------------------------------------------

class Ineligible(nn.Module):
    """One SDPA call of each kind the rewrite must leave alone."""

    def __init__(self):
        super().__init__()
        self.masked = SelfAttention(attn_mask=torch.ones(SEQ, SEQ, dtype=torch.bool))
        self.causal = SelfAttention(is_causal=True)
        self.dropout = SelfAttention(dropout_p=0.5)
        self.small_head = SelfAttention(heads=4)        # head_dim 32
        self.negative_scale = SelfAttention(scale=-0.1)
        self.ok = SelfAttention()

    def forward(self, x):
        return self.ok(x) + self.masked(x) + self.causal(x) + self.small_head(x) + self.negative_scale(x) + 0 * x


def test_ineligible_calls_are_left_with_reasons():
    model = Ineligible().eval()
    liteattn_ops.enable(model)
    x, _ = tiny_inputs()
    with torch.no_grad():
        torch.compile(model, backend=quick(), fullgraph=True)(x)
        model.dropout(x)   # eager: reasons are recorded the same way
    report = liteattn_ops.report(model)
    left = {name: entry["calls"][0].get("left") for name, entry in report.items()}
    assert left == {"masked": "attention mask", "causal": "causal", "dropout": "dropout_p != 0",
                    "small_head": "head_dim 32 unsupported (supported: 64, 128)",
                    "negative_scale": "scale is not a positive finite float", "ok": None}
    assert report["ok"]["calls"][0]["op"] == "liteattn.sparse_attention"
    c = counters["liteattn"]
    assert c["rewritten"] == 1 and c["left: attention mask"] == 1 and c["left: causal"] == 1
    assert c["left: head_dim 32 unsupported (supported: 64, 128)"] == 1
    pass_report = graph_pass.REPORTS[-1]
    assert ("ok", "liteattn.sparse_attention") in pass_report.rewritten
    assert ("causal", "causal") in pass_report.left
    assert "small_head[0]: left: head_dim 32 unsupported" in liteattn_ops.format_report(model)


def test_unprepared_model_is_enabled_at_its_first_compiled_call():
    """torch.compile(model, backend="liteattn") with no enable(): the first call is plain SDPA (exact)
    and enables the model; the next call retraces and skips with the model's own states, exactly as
    an eager model enabled after its first step."""
    model, ref = tiny_dit(), tiny_dit()
    cnt = CompileCounterWithBackend(liteattn_ops.backend(threshold=-4.0, inductor=False))
    cmodel = torch.compile(model, backend=cnt, fullgraph=True)
    with torch.no_grad():
        x, ctx = tiny_inputs(0)
        torch.testing.assert_close(cmodel(x, ctx), ref(x, ctx), rtol=0, atol=1e-5)
        assert [name for name, _ in routed_sites(model)] == ["blocks.0.attn", "blocks.0.cross",
                                                             "blocks.1.attn", "blocks.1.cross"]
        liteattn_ops.enable(ref, threshold=-4.0)
        for step in range(1, 4):
            x, ctx = tiny_inputs(step)
            torch.testing.assert_close(cmodel(x, ctx), ref(x, ctx), rtol=0, atol=1e-5)
            assert_same_states(states_of(model), states_of(ref))
    assert cnt.frame_count == 2      # the plain graph once, then the routed one for every later call
    assert any(s["live_fraction"] < 1 for s in liteattn_ops.stats(model).values() if s["live_fraction"] is not None)


def test_unprepared_wan_regional_enables_every_block():
    plain = wan_model()
    model, ref = copy.deepcopy(plain), copy.deepcopy(plain)
    cnt = CompileCounterWithBackend(liteattn_ops.backend(threshold=-2.0, inductor=False))
    model.compile_repeated_blocks(backend=cnt, fullgraph=True)
    with torch.no_grad():
        args = wan_inputs(0)
        torch.testing.assert_close(model(*args, return_dict=False)[0], ref(*args, return_dict=False)[0],
                                   rtol=0, atol=1e-5)
        assert {name for name, _ in routed_sites(model)} == {"blocks.0.attn1", "blocks.0.attn2",
                                                             "blocks.1.attn1", "blocks.1.attn2"}
        liteattn_ops.enable(ref, threshold=-2.0)
        for step in range(1, 3):
            args = wan_inputs(step)
            torch.testing.assert_close(model(*args, return_dict=False)[0], ref(*args, return_dict=False)[0],
                                       rtol=0, atol=1e-5)
            assert_same_states(states_of(model), states_of(ref))
    states = states_of(model)
    assert len(states) == 2 and len({t.data_ptr() for t in states.values()}) == 2   # one per block
    assert cnt.frame_count == 2


def test_unprepared_model_with_other_fallbacks():
    model = tiny_dit()
    x, ctx = tiny_inputs()
    with torch.no_grad():
        expected = model(x, ctx)
        with pytest.warns(UserWarning, match="enable"):
            eligibility._WARNED.discard("not a site")
            out = torch.compile(model, backend=liteattn_ops.backend(fallback="sdpa", inductor=False),
                                fullgraph=True)(x, ctx)
        torch.testing.assert_close(out, expected)
        assert counters["liteattn"][f"left: {graph_pass.NOT_A_SITE}"] == 2
        assert not list(routed_sites(model))
        torch._dynamo.reset()
        out = torch.compile(model, backend=liteattn_ops.backend(fallback="dense", cross="dense", inductor=False),
                            fullgraph=True)(x, ctx)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        assert counters["liteattn"]["dense"] == 4
        torch._dynamo.reset()
        with pytest.raises(Exception, match="enable"):
            torch.compile(model, backend=liteattn_ops.backend(fallback="error"), fullgraph=True)(x, ctx)
    with pytest.raises(ValueError, match="fallback must be"):
        liteattn_ops.backend(fallback="maybe")
    with pytest.raises(ValueError, match="threshold must be <= 0"):
        liteattn_ops.backend(threshold=3.0)


def test_enable_and_disable_after_compiling_retrace():
    model = tiny_dit()
    cnt = CompileCounterWithBackend(liteattn_ops.backend(fallback="sdpa", inductor=False))
    cmodel = torch.compile(model, backend=cnt, fullgraph=True)
    x, ctx = tiny_inputs()
    eligibility._WARNED.add("not a site")     # (this test is not about the warning)
    with torch.no_grad():
        plain = cmodel(x, ctx)
        liteattn_ops.enable(model, threshold=float("-inf"))   # Dynamo's guards see the new forwards
        torch.testing.assert_close(cmodel(x, ctx), plain, rtol=1e-5, atol=1e-5)
        assert cnt.frame_count == 2 and len(states_of(model)) == 2
        liteattn_ops.disable(model)
        torch.testing.assert_close(cmodel(x, ctx), plain)
    assert cnt.frame_count == 2          # after disable, the first graph's guards hold again
    assert counters["liteattn"]["rewritten"] == 2


def test_cross_attention_dense_rule():
    model, ref = enabled_pair(threshold=-4.0, cross="dense")
    cmodel = torch.compile(model, backend=quick(), fullgraph=True)
    x, ctx = tiny_inputs()
    with torch.no_grad():
        torch.testing.assert_close(cmodel(x, ctx), ref(x, ctx), rtol=0, atol=1e-5)
    assert counters["liteattn"]["rewritten"] == 2 and counters["liteattn"]["left"] == 0
    assert liteattn_ops.report(model)["blocks.0.cross"]["calls"][0]["op"] == "liteattn.attention"


def test_grad_mode_leaves_sdpa_and_warns_once():
    model, plain = tiny_dit(), tiny_dit()
    liteattn_ops.enable(model)
    x, ctx = tiny_inputs()
    eligibility._WARNED.discard("grad")
    with pytest.warns(UserWarning, match="inference-only"):
        out = torch.compile(model, backend=quick(), fullgraph=True)(x, ctx)
    torch.testing.assert_close(out, plain(x, ctx))
    out.sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None
    assert counters["liteattn"][f"left: {graph_pass.GRAD}"] == 4   # self- and cross-attention
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # once only
        model(x, ctx)
    with torch.no_grad():                   # grad off: the same compiled model skips tiles
        torch.compile(model, backend=quick(), fullgraph=True)(x, ctx)
    assert counters["liteattn"]["rewritten"] == 2


# ------------------------------------------------------------------------------------------------
# diffusers WanTransformer3DModel (self-attention with RoPE, cross-attention)
# ------------------------------------------------------------------------------------------------

WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=4,
           text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
           qk_norm="rms_norm_across_heads", rope_max_seq_len=64)


def wan_model():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.WanTransformer3DModel(**WAN).eval()


def wan_inputs(step, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(step)
    latents = torch.randn(1, 4, 2, 32, 32, generator=g)        # 2 x 16 x 16 = 512 tokens
    text = torch.randn(1, 16, 32, generator=g)
    return (latents.to(device, dtype), torch.tensor([900 - 100 * step], device=device),
            text.to(device, dtype))


@pytest.mark.parametrize("regional", [False, True], ids=["whole", "regional"])
def test_wan_compiled_equals_eager(regional):
    plain = wan_model()
    model, ref = copy.deepcopy(plain), copy.deepcopy(plain)
    liteattn_ops.enable(model, threshold=-2.0)
    liteattn_ops.enable(ref, threshold=-2.0)
    cnt = CompileCounterWithBackend(quick())
    if regional:
        model.compile_repeated_blocks(backend=cnt, fullgraph=True)
        cmodel = model
    else:
        cmodel = torch.compile(model, backend=cnt, fullgraph=True)
    with torch.no_grad():
        for step in range(3):
            args = wan_inputs(step)
            out = cmodel(*args, return_dict=False)[0]
            torch.testing.assert_close(out, ref(*args, return_dict=False)[0], rtol=0, atol=1e-5)
            assert_same_states(states_of(model), states_of(ref))
    assert cnt.frame_count == 1
    assert counters["liteattn"]["rewritten"] == (1 if regional else 2)
    report = liteattn_ops.report(model)
    assert report["blocks.1.attn1"]["calls"][0]["op"] == "liteattn.sparse_attention"
    assert report["blocks.1.attn2"]["calls"][0]["left"] == graph_pass.CROSS


def test_wan_threshold_minus_inf_equals_sdpa():
    plain = wan_model()
    model = copy.deepcopy(plain)
    liteattn_ops.enable(model, threshold=float("-inf"))
    cmodel = torch.compile(model, backend=quick(), fullgraph=True)
    with torch.no_grad():
        for step in range(2):
            args = wan_inputs(step)
            torch.testing.assert_close(cmodel(*args, return_dict=False)[0], plain(*args, return_dict=False)[0],
                                       rtol=1e-5, atol=1e-5)


def test_flux_joint_attention_is_self_attention():
    """MM-DiT joint attention (text and image tokens in one sequence, S_q = S_k) gets the stateful
    op; must_do keeps the text tokens' tiles (Flux puts them first) always computed."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    plain = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=64, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(16, 24, 24)).eval()
    model, ref = copy.deepcopy(plain), copy.deepcopy(plain)
    for m in (model, ref):
        assert liteattn_ops.enable(m, threshold=-2.0, must_do=[(0, 16)]) == [
            "transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]

    def inputs(step):
        g = torch.Generator().manual_seed(step)
        return dict(hidden_states=torch.randn(1, 496, 4, generator=g),
                    encoder_hidden_states=torch.randn(1, 16, 32, generator=g),
                    pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.9 - 0.1 * step]),
                    img_ids=torch.randn(496, 3, generator=g), txt_ids=torch.zeros(16, 3), return_dict=False)

    cmodel = torch.compile(model, backend=quick(), fullgraph=True)
    with torch.no_grad():
        for step in range(3):
            torch.testing.assert_close(cmodel(**inputs(step))[0], ref(**inputs(step))[0], rtol=0, atol=1e-5)
    assert_same_states(states_of(model), states_of(ref))
    assert counters["liteattn"]["rewritten"] == 2 and counters["liteattn"]["left"] == 0
    assert liteattn_ops.report(model)["transformer_blocks.0.attn"]["calls"][0]["shapes"] == [
        ((1, 2, 512, 64), (1, 2, 512, 64))]


# ------------------------------------------------------------------------------------------------
# CUDA (H100 / H200 with the kernel built)
# ------------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_cuda_wan_compiled_equals_eager(mode, cuda_graph_calls):
    plain = wan_model().to("cuda", torch.bfloat16)
    model, ref = copy.deepcopy(plain), copy.deepcopy(plain)
    liteattn_ops.enable(model, threshold=-2.0)
    liteattn_ops.enable(ref, threshold=-2.0)
    cmodel = torch.compile(model, backend="liteattn", mode=mode, fullgraph=True)
    with torch.no_grad():
        for step in range(4):
            args = wan_inputs(step, "cuda", torch.bfloat16)
            out = cmodel(*args, return_dict=False)[0].clone()
            torch.testing.assert_close(out, ref(*args, return_dict=False)[0], rtol=2e-2, atol=2e-2)
    torch.cuda.synchronize()
    for key, (a, b) in {k: (v, states_of(ref)[k]) for k, v in states_of(model).items()}.items():
        # bf16 Inductor vs eager may round a borderline tile differently: allow a few bits
        assert (a != b).float().mean() < 0.05, key
    assert counters["liteattn"]["rewritten"] == 2
    assert counters["inductor"]["cudagraph_skips"] == 0       # reduce-overhead: the op is captured
    if mode == "reduce-overhead":
        assert cuda_graph_calls["capture"] > 0 and cuda_graph_calls["replay"] > 0


@pytest.mark.cuda
def test_cuda_reduce_overhead_regional_tinydit(cuda_graph_calls):
    model, ref = tiny_dit(depth=3).to("cuda", torch.bfloat16), None
    ref = copy.deepcopy(model)
    liteattn_ops.enable(model, threshold=-4.0)
    liteattn_ops.enable(ref, threshold=-4.0)
    for block in model.blocks:
        block.compile(backend="liteattn", mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        for step in range(4):
            # One model call = several CUDA-graph replays (one per block): tell the CUDA-graph
            # trees where a call begins, so the outputs of the previous call may be reused.
            torch.compiler.cudagraph_mark_step_begin()
            x, ctx = (t.to("cuda", torch.bfloat16) for t in tiny_inputs(step))
            out, expected = model(x, ctx).clone().float(), ref(x, ctx).float()
            # bf16: Inductor's fused kernels round differently from eager (on CPU the same check
            # sees max |diff| ~0.06-0.09 on outputs of magnitude ~6): compare to the scale.
            assert (out - expected).abs().max() <= 0.03 * expected.abs().max()
    torch.cuda.synchronize()
    fractions = [s["live_fraction"] for s in liteattn_ops.stats(model).values() if s["live_fraction"] is not None]
    ref_fractions = [s["live_fraction"] for s in liteattn_ops.stats(ref).values() if s["live_fraction"] is not None]
    assert fractions == pytest.approx(ref_fractions, abs=0.05) and min(fractions) < 1.0
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert cuda_graph_calls["capture"] > 0 and cuda_graph_calls["replay"] > 0


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_cuda_unprepared_model_with_inductor(mode, cuda_graph_calls):
    """backend="liteattn" by name, no enable(): Inductor's compiled function enables the model at
    its first call; later calls run the kernel on the model's own states (inside the CUDA graph
    with reduce-overhead)."""
    model = tiny_dit(depth=2).to("cuda", torch.bfloat16)
    ref = copy.deepcopy(model)
    cmodel = torch.compile(model, backend="liteattn", mode=mode, fullgraph=True)
    with torch.no_grad():
        for step in range(4):
            x, ctx = (t.to("cuda", torch.bfloat16) for t in tiny_inputs(step))
            out = cmodel(x, ctx).clone().float()
            if step == 0:
                assert len(list(routed_sites(model))) == 4
                liteattn_ops.enable(ref, threshold=-10.0)
            expected = ref(x, ctx).float()
            assert (out - expected).abs().max() <= 0.03 * expected.abs().max()
    torch.cuda.synchronize()
    assert counters["liteattn"]["rewritten"] == 2
    assert len(states_of(model)) == 2
    if mode == "reduce-overhead":
        assert counters["inductor"]["cudagraph_skips"] == 0
        assert cuda_graph_calls["capture"] > 0 and cuda_graph_calls["replay"] > 0


@pytest.fixture
def cuda_graph_calls(monkeypatch):
    """Counts CUDA-graph captures and replays (torch.cuda.CUDAGraph, which the CUDA-graph trees of
    mode="reduce-overhead" use). cudagraph_skips == 0 also holds when no graph was attempted."""
    calls = {"capture": 0, "replay": 0}
    cls = torch.cuda.CUDAGraph
    capture_begin, replay = cls.capture_begin, cls.replay

    def counting_capture_begin(self, *args, **kwargs):
        calls["capture"] += 1
        return capture_begin(self, *args, **kwargs)

    def counting_replay(self, *args, **kwargs):
        calls["replay"] += 1
        return replay(self, *args, **kwargs)

    monkeypatch.setattr(cls, "capture_begin", counting_capture_begin)
    monkeypatch.setattr(cls, "replay", counting_replay)
    return calls
