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

DIM, HEADS, SEQ = 128, 2, 300        # head_dim 64; 128x128 tiles -> Mt = Nt = 3
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
    assert meta["states"][0]["tile"] == [128, 128] and meta["states"][0]["state_shape"] == [1, HEADS, 3, 1]
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
    assert "liteattn.sparse_attention" in report["without_import"] + stderr, (report, stderr[-2000:])
    expected_outs, expected_states = eager
    for i in range(len(inputs)):
        torch.testing.assert_close(outs[i], expected_outs[i], rtol=0, atol=0)
        for name in STATE_NAMES:
            assert torch.equal(states[i][name], expected_states[i][name]), (i, name)


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
    with pytest.raises(lx.ProgramMismatchError, match=r"'blocks.0.attn.state' was exported with 64x64 tiles .* uses 128x128.*Re-export"):
        liteattn_ops.load(tmp_path / "old.pt2")
    module = torch.export.load(tmp_path / "old.pt2").module()
    with torch.no_grad(), pytest.raises(ValueError, match=r"state of shape \(1, 2, 5, 1\) does not match"):
        module(*inputs[0])


def test_load_rejects_program_with_other_format_version(monkeypatch, inputs, tmp_path):
    ep = _export_with(monkeypatch, make_model(), inputs[0], version=lx.FORMAT_VERSION + 1)
    torch.export.save(ep, tmp_path / "future.pt2")
    with pytest.raises(lx.ProgramMismatchError, match="format version 2.*format version 1"):
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

    # A package whose record says another format version is refused at load.
    future = tmp_path / "future_aoti.pt2"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(future, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("_metadata.json"):
                metadata = json.loads(data)
                record = json.loads(metadata["liteattn_ops"])
                metadata["liteattn_ops"] = json.dumps({**record, "format_version": lx.FORMAT_VERSION + 1})
                data = json.dumps(metadata).encode()
            dst.writestr(item, data)
    with pytest.raises(lx.ProgramMismatchError, match="format version 2"):
        liteattn_ops.aoti_load_package(future)


# ------------------------------------------------------------------------------------------------
# CUDA: the same flow with the Hopper kernel
# ------------------------------------------------------------------------------------------------

@pytest.mark.cuda
def test_cuda_export_save_load_aoti(tmp_path, aoti_loads):
    """export -> ep.module() -> .pt2 in a fresh process -> AOTInductor, bf16 on the GPU: every
    stage gives the eager model's outputs; the exported program's skip states follow eager's
    exactly, the AOTInductor package's are compared and printed (its fused kernels may round
    differently, and a tile right at the threshold may then go the other way)."""
    model = make_model().to("cuda", torch.bfloat16)
    inputs = [(x.to("cuda", torch.bfloat16), t.to("cuda", torch.bfloat16)) for x, t in make_inputs()]
    outs, states = eager_run(model, inputs)
    live = [round(float(torch.cat([liteattn_ops.live_mask(s, SEQ, 64, torch.bfloat16).flatten()
                                   for s in step.values()]).float().mean()), 3) for step in states]
    print(f"\neager live fraction per call: {live}")

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
    for i in range(len(inputs)):
        torch.testing.assert_close(fresh_outs[i], outs[i], rtol=2e-2, atol=2e-2)
    same = [all(torch.equal(fresh_states[i][n], states[i][n]) for n in STATE_NAMES) for i in range(len(inputs))]
    print(f"fresh process: outputs match, states equal per call: {same}")
    assert all(same)

    liteattn_ops.reset_program(program)
    path = liteattn_ops.aoti_compile_and_package(program, package_path=tmp_path / "model_cuda.pt2")
    runner = liteattn_ops.aoti_load_package(path)
    assert all(t.is_cuda for t in runner.states.values())
    diffs, same = [], []
    with torch.no_grad():
        for i, args in enumerate(inputs):
            got = runner(*args)
            torch.testing.assert_close(got, outs[i], rtol=5e-2, atol=5e-2)
            diffs.append(float((got.float() - outs[i].float()).abs().max()))
            same.append(all(torch.equal(runner.states[n], states[i][n]) for n in STATE_NAMES))
    fractions = {k: round(float(v), 3) for k, v in runner.live_fraction().items()}
    print(f"AOTInductor: max |out - eager| per call {diffs}; states equal per call {same}; live {fractions}")
    runner.reset()
    assert all(bool((s == -1).all()) for s in runner.states.values())
