"""liteattn_ops.export on a small diffusers WanTransformer3DModel: the SDPA calls are routed by
liteattn_ops.enable (the compile backend's rewrite), the program round-trips through a .pt2 file
in a fresh process (without diffusers) and compiles with AOTInductor. CPU."""

from __future__ import annotations

import pytest
import torch
from torch.testing import FileCheck
from torch.utils import _pytree as pytree

import liteattn_ops
from test_export import _fast_cpu_configs, run_in_fresh_process

diffusers = pytest.importorskip("diffusers")

# 2 blocks, 2 heads of 64; 3 x 24 x 32 latents with 1x2x2 patches -> 576 tokens (3 query tiles of 192,
# 5 key tiles of 128: with a single query tile nothing could be dropped, the first tile visited never is)
TOKENS = 576
STATES = [f"blocks.{i}.attn1.liteattn.state_0_default_1x2x{TOKENS}x{TOKENS}x64_float32" for i in range(2)]
THRESHOLD = -2.0


def make_wan():
    """Random weights, except that self-attention keys equal queries (sharpened by the q/k norm
    weights): each token attends mostly to itself, so far tiles become negligible and the skip
    states change (a random model skips nothing)."""
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=128, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32).eval()
    with torch.no_grad():
        for block in model.blocks:
            attn = block.attn1
            attn.to_k.weight.copy_(attn.to_q.weight)
            attn.to_k.bias.copy_(attn.to_q.bias)
            attn.norm_q.weight.fill_(1.5)
            attn.norm_k.weight.fill_(1.5)
    return model


def make_calls(steps: int = 3):
    """(args, kwargs) of consecutive denoising steps: latents, timestep, text embeddings."""
    gen = torch.Generator().manual_seed(2)
    latents = torch.randn(1, 4, 3, 24, 32, generator=gen)
    text = torch.randn(1, 8, 32, generator=gen)
    return [((latents * (1 - 0.2 * i), torch.tensor([900.0 - 300 * i]), text), {"return_dict": False})
            for i in range(steps)]


def eager_run(model, calls):
    liteattn_ops.reset(model)
    outs, states = [], []
    with torch.no_grad():
        for args, kwargs in calls:
            outs.append(model(*args, **kwargs))
            states.append({name: t.clone() for name, t in model.named_buffers() if name in STATES})
    return outs, states


@pytest.fixture(scope="module")
def calls():
    return make_calls()


@pytest.fixture(scope="module")
def wan_and_program(calls):
    model = make_wan()
    args, kwargs = calls[0]
    program = liteattn_ops.export(model, args, kwargs, threshold=THRESHOLD)
    return model, program


@pytest.fixture(scope="module")
def eager(wan_and_program, calls):
    return eager_run(wan_and_program[0], calls)


def assert_same(got, expected, **tol):
    for a, b in zip(pytree.tree_leaves(got), pytree.tree_leaves(expected), strict=True):
        torch.testing.assert_close(a, b, **(tol or {"rtol": 0, "atol": 0}))


def test_wan_export_routes_self_attention_and_leaves_cross_attention(wan_and_program):
    model, program = wan_and_program
    code = program.graph_module.code
    FileCheck().check_count("torch.ops.liteattn.sparse_attention.default", 2, exactly=True).run(code)
    FileCheck().check_count("torch.ops.aten.scaled_dot_product_attention.default", 2, exactly=True).run(code)
    assert sorted(program.run_decompositions().graph_signature.buffers_to_mutate.values()) == STATES
    meta = program.graph_module.meta["custom"]["liteattn_ops"]
    assert [rec["state"] for rec in meta["states"]] == STATES
    rewritten, left = meta["attention"]["rewritten"], meta["attention"]["left"]    # the backend pass's report
    assert [op for _, op in rewritten] == ["liteattn.sparse_attention"] * 2
    assert [path.startswith(f"blocks.{i}.attn1") for i, (path, _) in enumerate(rewritten)] == [True, True]
    assert [path.startswith(f"blocks.{i}.attn2") for i, (path, _) in enumerate(left)] == [True, True]
    assert all("cross-attention" in reason for _, reason in left)
    assert [name for name, _ in liteattn_ops.attention_sites(model)][:1] == ["blocks.0.attn1.liteattn"]


def test_wan_program_matches_eager_over_calls(wan_and_program, calls, eager):
    _, program = wan_and_program
    liteattn_ops.reset_program(program)
    module = program.module()
    states = liteattn_ops.exported_states(module)
    assert sorted(states) == STATES
    outs, expected_states = eager
    live = [[float(liteattn_ops.live_mask(step[name], TOKENS, 64, torch.float32).float().mean()) for name in STATES]
            for step in expected_states]
    assert live[-1][0] < 1 and live[0] != live[1], live       # tiles are dropped, not only in call 1
    with torch.no_grad():
        for i, (args, kwargs) in enumerate(calls):
            assert_same(module(*args, **kwargs), outs[i])
            for name in STATES:
                assert torch.equal(states[name], expected_states[i][name]), (i, name)


def test_wan_round_trip_in_fresh_process_without_diffusers(wan_and_program, calls, eager, tmp_path):
    _, program = wan_and_program
    liteattn_ops.reset_program(program)
    report, outs, states, _ = run_in_fresh_process(program, calls, tmp_path)
    assert report["modules_before"] == []
    assert report["modules_after"] == [], report  # loading and running needs liteattn_ops, not diffusers
    expected_outs, expected_states = eager
    for i in range(len(calls)):
        assert_same(outs[i], expected_outs[i])
        for name in STATES:
            assert torch.equal(states[i][name], expected_states[i][name]), (i, name)


def test_wan_plain_torch_export_after_enable(calls):
    """A model prepared with enable() and run once exports with plain torch.export.export; before
    that run, torch.export gets a clear error instead of baking a state into the program."""
    model = make_wan()
    liteattn_ops.enable(model, threshold=THRESHOLD)
    args, kwargs = calls[0]
    with torch.no_grad():
        with pytest.raises(Exception, match=r"run the\s+model once"):
            torch.export.export(model, args, kwargs)
        model(*args, **kwargs)
        program = torch.export.export(model, args, kwargs)
    assert sorted(program.run_decompositions().graph_signature.buffers_to_mutate.values()) == STATES


def test_wan_dynamic_frames_refused_at_export(calls):
    frames = torch.export.Dim("frames", min=2, max=8)
    args, kwargs = calls[0]
    with pytest.raises(ValueError, match=r"site 'blocks.0.attn1.liteattn' gets dynamic dimensions"):
        liteattn_ops.export(make_wan(), args, kwargs, dynamic_shapes=({2: frames}, None, None, None))


def test_wan_dynamic_text_length_works(calls):
    """A dynamic dimension that does not reach a skip state (the text length of cross-attention,
    left to SDPA) is fine."""
    text_len = torch.export.Dim("text_len", min=2, max=64)
    (latents, t, text), kwargs = calls[0]
    model = make_wan()
    program = liteattn_ops.export(model, (latents, t, text), kwargs, threshold=THRESHOLD,
                                  dynamic_shapes=(None, None, {1: text_len}, None))
    longer = torch.randn(1, 20, 32, generator=torch.Generator().manual_seed(3))
    liteattn_ops.reset(model)
    with torch.no_grad():
        assert_same(program.module()(latents, t, longer, **kwargs), model(latents, t, longer, **kwargs))


@pytest.mark.slow
def test_wan_aoti_package(wan_and_program, calls, eager, tmp_path, aoti_loads):
    _, program = wan_and_program
    path = liteattn_ops.aoti_compile_and_package(program, package_path=tmp_path / "wan.pt2",
                                                 inductor_configs=_fast_cpu_configs())
    runner = liteattn_ops.aoti_load_package(path)
    assert sorted(runner.states) == STATES
    outs, expected_states = eager
    with torch.no_grad():
        for i, (args, kwargs) in enumerate(calls):
            assert_same(runner(*args, **kwargs), outs[i], rtol=1e-4, atol=1e-5)
            for name in STATES:
                assert torch.equal(runner.states[name], expected_states[i][name]), (i, name)
