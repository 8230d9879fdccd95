"""Sequence parallelism (liteattn_ops.parallel) on CPU: 2 and 4 processes with the gloo backend.

One spawn per world size runs every scenario (process start-up and imports dominate on a 2-core
CI machine); each rank saves what it computed, and this process, which never initialises
torch.distributed, checks it against single-process runs of the same inputs and weights:
outputs within float tolerance, every rank's skip states bit-identical to the matching heads of
the single-process states, over several consecutive calls in which tiles are actually dropped.
The processes rendezvous through a FileStore in tmp_path (no TCP port to pick) and are killed if
they outlive TIMEOUT_S.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.multiprocessing as mp

import liteattn_ops
from liteattn_ops.testing import local_qkv

TIMEOUT_S = 240
STEPS = 4

# Standalone op: 4 heads of 64 over a 4x8x32 token grid (1024 tokens, 8 tiles of 128), local attention.
GRID, HEADS, HEAD_DIM = (4, 8, 32), 4, 64
SEQ = GRID[0] * GRID[1] * GRID[2]
THRESHOLDS = [-4.0, -8.0, -6.0, -3.0]   # per head: each head drops a different number of tiles

# Wan: 4 heads of 64, latents (1, 4, 1, 32, 64) -> 512 tokens (patch 1x2x2).
WAN_LATENTS = (1, 4, 1, 32, 64)
WAN_HEADS = 4
WAN_GAINS = [2.0, 2.5, 3.0, 4.0]
WAN_THRESHOLDS = [-3.0, -3.0, -4.0, -2.0]


# ------------------------------------------------------------------------------------------------
# Inputs and models shared by the ranks and the single-process reference
# ------------------------------------------------------------------------------------------------

def standalone_inputs(heads=HEADS):
    """q, k, v per step: local attention that sharpens from step to step (as denoising does), so
    every call drops more tiles."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = local_qkv(GRID, 1, heads, HEAD_DIM, sharpness=20.0, generator=gen)
    return [(q * (1 + 0.3 * step) + 0.05 * step * torch.randn(q.shape, generator=gen), k, v) for step in range(STEPS)]


def tiny_wan(heads=WAN_HEADS):
    """A 2-layer diffusers Wan whose self-attention is local by construction: q and k are nearly
    constant over tokens (tiny projection weights, a shared bias, to_k tied to to_q plus noise),
    so the score is RoPE's kernel of the relative position; per-head norm gains vary the
    sharpness so each head drops a different number of tiles."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=64,
                                  in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2,
                                  rope_max_seq_len=64).eval()
    gains = torch.tensor((WAN_GAINS * heads)[:heads]).repeat_interleave(64)
    with torch.no_grad():
        for block in model.blocks:
            attn = block.attn1
            attn.to_q.weight.mul_(0.05)
            attn.to_q.bias.normal_()
            attn.to_k.weight.copy_(attn.to_q.weight + 0.01 * torch.randn_like(attn.to_q.weight))
            attn.to_k.bias.copy_(attn.to_q.bias)
            attn.norm_q.weight.copy_(gains)
            attn.norm_k.weight.copy_(gains)
    return model


def wan_inputs():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(WAN_LATENTS, generator=gen)
    text = torch.randn(1, 8, 32, generator=gen)
    return [(x + 0.1 * step * torch.randn(x.shape, generator=gen), torch.tensor([500]), text) for step in range(STEPS)]


def wan_states(model) -> dict[str, torch.Tensor]:
    """{routed module: its self-attention state} (one state per site here)."""
    from liteattn_ops.routing.router import routed_sites

    out = {}
    for name, site in routed_sites(model):
        states = list(site.states().values())
        if states:
            assert len(states) == 1, (name, list(site.states()))
            out[name] = states[0].clone()
    return out


def wan_cp_plan(model):
    # Wan's plan also splits a per-token (Wan2.2) timestep; with Wan2.1's (B,) timestep diffusers
    # 0.42 would log through `logger.warning_once`, which only exists once transformers is imported.
    return {key: value for key, value in model._cp_plan.items() if key}


# ------------------------------------------------------------------------------------------------
# What each rank runs
# ------------------------------------------------------------------------------------------------

def _error(fn) -> str:
    try:
        fn()
    except (ValueError, TypeError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def _shard(t, rank, world):
    s = t.shape[2] // world
    return t[:, :, rank * s:(rank + 1) * s].contiguous()


def rank_standalone(rank, world, functional=True):
    from liteattn_ops.parallel import UlyssesLiteAttention, ulysses_attention

    res = {"outputs": [], "lse": [], "states": [], "fn_outputs": [], "fn_states": []}
    attn = UlyssesLiteAttention(threshold=THRESHOLDS)              # one value per head: sliced per rank
    site = liteattn_ops.LiteAttention(threshold=-6.0)               # functional form, scalar threshold
    with torch.no_grad():
        for q, k, v in standalone_inputs():
            local = [_shard(t, rank, world) for t in (q, k, v)]
            out, lse = attn(*local, return_lse=True)
            res["outputs"].append(out.clone())
            res["lse"].append(lse.clone())
            res["states"].append(attn.state.clone())
            if functional:
                res["fn_outputs"].append(ulysses_attention(*local, site).clone())
                res["fn_states"].append(site.state.clone())
    res["head_range"] = attn.head_range
    res["threshold_local"] = attn.threshold_per_head.tolist()
    # the model-level API sees the module; a threshold for every head is sliced in place
    liteattn_ops.set_threshold(torch.nn.Sequential(attn), THRESHOLDS[::-1])
    res["threshold_reset"] = attn.threshold_per_head.tolist()
    res["out_strides"] = out.stride()
    return res


def rank_standalone_compiled(rank, world):
    """fullgraph torch.compile of the module (Dynamo + AOT, no Inductor: quick on CPU)."""
    from liteattn_ops.parallel import UlyssesLiteAttention

    torch._dynamo.reset()
    res = {"outputs": [], "states": []}
    attn = UlyssesLiteAttention(threshold=THRESHOLDS)
    compiled = torch.compile(attn, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for q, k, v in standalone_inputs():
            res["outputs"].append(compiled(*(_shard(t, rank, world) for t in (q, k, v))).clone())
            res["states"].append(attn.state.clone())
    return res


def rank_bad_configs(rank, world):
    import torch.distributed as dist

    from liteattn_ops.parallel import UlyssesLiteAttention, ulysses_attention

    res = {}
    q, k, v = standalone_inputs()[0]
    local = [_shard(t, rank, world) for t in (q, k, v)]
    with torch.no_grad():
        # heads not divisible by P (checked before any communication: every rank raises)
        odd = [torch.cat([t, t[:, :1]], 1) for t in local]       # HEADS + 1 = 5 heads
        attn = UlyssesLiteAttention()
        res["heads"] = _error(lambda: attn(*odd))
        res["heads_states_after"] = len(attn.states())
        # shards of unequal length (a group mismatch): rank 0 passes its whole shard, the others 64 tokens
        uneven = [t[:, :, :64].contiguous() if rank else t for t in local]
        attn = UlyssesLiteAttention()
        res["uneven"] = _error(lambda: attn(*uneven))
        res["uneven_states_after"] = len(attn.states())
        # a group this rank is not in (every rank creates it; only the outsiders call)
        group = dist.new_group([0])
        if rank != 0:
            res["not_member"] = _error(lambda: UlyssesLiteAttention(group=group)(*local))
        else:   # P = 1 over gloo: the same code path, the whole sequence on one rank
            single = UlyssesLiteAttention(threshold=THRESHOLDS, group=group)
            res["p1_out"] = single(q, k, v).clone()
            res["p1_state"] = single.state.clone()
        res["threshold_count"] = _error(lambda: UlyssesLiteAttention(threshold=[-8.0] * 5)(*local))
        res["site_type"] = _error(lambda: ulysses_attention(*local, site=torch.nn.Identity()))
    dist.barrier()
    return res


def rank_wan(rank, world, order):
    """A tiny Wan under diffusers' Ulysses: enable() before or after enable_parallelism()."""
    from diffusers import ContextParallelConfig

    from liteattn_ops.parallel import rank_threshold

    model = tiny_wan()
    config = ContextParallelConfig(ulysses_degree=world)
    # One threshold per head of the whole model: each rank's sites keep their heads' values.
    if order == "enable_first":
        liteattn_ops.enable(model, threshold=WAN_THRESHOLDS)
        model.enable_parallelism(config=config, cp_plan=wan_cp_plan(model))
    else:
        model.enable_parallelism(config=config, cp_plan=wan_cp_plan(model))
        liteattn_ops.enable(model, threshold=WAN_THRESHOLDS)
    res = {"outputs": [], "states": [], "rank_threshold": rank_threshold(model, WAN_THRESHOLDS)}
    with torch.no_grad():
        for x, t, text in wan_inputs():
            res["outputs"].append(model(x, t, text, return_dict=False)[0].clone())
            res["states"].append(wan_states(model))
    res["site_thresholds"] = {name: site.threshold_per_head.tolist()
                              for name, site in liteattn_ops.attention_sites(model) if site.threshold_per_head is not None}
    return res


def rank_wan_refused(rank, world):
    from diffusers import ContextParallelConfig

    res = {}
    x, t, text = wan_inputs()[0]
    with torch.no_grad():
        model = tiny_wan()
        liteattn_ops.enable(model)
        model.enable_parallelism(config=ContextParallelConfig(ring_degree=world), cp_plan=wan_cp_plan(model))
        res["ring"] = _error(lambda: model(x, t, text))
        model = tiny_wan(heads=world + 1)
        liteattn_ops.enable(model)
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world), cp_plan=wan_cp_plan(model))
        res["wan_heads"] = _error(lambda: model(x, t, text))
        model = tiny_wan()
        model.set_attention_backend("_native_cudnn")      # (diffusers also makes it the process default)
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world), cp_plan=wan_cp_plan(model))
        liteattn_ops.enable(model)
        res["backend"] = _error(lambda: model(x, t, text))
        model.set_attention_backend("native")
    return res


SCENARIOS = {
    2: [("standalone", rank_standalone, ()), ("compiled", rank_standalone_compiled, ()),
        ("bad", rank_bad_configs, ()), ("wan", rank_wan, ("enable_first",)), ("wan_refused", rank_wan_refused, ())],
    4: [("standalone", rank_standalone, (False,)), ("bad", rank_bad_configs, ()), ("wan", rank_wan, ("parallel_first",))],
}


def _worker(rank, world, store, outdir, names):
    import torch.distributed as dist

    torch.set_num_threads(1)
    # diffusers 0.42 picks the device as rank % torch.accelerator.device_count(), which is 0 on a
    # machine without an accelerator; one CPU "device" is what this test means.
    torch.accelerator.device_count = lambda: 1
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    results = {}
    try:
        for name, fn, args in SCENARIOS[world]:
            if names is None or name in names:
                start = time.perf_counter()
                results[name] = fn(rank, world, *args)
                results.setdefault("seconds", {})[name] = time.perf_counter() - start
    finally:
        torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def _spawn(world, tmp_path, names=None) -> list[dict]:
    outdir = tmp_path / f"world{world}"
    outdir.mkdir()
    context = mp.start_processes(_worker, args=(world, str(tmp_path / f"store{world}"), str(outdir), names),
                                 nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=2):
            if time.monotonic() > deadline:
                pytest.fail(f"{world} gloo processes did not finish within {TIMEOUT_S} s")
    finally:
        for p in context.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(outdir / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module", params=[2, 4], ids=["P2", "P4"])
def ranks(request, tmp_path_factory):
    world = request.param
    return world, _spawn(world, tmp_path_factory.mktemp(f"parallel{world}"))


# ------------------------------------------------------------------------------------------------
# Single-process references
# ------------------------------------------------------------------------------------------------

_REFERENCES = {}


def reference_standalone(threshold):
    key = ("standalone", tuple(threshold) if isinstance(threshold, list) else threshold)
    if key not in _REFERENCES:
        _REFERENCES[key] = _reference_standalone(threshold)
    return _REFERENCES[key]


def _reference_standalone(threshold):
    attn = liteattn_ops.LiteAttention(threshold=threshold)
    outs, lses, states = [], [], []
    with torch.no_grad():
        for q, k, v in standalone_inputs():
            out, lse = attn(q, k, v, return_lse=True)
            outs.append(out)
            lses.append(lse)
            states.append(attn.state.clone())
    return outs, lses, states



def reference_wan(threshold):
    key = ("wan", tuple(threshold) if isinstance(threshold, list) else threshold)
    if key not in _REFERENCES:
        model = tiny_wan()
        liteattn_ops.enable(model, threshold=threshold)
        outs, states = [], []
        with torch.no_grad():
            for x, t, text in wan_inputs():
                outs.append(model(x, t, text, return_dict=False)[0])
                states.append(wan_states(model))
        _REFERENCES[key] = outs, states
    return _REFERENCES[key]


def _live_fraction(state, seqlen=SEQ):
    return float(liteattn_ops.live_mask(state, seqlen, HEAD_DIM, torch.float32).float().mean())


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------

def test_ulysses_module_equals_single_process(ranks):
    world, results = ranks
    outs, lses, states = reference_standalone(THRESHOLDS)
    heads = HEADS // world
    for rank, res in enumerate(results):
        r = res["standalone"]
        assert r["head_range"] == (rank * heads, (rank + 1) * heads)
        assert r["threshold_local"] == THRESHOLDS[rank * heads:(rank + 1) * heads]
        assert r["threshold_reset"] == THRESHOLDS[::-1][rank * heads:(rank + 1) * heads]
        for step in range(STEPS):
            torch.testing.assert_close(r["outputs"][step], _shard(outs[step], rank, world), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(r["lse"][step], _shard(lses[step].unsqueeze(-1), rank, world).squeeze(-1),
                                       rtol=1e-5, atol=1e-5)
            assert torch.equal(r["states"][step], states[step][:, rank * heads:(rank + 1) * heads]), (rank, step)
        # like the op's own output: logical (B, H, S/P, D), memory (B, S/P, H, D)
        assert r["out_strides"] == (SEQ // world * HEADS * HEAD_DIM, HEAD_DIM, HEADS * HEAD_DIM, 1)
    # skipping happened, and kept happening after the first call
    assert _live_fraction(states[-1]) < _live_fraction(states[0]) < 1.0


def test_ulysses_attention_function_equals_single_process(ranks):
    world, results = ranks
    if world != 2:
        pytest.skip("the functional form is checked with 2 processes (the module form with 2 and 4)")
    outs, _, states = reference_standalone(-6.0)
    heads = HEADS // world
    for rank, res in enumerate(results):
        for step in range(STEPS):
            torch.testing.assert_close(res["standalone"]["fn_outputs"][step], _shard(outs[step], rank, world),
                                       rtol=1e-5, atol=1e-5)
            assert torch.equal(res["standalone"]["fn_states"][step], states[step][:, rank * heads:(rank + 1) * heads])
    assert _live_fraction(states[-1]) < 1.0


def test_ulysses_fullgraph_compile(ranks):
    world, results = ranks
    if world != 2:
        pytest.skip("compiled once, with 2 processes")
    outs, _, states = reference_standalone(THRESHOLDS)
    heads = HEADS // world
    for rank, res in enumerate(results):
        for step in range(STEPS):
            torch.testing.assert_close(res["compiled"]["outputs"][step], _shard(outs[step], rank, world),
                                       rtol=1e-5, atol=1e-5)
            assert torch.equal(res["compiled"]["states"][step], states[step][:, rank * heads:(rank + 1) * heads])


def test_ulysses_refuses_bad_configurations(ranks):
    world, results = ranks
    for rank, res in enumerate(results):
        bad = res["bad"]
        assert bad["heads"].startswith("ValueError") and f"{HEADS + 1} heads" in bad["heads"], bad["heads"]
        assert bad["uneven"].startswith("ValueError") and "disagree" in bad["uneven"], bad["uneven"]
        assert f"rank {1 if world > 1 else 0}: q (1, {HEADS}, 64, {HEAD_DIM})" in bad["uneven"], bad["uneven"]
        assert bad["heads_states_after"] == bad["uneven_states_after"] == 0    # a failed call sizes no state
        assert "threshold has 5 values" in bad["threshold_count"], bad["threshold_count"]
        assert bad["site_type"].startswith("TypeError") and "site" in bad["site_type"]
        if rank:
            assert bad["not_member"].startswith("ValueError") and "not a member" in bad["not_member"]
    # P = 1 through the same collective path equals the single-process module
    outs, _, states = reference_standalone(THRESHOLDS)
    torch.testing.assert_close(results[0]["bad"]["p1_out"], outs[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(results[0]["bad"]["p1_state"], states[0])


def test_wan_context_parallel_equals_single_process(ranks):
    world, results = ranks
    outs, states = reference_wan(WAN_THRESHOLDS)   # P2: enable() first; P4: enable_parallelism() first
    heads = WAN_HEADS // world
    for rank, res in enumerate(results):
        wan = res["wan"]
        mine = WAN_THRESHOLDS[rank * heads:(rank + 1) * heads]
        assert wan["rank_threshold"] == mine
        assert wan["site_thresholds"] == {"blocks.0.attn1.liteattn": mine, "blocks.1.attn1.liteattn": mine}
        for step in range(STEPS):
            torch.testing.assert_close(wan["outputs"][step], outs[step], rtol=1e-4, atol=1e-4)
            assert wan["states"][step].keys() == states[step].keys() == {"blocks.0.attn1", "blocks.1.attn1"}
            for name, ref in states[step].items():
                assert torch.equal(wan["states"][step][name], ref[:, rank * heads:(rank + 1) * heads]), \
                    (rank, step, name)
    # tiles were dropped, and more of them after the first step
    live = [sum(_live_fraction(s, 512) for s in step.values()) for step in states]
    assert live[-1] < live[0] < 2.0, live


def test_wan_context_parallel_refusals(ranks):
    world, results = ranks
    if world != 2:
        pytest.skip("checked with 2 processes")
    for res in results:
        refused = res["wan_refused"]
        assert refused["ring"].startswith("ValueError") and "Ulysses only" in refused["ring"], refused["ring"]
        assert refused["backend"].startswith("ValueError") and "'native'" in refused["backend"], refused["backend"]
        assert refused["wan_heads"].startswith("ValueError") and "3 attention heads" in refused["wan_heads"], \
            refused["wan_heads"]
