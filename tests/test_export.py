"""Export of models with LiteAttention sites: torch.export, .pt2 round-trip in a fresh process,
AOTInductor packages, dynamic shapes, bad input. CPU (the reference implementation of the op)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch
from torch import nn
from torch.testing import FileCheck

import liteattn_ops
from liteattn_ops.core import reference, tiling

import liteattn_ops.deploy.program as lx

DIM, HEADS, SEQ = 128, 2, 300        # head_dim 64
BM, BN = tiling.tile_shape(DIM // HEADS, torch.bfloat16)
MT = -(-SEQ // BM)                   # query tiles of the state (2 with 192 x 128 tiles)
STEPS = 4


# ------------------------------------------------------------------------------------------------
# A small DiT: adaLN-modulated blocks with LiteAttention sites
# ------------------------------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, dim: int, heads: int, threshold: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.modulation = nn.Linear(dim, 4 * dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn = liteattn_ops.LiteAttention(threshold=threshold)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, temb):
        shift1, scale1, shift2, scale2 = self.modulation(temb)[:, None].chunk(4, dim=-1)
        b, s, c = x.shape
        h = self.norm1(x) * (1 + scale1) + shift1
        q, k, v = self.qkv(h).view(b, s, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(self.attn(q, k, v).transpose(1, 2).reshape(b, s, c))
        return x + self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class TinyDiT(nn.Module):
    def __init__(self, dim: int = DIM, heads: int = HEADS, depth: int = 2, threshold: float = -8.0):
        super().__init__()
        self.time = nn.Linear(64, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, threshold) for _ in range(depth))

    def forward(self, x, t):
        freqs = torch.exp(-math.log(1000.0) * torch.arange(32, dtype=x.dtype, device=x.device) / 32)
        temb = self.time(torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], -1))
        for block in self.blocks:
            x = block(x, temb)
        return x


def make_model() -> TinyDiT:
    """Weights chosen so that attention is local in token position (as in a video DiT): q = k =
    a scaled copy of the normalised tokens, whose features are positional. Some tiles become
    negligible, and which ones depends on the step (the modulation scales q and k with t)."""
    torch.manual_seed(0)
    model = TinyDiT().eval()
    with torch.no_grad():
        for block in model.blocks:
            eye = torch.eye(DIM)
            block.qkv.weight[: 2 * DIM].copy_(torch.cat([eye, eye]) * 1.2)
            block.qkv.bias[: 2 * DIM].zero_()
            block.modulation.weight.mul_(0.1)
    return model


def make_inputs(steps: int = STEPS, seq: int = SEQ):
    """One (x, t) per denoising step: positional features plus noise that shrinks with the step."""
    gen = torch.Generator().manual_seed(1)
    pos = torch.arange(seq, dtype=torch.float32)[:, None]
    freq = torch.arange(DIM // 2, dtype=torch.float32)[None] * math.pi / seq
    features = torch.cat([torch.cos(pos * freq), torch.sin(pos * freq)], -1)[None]
    out = []
    for i in range(steps):
        sigma = 1.0 - i / steps
        out.append((features + 0.3 * sigma * torch.randn(features.shape, generator=gen),
                    torch.tensor([1000.0 * sigma])))
    return out


def eager_run(model, inputs):
    """Outputs and skip states of the eager model over consecutive calls, from fresh states."""
    liteattn_ops.reset(model)
    outs, states = [], []
    with torch.no_grad():
        for args in inputs:
            outs.append(model(*args))
            states.append({f"{n}.state": s.state.clone() for n, s in liteattn_ops.attention_sites(model)})
    return outs, states


STATE_NAMES = ["blocks.0.attn.state", "blocks.1.attn.state"]


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def inputs():
    return make_inputs()


@pytest.fixture(scope="module")
def eager(model, inputs):
    return eager_run(model, inputs)


@pytest.fixture(scope="module")
def program(model, inputs):
    return liteattn_ops.export(model, inputs[0])


# ------------------------------------------------------------------------------------------------
# torch.export
# ------------------------------------------------------------------------------------------------

def test_test_model_skips_tiles_and_state_evolves(eager):
    """Guards the other tests: the eager model drops tiles, and not all in the first call."""
    _, states = eager
    live = [float(torch.cat([liteattn_ops.live_mask(s, SEQ, 64, torch.float32).flatten()
                             for s in step.values()]).float().mean()) for step in states]
    assert live[-1] < 1.0, live
    assert len(set(live)) > 1, f"live fraction never changes after the first call: {live}"


def test_export_graph_calls_op_with_state_buffers(program):
    FileCheck().check_count("torch.ops.liteattn.sparse_attention.default", 2, exactly=True).run(
        program.graph_module.code)
    buffers = set(program.graph_signature.buffers)
    assert set(STATE_NAMES) <= buffers
    assert set(STATE_NAMES) <= set(program.graph_signature.non_persistent_buffers)
    decomposed = program.run_decompositions()
    assert sorted(decomposed.graph_signature.buffers_to_mutate.values()) == STATE_NAMES
    meta = decomposed.graph_module.meta["custom"]["liteattn_ops"]    # survives run_decompositions
    assert meta["format_version"] == lx.FORMAT_VERSION
    assert [rec["state"] for rec in meta["states"]] == STATE_NAMES
    assert meta["states"][0]["site"] == "blocks.0.attn"
    assert meta["states"][0]["tile"] == [BM, BN] and meta["states"][0]["state_shape"] == [1, HEADS, MT, 1]
    assert [path for path, _ in meta["attention"]["rewritten"]] == ["blocks.0.attn", "blocks.1.attn"]
    assert meta["inputs"] == [{"shape": [1, SEQ, DIM], "dtype": "float32", "device": "cpu"},
                              {"shape": [1], "dtype": "float32", "device": "cpu"}]


def test_program_module_matches_eager_over_calls(program, inputs, eager):
    """In process: ep.module() gives the eager outputs and the same evolving skip states; the
    program's states are its own (running it does not touch the model, and vice versa)."""
    liteattn_ops.reset_program(program)
    module = program.module()
    states = liteattn_ops.exported_states(module)
    assert sorted(states) == STATE_NAMES
    outs, expected_states = eager
    with torch.no_grad():
        for i, args in enumerate(inputs):
            torch.testing.assert_close(module(*args), outs[i], rtol=0, atol=0)
            for name in STATE_NAMES:
                assert torch.equal(states[name], expected_states[i][name]), (i, name)
    ptr = states[STATE_NAMES[0]].data_ptr()
    liteattn_ops.reset_program(module)
    assert states[STATE_NAMES[0]].data_ptr() == ptr and bool((states[STATE_NAMES[0]] == -1).all())
    with torch.no_grad():
        torch.testing.assert_close(module(*inputs[0]), outs[0], rtol=0, atol=0)


def test_plain_torch_export_of_prepared_model(model, inputs):
    """A model whose sites have run once exports with plain torch.export.export; before that the
    module raises a clear error instead of leaving a fake state behind."""
    fresh = make_model()
    with torch.no_grad(), pytest.raises(RuntimeError, match="run the model once"):
        torch.export.export(fresh, inputs[0])
    assert all(site.state is None for _, site in liteattn_ops.attention_sites(fresh))
    with torch.no_grad():
        fresh(*inputs[0])
        ep = torch.export.export(fresh, inputs[0])
    assert sorted(ep.run_decompositions().graph_signature.buffers_to_mutate.values()) == STATE_NAMES


def test_dynamic_sequence_length_is_refused_at_export(model, inputs):
    seq = torch.export.Dim("seq", min=2, max=4096)
    with pytest.raises(ValueError, match=r"site 'blocks.0.attn' gets dynamic dimensions .*q.shape\[2\].*"
                                         r"Export one program per resolution"):
        liteattn_ops.export(model, inputs[0], dynamic_shapes=({1: seq}, None))
    batch = torch.export.Dim("batch", min=2, max=8)
    x, t = inputs[0]
    with pytest.raises(ValueError, match=r"q.shape\[0\]"):
        liteattn_ops.export(model, (x.repeat(2, 1, 1), t.repeat(2)), dynamic_shapes=({0: batch}, {0: batch}))


def test_export_enable_options_need_a_routed_model(model, inputs):
    with pytest.raises(ValueError, match="options of liteattn_ops.enable.*configure those instead"):
        liteattn_ops.export(model, inputs[0], threshold=-4.0)


def test_export_needs_attention_sites():
    with pytest.raises(ValueError, match="no attention that liteattn_ops can take over"):
        liteattn_ops.export(nn.Linear(4, 4), (torch.randn(2, 4),))


# ------------------------------------------------------------------------------------------------
# export(...) options on a model that calls SDPA (routed by enable)
# ------------------------------------------------------------------------------------------------

class SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)

    def forward(self, x):
        b, s, c = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, HEADS, c // HEADS).permute(2, 0, 3, 1, 4)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, c)


class CrossAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(DIM, DIM)
        self.kv = nn.Linear(DIM, 2 * DIM)

    def forward(self, x, ctx):
        b, s, c = x.shape
        q = self.q(x).view(b, s, HEADS, c // HEADS).transpose(1, 2)
        k, v = self.kv(ctx).view(b, ctx.shape[1], 2, HEADS, c // HEADS).permute(2, 0, 3, 1, 4)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, c)


class SdpaNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn0, self.attn1, self.cross = SelfAttention(), SelfAttention(), CrossAttention()

    def forward(self, x, ctx):
        x = x + self.attn0(x)
        x = x + self.attn1(x)
        return x + self.cross(x, ctx)


def sdpa_net():
    """q = k = the tokens (as make_model): each token's largest score is with itself, so tiles far
    from a query tile become negligible at threshold 0."""
    torch.manual_seed(3)
    net = SdpaNet().eval()
    with torch.no_grad():
        for attn in (net.attn0, net.attn1):
            attn.qkv.weight[: 2 * DIM].copy_(torch.cat([torch.eye(DIM), torch.eye(DIM)]) * 1.2)
            attn.qkv.bias[: 2 * DIM].zero_()
    return net


def sdpa_inputs(steps=3, seq=SEQ):
    ctx = torch.randn(1, 40, DIM, generator=torch.Generator().manual_seed(4))
    return [(x * 4, ctx) for x, _ in make_inputs(steps, seq)]


def _ops_in(ep):
    code = ep.graph_module.code
    return {op: code.count(op) for op in ("liteattn.sparse_attention", "liteattn.attention.default",
                                          "aten.scaled_dot_product_attention")}


def _program_states(ep):
    return {name.split(".")[0]: s for name, s in liteattn_ops.exported_states(ep).items()}


def test_export_must_do_must_skip_threshold_reach_the_sites():
    """export(..., threshold=, must_do=, must_skip=) routes the SDPA model with these options: the
    program drops tiles (threshold 0), never drops the must-do key tile 0, never visits the
    must-skip key tile 2, and its outputs and states equal an eager model enabled with the same
    options. 700 tokens: 6 key tiles, so tiles far from a query tile exist for either tile table."""
    seq = 700
    calls = sdpa_inputs(seq=seq)
    options = dict(threshold=0.0, must_do=[(0, BN)], must_skip=[(2 * BN, 3 * BN)])
    ep = liteattn_ops.export(sdpa_net(), calls[0], **options)
    assert _ops_in(ep) == {"liteattn.sparse_attention": 2, "liteattn.attention.default": 0,
                           "aten.scaled_dot_product_attention": 1}
    eager_model = sdpa_net()
    liteattn_ops.enable(eager_model, **options)
    module = ep.module()
    states = _program_states(ep)
    assert sorted(states) == ["attn0", "attn1"]
    with torch.no_grad():
        for args in calls:
            torch.testing.assert_close(module(*args), eager_model(*args), rtol=0, atol=0)
    eager_states = {name.split(".")[0]: site for name, site in liteattn_ops.attention_sites(eager_model)}
    for name, state in states.items():
        live = liteattn_ops.live_mask(state, seq, 64, torch.float32)
        assert bool(live[..., 0].all()), f"{name}: a must-do tile left the live set"
        assert not bool(live[..., 2].any()), f"{name}: a must-skip tile is live"
        assert not bool(live[..., 3:].all()), f"{name}: threshold 0 dropped nothing"
        assert torch.equal(live, eager_states[name].live_mask()), name


def test_export_cross_and_sites_options():
    """cross='dense' runs cross-attention with the dense op (default: left to SDPA); sites=
    routes only the named modules."""
    calls = sdpa_inputs(1)
    dense = liteattn_ops.export(sdpa_net(), calls[0], cross="dense")
    assert _ops_in(dense) == {"liteattn.sparse_attention": 2, "liteattn.attention.default": 1,
                              "aten.scaled_dot_product_attention": 0}
    only = liteattn_ops.export(sdpa_net(), calls[0], sites=["attn1"])
    assert _ops_in(only) == {"liteattn.sparse_attention": 1, "liteattn.attention.default": 0,
                             "aten.scaled_dot_product_attention": 2}
    assert sorted(_program_states(only)) == ["attn1"]
    reference_model = sdpa_net()
    with torch.no_grad():
        torch.testing.assert_close(dense.module()(*calls[0]), reference_model(*calls[0]), rtol=1e-5, atol=1e-5)


def test_export_strict_mode(monkeypatch):
    """strict=True goes to torch.export.export: the program is the same (same ops, same outputs,
    same states) as the non-strict export."""
    calls = sdpa_inputs()
    seen, real_export = [], torch.export.export
    monkeypatch.setattr(torch.export, "export", lambda *a, **kw: seen.append(kw.get("strict")) or real_export(*a, **kw))
    strict = liteattn_ops.export(sdpa_net(), calls[0], threshold=-2.0, strict=True)
    loose = liteattn_ops.export(sdpa_net(), calls[0], threshold=-2.0)
    assert seen == [True, False], f"torch.export.export got strict={seen}"
    assert _ops_in(strict) == _ops_in(loose)
    a, b = strict.module(), loose.module()
    with torch.no_grad():
        for args in calls:
            torch.testing.assert_close(a(*args), b(*args), rtol=0, atol=0)
    for name, state in _program_states(strict).items():
        assert torch.equal(state, _program_states(loose)[name]), name
    # A dynamic sequence length is refused in strict mode too (Dynamo specialises it while
    # tracing the router, and torch.export reports the violated constraint before our check).
    seq = torch.export.Dim("seq", min=2, max=4096)
    with pytest.raises(Exception, match=r"site 'attn0' gets dynamic dimensions|Constraints violated \(seq\)"):
        liteattn_ops.export(sdpa_net(), calls[0], strict=True, dynamic_shapes=({1: seq}, None))


def test_program_rejects_shape_its_state_does_not_fit(program, inputs):
    module = program.module()
    x, t = inputs[0]
    with pytest.raises(Exception, match=r"(size\(\)|shape)\[1\].*300"):   # torch.export's input guard
        module(x[:, :200], t)


# ------------------------------------------------------------------------------------------------
# .pt2 round trip in a fresh process
# ------------------------------------------------------------------------------------------------

_FRESH_PROCESS = textwrap.dedent("""
    import json, sys, torch
    path, data_path, out_path = sys.argv[1:]
    report = {}
    try:                                   # the op is not registered yet
        torch.export.load(path)
        report["without_import"] = None
    except Exception as e:
        report["without_import"] = f"{type(e).__name__}: {e}"
    report["modules_before"] = sorted(m for m in ("liteattn_ops", "diffusers") if m in sys.modules)
    import liteattn_ops
    ep = liteattn_ops.load(path)
    module = ep.module()
    states = liteattn_ops.exported_states(module)
    outs, seen = [], []
    with torch.no_grad():
        for args, kwargs in torch.load(data_path):
            outs.append(module(*args, **kwargs))
            seen.append({k: v.clone() for k, v in states.items()})
    torch.save({"outs": outs, "states": seen}, out_path)
    report["modules_after"] = sorted(m for m in ("diffusers", "transformers") if m in sys.modules)
    print(json.dumps(report))
""")


def run_in_fresh_process(program, calls, tmp_path):
    """Save `program`, then in a new Python process: try torch.export.load without importing
    liteattn_ops, then import it, liteattn_ops.load the file and run `calls` [(args, kwargs)] in
    order. Returns (report, outputs, states after each call, stderr)."""
    path, data, result, script = (tmp_path / n for n in ("model.pt2", "calls.pt", "result.pt", "run.py"))
    torch.export.save(program, path)
    torch.save(calls, data)
    script.write_text(_FRESH_PROCESS)
    proc = subprocess.run([sys.executable, str(script), str(path), str(data), str(result)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    got = torch.load(result)
    return report, got["outs"], got["states"], proc.stderr


def test_save_load_in_fresh_process(program, inputs, eager, tmp_path):
    liteattn_ops.reset_program(program)
    report, outs, states, stderr = run_in_fresh_process(program, [(args, {}) for args in inputs], tmp_path)
    # Without `import liteattn_ops`, PyTorch refuses the unknown operator (the reason is in its
    # exception or, in torch 2.13, in the warning it logs just before).
    assert report["modules_before"] == [] and report["without_import"] is not None, report
    assert report["modules_after"] == [], f"loading and running the program imported {report['modules_after']}"
    assert "liteattn.sparse_attention" in report["without_import"] + stderr, (report, stderr[-2000:])
    expected_outs, expected_states = eager
    for i in range(len(inputs)):
        torch.testing.assert_close(outs[i], expected_outs[i], rtol=0, atol=0)
        for name in STATE_NAMES:
            assert torch.equal(states[i][name], expected_states[i][name]), (i, name)


def test_load_gives_fresh_states(program, inputs, eager, tmp_path):
    """A .pt2 saved after the program ran holds evolved skip states: liteattn_ops.load starts
    from fresh ones (every tile live), so its calls reproduce a new video's; plain
    torch.export.load keeps what was saved (documented)."""
    liteattn_ops.reset_program(program)
    with torch.no_grad():
        for args in inputs:
            program.module()(*args)
    saved = liteattn_ops.exported_states(program)
    assert float(liteattn_ops.live_mask(saved[STATE_NAMES[0]], SEQ, 64, torch.float32).float().mean()) < 1
    torch.export.save(program, tmp_path / "ran.pt2")
    liteattn_ops.reset_program(program)

    plain = torch.export.load(tmp_path / "ran.pt2")
    assert any(not bool((s == -1).all()) for s in liteattn_ops.exported_states(plain).values())
    loaded = liteattn_ops.load(tmp_path / "ran.pt2")
    assert all(bool((s == -1).all()) for s in liteattn_ops.exported_states(loaded).values())
    outs, states = eager
    module = loaded.module()
    module_states = liteattn_ops.exported_states(module)
    with torch.no_grad():
        for i, args in enumerate(inputs):
            torch.testing.assert_close(module(*args), outs[i], rtol=0, atol=0)
            assert all(torch.equal(module_states[n], states[i][n]) for n in STATE_NAMES), i


def test_export_gives_fresh_states_after_the_model_ran(inputs):
    """export() of a model that already ran (its states evolved): the program starts fresh."""
    model = make_model()
    with torch.no_grad():
        for args in inputs:
            model(*args)
    assert any(not bool((s.state == -1).all()) for _, s in liteattn_ops.attention_sites(model))
    ep = liteattn_ops.export(model, inputs[0])
    assert all(bool((s == -1).all()) for s in liteattn_ops.exported_states(ep).values())


def _export_with(monkeypatch, model, args, *, table=None, version=None):
    with monkeypatch.context() as patch:
        if table is not None:
            patch.setattr(tiling, "_table", lambda: table)
        if version is not None:
            patch.setattr(lx, "FORMAT_VERSION", version)
        return liteattn_ops.export(model, args)


def test_load_rejects_program_with_other_tile_shape(monkeypatch, inputs, tmp_path):
    """A program exported when the kernel used 64x64 tiles: liteattn_ops.load refuses it by its
    record; plain torch.export.load runs into the op's own state-shape check."""
    model = make_model()
    table = {key: (64, 64) for key in tiling._table()}
    ep = _export_with(monkeypatch, model, inputs[0], table=table)
    assert liteattn_ops.exported_states(ep)[STATE_NAMES[0]].shape == (1, HEADS, 5, 1)
    torch.export.save(ep, tmp_path / "old.pt2")
    with pytest.raises(lx.ProgramMismatchError, match=rf"'blocks.0.attn.state' was exported with 64x64 tiles .* uses {BM}x{BN}.*Re-export"):
        liteattn_ops.load(tmp_path / "old.pt2")
    module = torch.export.load(tmp_path / "old.pt2").module()
    with torch.no_grad(), pytest.raises(ValueError, match=r"state of shape \(1, 2, 5, 1\) does not match"):
        module(*inputs[0])


def test_load_rejects_program_with_other_format_version(monkeypatch, inputs, tmp_path):
    ep = _export_with(monkeypatch, make_model(), inputs[0], version=lx.FORMAT_VERSION + 1)
    torch.export.save(ep, tmp_path / "future.pt2")
    with pytest.raises(lx.ProgramMismatchError, match=f"format version {lx.FORMAT_VERSION + 1}.*format version {lx.FORMAT_VERSION}"):
        liteattn_ops.load(tmp_path / "future.pt2")
    plain = torch.export.export(nn.Linear(4, 4), (torch.randn(2, 4),))
    with pytest.raises(lx.ProgramMismatchError, match="no liteattn_ops record"):
        liteattn_ops.check_program(plain)


# ------------------------------------------------------------------------------------------------
# AOTInductor
# ------------------------------------------------------------------------------------------------

def _fast_cpu_configs() -> dict:
    """Lower the C++ optimisation level of the generated wrapper: the 2-core CI compiles faster."""
    configs = {}
    if hasattr(torch._inductor.config.aot_inductor, "compile_wrapper_opt_level"):
        configs["aot_inductor.compile_wrapper_opt_level"] = "O0"
    return configs


def test_aoti_package_runs_op_and_keeps_state(program, inputs, eager, tmp_path, monkeypatch, aoti_loads):
    """The package calls the op through the dispatcher (the CPU reference runs), its skip states
    evolve exactly as the eager model's, reset() works in place, and bad inputs are refused."""
    liteattn_ops.reset_program(program)
    path = liteattn_ops.aoti_compile_and_package(program, package_path=tmp_path / "model_aoti.pt2",
                                                 inductor_configs=_fast_cpu_configs())
    runner = liteattn_ops.aoti_load_package(path)
    assert sorted(runner.states) == STATE_NAMES
    assert json.loads(runner.compiled.get_metadata()["liteattn_ops"])["states"][1]["site"] == "blocks.1.attn"

    calls = []
    real = reference.sparse_attention_reference
    monkeypatch.setattr(reference, "sparse_attention_reference", lambda *a, **k: calls.append(1) or real(*a, **k))
    outs, states = eager
    with torch.no_grad():
        for i, args in enumerate(inputs):
            torch.testing.assert_close(runner(*args), outs[i], rtol=1e-5, atol=1e-5)
            for name in STATE_NAMES:
                assert torch.equal(runner.states[name], states[i][name]), (i, name)
    assert len(calls) == 2 * len(inputs)                    # two sites, through the dispatcher
    fractions = runner.live_fraction()
    assert sorted(fractions) == STATE_NAMES and float(fractions[STATE_NAMES[0]]) < 1

    ptrs = [s.data_ptr() for s in runner.states.values()]
    runner.reset()
    assert [s.data_ptr() for s in runner.states.values()] == ptrs
    assert all(bool((s == -1).all()) for s in runner.states.values())
    with torch.no_grad():
        torch.testing.assert_close(runner(*inputs[0]), outs[0], rtol=1e-5, atol=1e-5)

    x, t = inputs[0]
    with pytest.raises(ValueError, match=r"tensor input 0 is \(1, 200, 128\).*exported for \(1, 300, 128\)"):
        runner(x[:, :200], t)
    with pytest.raises(ValueError, match="float64"):
        runner(x.double(), t)

    # The runner's extras: per-head live fractions, its states through the generic helpers.
    with torch.no_grad():
        runner(*inputs[0])
        runner(*inputs[1])
    per_head = runner.live_fraction(per_head=True)
    overall = runner.live_fraction()
    for name in STATE_NAMES:
        assert per_head[name].shape == (HEADS,)
        torch.testing.assert_close(per_head[name].mean(), overall[name])
        expected = liteattn_ops.live_mask(runner.states[name], SEQ, 64, torch.float32).float().mean((0, 2, 3))
        assert torch.equal(per_head[name], expected)
    assert liteattn_ops.exported_states(runner) == runner.states
    assert lx.program_metadata(runner) is runner.metadata
    liteattn_ops.reset_program(runner)
    assert [s.data_ptr() for s in runner.states.values()] == ptrs and all(bool((s == -1).all()) for s in runner.states.values())
    with pytest.raises(ValueError, match="this package takes 2 tensor inputs, got 1"):
        runner(x)

    def rewrite(name, change):
        """A copy of the package with its liteattn_ops record changed (None: removed)."""
        out = tmp_path / name
        with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w") as dst:
            for item in src.infolist():
                data = src.read(item)
                if item.filename.endswith("_metadata.json"):
                    metadata = json.loads(data)
                    record = change(json.loads(metadata.pop("liteattn_ops")))
                    if record is not None:
                        metadata["liteattn_ops"] = json.dumps(record)
                    data = json.dumps(metadata).encode()
                dst.writestr(item, data)
        return out

    # A package whose record says another format version is refused at load.
    future = rewrite("future_aoti.pt2", lambda rec: {**rec, "format_version": lx.FORMAT_VERSION + 1})
    with pytest.raises(lx.ProgramMismatchError, match=f"has format version {lx.FORMAT_VERSION}"):
        liteattn_ops.aoti_load_package(future)
    # ... and so is one without a record, and one whose record names a state the model lacks.
    with pytest.raises(lx.ProgramMismatchError, match="carries no liteattn_ops record.*aoti_compile_and_package"):
        liteattn_ops.aoti_load_package(rewrite("plain_aoti.pt2", lambda rec: None))
    ghost = lambda rec: {**rec, "states": rec["states"] + [{**rec["states"][0], "state": "blocks.9.attn.state"}]}
    with pytest.raises(lx.ProgramMismatchError, match=r"no constants \['blocks.9.attn.state'\]"):
        liteattn_ops.aoti_load_package(rewrite("ghost_aoti.pt2", ghost))


def test_aoti_and_state_helpers_refuse_what_they_cannot_use(tmp_path):
    """Errors of the export helpers that need no compilation."""
    plain = torch.export.export(nn.Linear(4, 4), (torch.randn(2, 4),))
    with pytest.raises(lx.ProgramMismatchError, match="no liteattn_ops record"):
        liteattn_ops.aoti_compile_and_package(plain, package_path=tmp_path / "never.pt2")
    assert not (tmp_path / "never.pt2").exists()
    with pytest.raises(TypeError, match="expected an ExportedProgram, a module from ep.module"):
        liteattn_ops.exported_states(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no liteattn skip states found"):
        liteattn_ops.reset_program(plain)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        liteattn_ops.export(lambda x: x, (torch.randn(2),))
    with pytest.raises(TypeError, match="args must be a tuple"):
        liteattn_ops.export(make_model(), [torch.randn(1, SEQ, DIM), torch.tensor([1.0])])


# ------------------------------------------------------------------------------------------------
# CUDA: the same flow with the Hopper kernel
# ------------------------------------------------------------------------------------------------

@pytest.mark.cuda
def test_cuda_export_save_load_aoti(tmp_path, aoti_loads):
    """export -> ep.module() -> .pt2 in a fresh process -> AOTInductor, bf16 on the GPU: every
    stage gives the eager model's outputs; the exported program's skip states follow eager's
    exactly; the AOTInductor package's states evolve (only shrink, drop tiles after the first
    call) and equal eager's but for at most one tile per state and call (its fused kernels may
    round differently, and a tile right at the threshold may then go the other way)."""
    model = make_model().to("cuda", torch.bfloat16)
    inputs = [(x.to("cuda", torch.bfloat16), t.to("cuda", torch.bfloat16)) for x, t in make_inputs()]
    outs, states = eager_run(model, inputs)

    def live_fraction(step_states):
        return float(torch.cat([liteattn_ops.live_mask(s, SEQ, 64, torch.bfloat16).flatten()
                                for s in step_states.values()]).float().mean())

    live = [live_fraction(step) for step in states]
    assert live[-1] < 1.0 and len(set(live)) > 1, f"the eager bf16 model's states do not evolve: {live}"

    program = liteattn_ops.export(model, inputs[0])
    assert all(t.is_cuda for t in liteattn_ops.exported_states(program).values())
    module = program.module()
    module_states = liteattn_ops.exported_states(module)
    with torch.no_grad():
        for i, args in enumerate(inputs):
            torch.testing.assert_close(module(*args), outs[i], rtol=0, atol=0)
            for name in STATE_NAMES:
                assert torch.equal(module_states[name], states[i][name]), (i, name)

    liteattn_ops.reset_program(program)
    report, fresh_outs, fresh_states, _ = run_in_fresh_process(program, [(args, {}) for args in inputs], tmp_path)
    assert report["modules_after"] == [], report
    for i in range(len(inputs)):
        torch.testing.assert_close(fresh_outs[i], outs[i], rtol=2e-2, atol=2e-2)
        for name in STATE_NAMES:
            assert torch.equal(fresh_states[i][name], states[i][name]), (i, name)

    liteattn_ops.reset_program(program)
    path = liteattn_ops.aoti_compile_and_package(program, package_path=tmp_path / "model_cuda.pt2")
    runner = liteattn_ops.aoti_load_package(path)
    assert all(t.is_cuda for t in runner.states.values())
    previous = {name: torch.ones(1, HEADS, MT, -(-SEQ // BN), dtype=torch.bool, device="cuda") for name in STATE_NAMES}
    runner_live = []
    with torch.no_grad():
        for i, args in enumerate(inputs):
            got = runner(*args)
            torch.testing.assert_close(got, outs[i], rtol=5e-2, atol=5e-2)
            for name in STATE_NAMES:
                mask = liteattn_ops.live_mask(runner.states[name], SEQ, 64, torch.bfloat16)
                want = liteattn_ops.live_mask(states[i][name], SEQ, 64, torch.bfloat16)
                assert not bool((mask & ~previous[name]).any()), f"call {i}, {name}: a removed tile came back"
                differ = int((mask != want).sum())
                assert differ <= 1, f"call {i}, {name}: {differ} tiles differ from the eager model's state"
                previous[name] = mask
            runner_live.append(live_fraction(runner.states))
    assert runner_live[-1] < 1.0 and len(set(runner_live)) > 1, f"the package's states do not evolve: {runner_live}"
    runner.reset()
    assert all(bool((s == -1).all()) for s in runner.states.values())
