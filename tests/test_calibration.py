"""Calibration (liteattn_ops.calibration): margins against the op, the budget on a fresh run,
monotonicity in the budget, per-head treatment, the table file, set_threshold under compile, and
errors for bad tables.

The test model is local by construction: q = k = a scaled random-Fourier-feature embedding of a
3-D token grid (liteattn_ops.testing's construction) plus a small input-dependent part, so the
attention pattern drifts a little from step to step and thresholds really drop tiles; head 0 is
sharp (local), head 1 broad.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import liteattn_ops
from liteattn_ops.calibration import ThresholdTable, ThresholdTableError, analyse_call, calibrate
from liteattn_ops.calibration.calibrate import TOLERANCE
from liteattn_ops.calibration.margins import next_live, relative_error, threshold_grid
from liteattn_ops.core.state import pack_bits, unpack_bits
from liteattn_ops.testing import local_qkv, token_grid

GRID = (4, 16, 16)          # 1,024 tokens: 8 x 8 tiles of 128
HEAD_DIM = 64


def _features(heads, sharpness, seed):
    """(H, S, D) unit-scale Fourier features whose dot products fall off with grid distance, scaled
    so that near and far tokens differ by about `sharpness[h]` log2 units."""
    g = torch.Generator().manual_seed(seed)
    coords = token_grid(*GRID)
    half = HEAD_DIM // 2
    freqs = torch.randn(heads, 3, half, generator=g) / 2.0
    phase = torch.rand(heads, 1, half, generator=g) * 2 * math.pi
    angles = coords @ freqs + phase
    feats = torch.cat([angles.cos(), angles.sin()], -1) / math.sqrt(half)
    gain = torch.tensor(sharpness).view(-1, 1, 1) / math.log2(math.e) * math.sqrt(HEAD_DIM)
    return feats * gain.sqrt()


class LocalBlock(nn.Module):
    """One attention block over the grid; `attn` is a LiteAttention (the site)."""

    def __init__(self, dim, heads, sharpness, seed, must_do=None):
        super().__init__()
        g = torch.Generator().manual_seed(seed + 100)
        self.heads = heads
        self.register_buffer("base", _features(heads, sharpness, seed))
        self.drift = nn.Parameter(torch.randn(dim, heads * HEAD_DIM, generator=g) * 0.02)
        self.v = nn.Parameter(torch.randn(dim, heads * HEAD_DIM, generator=g) / math.sqrt(dim))
        self.o = nn.Parameter(torch.randn(heads * HEAD_DIM, dim, generator=g) / math.sqrt(heads * HEAD_DIM))
        self.attn = liteattn_ops.LiteAttention(threshold=-math.inf, must_do=must_do)

    def forward(self, x):
        b, s, _ = x.shape
        q = self.base + (x @ self.drift).view(b, s, self.heads, HEAD_DIM).transpose(1, 2)
        v = (x @ self.v).view(b, s, self.heads, HEAD_DIM).transpose(1, 2)
        o = self.attn(q, q, v)
        return x + 0.5 * o.transpose(1, 2).reshape(b, s, -1) @ self.o


class LocalModel(nn.Module):
    def __init__(self, depth=2, dim=32, heads=2, sharpness=(30.0, 10.0), must_do=None):
        super().__init__()
        self.blocks = nn.ModuleList(LocalBlock(dim, heads, sharpness, seed=i, must_do=must_do) for i in range(depth))
        self.dim = dim

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class OtherModel(LocalModel):
    pass


def make_run(steps=3, batch=1, seed=0):
    """run(model): a small 'denoising loop' whose attention inputs drift from step to step."""

    def run(model):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, GRID[0] * GRID[1] * GRID[2], model.dim, generator=g)
        with torch.no_grad():
            for _ in range(steps):
                x = 0.8 * x + 0.2 * torch.tanh(model(x))
        return x

    return run


def measured_errors(model, run, metric="l1"):
    """Run `run(model)` and measure, independently of the calibration code, every call's relative
    error against PyTorch's dense SDPA on the same inputs: {site: [per-call (H,) errors (max over
    the batch)]}, and the final live fraction per site and head."""
    errors = {}
    handles = []
    for name, site in liteattn_ops.attention_sites(model):
        def pre(mod, args, name=name):
            mod._cal_inputs = args[:3]

        def post(mod, args, out, name=name):
            q, k, v = mod._cal_inputs
            dense = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
            out = out.float()
            if metric == "l1":
                err = (out - dense).abs().sum((2, 3)) / dense.abs().sum((2, 3))
            else:
                raise NotImplementedError(metric)
            errors.setdefault(name, []).append(err.amax(0))

        handles += [site.register_forward_pre_hook(pre), site.register_forward_hook(post)]
    liteattn_ops.reset(model)
    try:
        run(model)
    finally:
        for h in handles:
            h.remove()
    live = {name: site.live_fraction(per_head=True) for name, site in liteattn_ops.attention_sites(model)}
    return errors, live


@pytest.fixture(scope="module")
def calibrated():
    torch.manual_seed(0)
    model = LocalModel()
    run = make_run()
    tables = {b: calibrate(model, run, target_error=b) for b in (0.005, 0.02, 0.08)}
    fresh = {}
    for b, table in tables.items():   # one fresh run per table, measured independently
        liteattn_ops.set_threshold(model, table)
        fresh[b] = measured_errors(model, run)
    return model, run, tables, fresh


# ------------------------------------------------------------------------------------------------
# margins: one pass predicts the op
# ------------------------------------------------------------------------------------------------

def _between(values: torch.Tensor, count: int) -> list[float]:
    """Thresholds <= 0 halfway between consecutive distinct finite margins (never on one)."""
    v = torch.unique(values[torch.isfinite(values) & (values < 0)])
    picks = torch.linspace(0, v.numel() - 2, count).round().long()
    return [float((v[i] + v[i + 1]) / 2) for i in picks]


@pytest.mark.parametrize("chunk", [1 << 14, 1 << 24])
def test_margins_predict_exactly_which_tiles_the_op_removes(chunk):
    g = torch.Generator().manual_seed(1)
    q, k, v = local_qkv((3, 10, 30), batch=2, heads=3, head_dim=HEAD_DIM, sharpness=20.0, generator=g)  # 900 tokens
    n_tiles = math.ceil(q.shape[2] / 128)
    live = torch.rand(2, 3, n_tiles, n_tiles, generator=g) < 0.8
    must_do = torch.tensor([[0, 100]], dtype=torch.int32)
    must_skip = torch.tensor([[640, 800]], dtype=torch.int32)
    a = analyse_call(q, k, v, live, must_do=must_do, must_skip=must_skip, chunk_elements=chunk)
    state = pack_bits(live)
    for thr in _between(a.margin, 4) + [-math.inf]:
        threshold = torch.full((3,), thr)
        s = state.clone()
        out, _ = torch.ops.liteattn.sparse_attention(q, k, v, s, threshold, must_do, must_skip, None)
        assert torch.equal(unpack_bits(s, n_tiles), next_live(live, a, threshold)), thr
        torch.testing.assert_close(a.out, out.float(), rtol=1e-5, atol=1e-5)
    # at its margin a tile is removed, just below it is not
    n = a.margin[torch.isfinite(a.margin) & (a.margin < 0)].max()
    for thr, removed in ((float(n), True), (float(torch.nextafter(n, torch.tensor(-math.inf))), False)):
        s = state.clone()
        torch.ops.liteattn.sparse_attention(q, k, v, s, torch.full((3,), thr), must_do, must_skip, None)
        at = (a.margin == n)
        assert bool((~unpack_bits(s, n_tiles))[at].all()) == removed


def test_error_curve_is_the_error_of_the_op_after_removal():
    g = torch.Generator().manual_seed(2)
    q, k, v = local_qkv((2, 16, 16), batch=1, heads=2, head_dim=HEAD_DIM, sharpness=12.0, generator=g)
    n_tiles = q.shape[2] // 128
    live = torch.ones(1, 2, n_tiles, n_tiles, dtype=torch.bool)
    grid = threshold_grid()
    dense, _ = torch.ops.liteattn.attention(q, k, v, None)
    for metric in ("l1", "rmse", "cosine"):
        a = analyse_call(q, k, v, live, metric=metric)
        rel = relative_error(a.err_num, a.err_ref, metric)
        for thr in (-12.0, -6.0, -3.0, -1.0):
            s = pack_bits(live)
            torch.ops.liteattn.sparse_attention(q, k, v, s, torch.full((2,), thr), None, None, None)
            after, _ = torch.ops.liteattn.sparse_attention(q, k, v, s, torch.full((2,), -math.inf), None, None, None)
            d, o = dense.float(), after.float()
            if metric == "l1":
                want = (o - d).abs().sum((2, 3)) / d.abs().sum((2, 3))
            elif metric == "rmse":
                want = ((o - d).square().sum((2, 3)) / d.square().sum((2, 3))).sqrt()
            else:
                want = 1 - (o * d).sum((2, 3)) / (o.norm(dim=(2, 3)) * d.norm(dim=(2, 3)))
            g_index = int((grid <= thr).sum()) - 1
            torch.testing.assert_close(rel[..., g_index], want, rtol=2e-3, atol=2e-5)


# ------------------------------------------------------------------------------------------------
# the budget, monotonicity, heads
# ------------------------------------------------------------------------------------------------

def test_table_keeps_every_site_within_budget_on_a_fresh_run(calibrated):
    model, run, tables, fresh = calibrated
    for budget, table in tables.items():
        errors, live = fresh[budget]
        assert set(errors) == set(table.sites)
        for name, per_call in errors.items():
            worst = float(torch.stack(per_call).max())
            assert worst <= TOLERANCE * budget, (budget, name, worst)
        # the calibration's own last-pass report agrees with the independent measurement
        for name, entry in table.sites.items():
            worst = float(torch.stack(errors[name]).max(0).values.max())
            assert max(entry.error_per_head[0]) == pytest.approx(worst, rel=1e-3, abs=1e-6)
    # and it skips: the loosest budget leaves well under all tiles live
    assert max(float(f[0]) for f in live.values()) < 0.5


def test_looser_budget_never_gives_more_live_tiles(calibrated):
    model, run, tables, fresh = calibrated
    live_by_budget = []
    for budget in sorted(tables):
        _, live = fresh[budget]
        live_by_budget.append(sum(float(f.mean()) for f in live.values()) / len(live))
        for name, entry in tables[budget].sites.items():
            # thresholds themselves are monotone in the budget, head by head
            if budget != min(tables):
                tighter = tables[max(b for b in tables if b < budget)].sites[name].thresholds[0]
                assert all(t >= u for t, u in zip(entry.thresholds[0], tighter)), (budget, name)
    assert live_by_budget == sorted(live_by_budget, reverse=True), live_by_budget
    assert live_by_budget[0] > live_by_budget[-1]


def test_local_head_skips_broad_head_stays_within_budget(calibrated):
    """Per-head thresholds: the local head (0) drops most tiles; the broad head (1) gets a threshold
    of its own, below the local one, and keeps its own error within the budget. A uniform threshold
    at the local head's value would break the broad head's budget (the max test's cliff)."""
    model, run, tables, fresh = calibrated
    budget = 0.02
    table = tables[budget]
    errors, live = fresh[budget]
    for name, entry in table.sites.items():
        local, broad = entry.thresholds[0]
        assert broad < local
        assert float(live[name][0]) < float(live[name][1])
        assert float(torch.stack(errors[name])[:, 1].max()) <= TOLERANCE * budget
    uniform = max(entry.thresholds[0][0] for entry in table.sites.values())
    liteattn_ops.set_threshold(model, uniform)
    errors, _ = measured_errors(model, run)
    assert max(float(torch.stack(e)[:, 1].max()) for e in errors.values()) > TOLERANCE * budget


# ------------------------------------------------------------------------------------------------
# routed models: batch > 1 (cond/uncond in one batch), separate branches, must-do, schedule
# ------------------------------------------------------------------------------------------------

class SdpaBlock(LocalBlock):
    """The same block, calling F.scaled_dot_product_attention (routed by liteattn_ops.enable)."""

    def forward(self, x):
        b, s, _ = x.shape
        q = self.base + (x @ self.drift).view(b, s, self.heads, HEAD_DIM).transpose(1, 2)
        v = (x @ self.v).view(b, s, self.heads, HEAD_DIM).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, q, v)
        return x + 0.5 * o.transpose(1, 2).reshape(b, s, -1) @ self.o


class SdpaModel(LocalModel):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(SdpaBlock(self.dim, 2, (30.0, 10.0), seed=i) for i in range(2))
        for block in self.blocks:
            del block.attn


def test_routed_model_batch_branches_must_do_and_schedule():
    model = SdpaModel()
    liteattn_ops.enable(model, threshold=-math.inf, must_do=[(0, 128)])
    steps = 3

    def run(m):
        g = torch.Generator().manual_seed(3)
        x = torch.randn(2, 1024, m.dim, generator=g)      # batch 2 (e.g. cond + uncond)
        with torch.no_grad():
            for _ in range(steps):
                y = m(x)
                with liteattn_ops.branch(m, "other"):      # a second forward with its own states
                    y2 = m(x[:1])
                x = 0.8 * x + 0.1 * torch.tanh(y) + 0.1 * torch.tanh(y2)
        return x

    budget = 0.03
    table = calibrate(model, run, target_error=budget, schedule=[2])    # 2 forwards per step
    assert table.schedule == [[0, 2], [2, None]]
    with pytest.raises(ThresholdTableError, match="per-step"):
        liteattn_ops.set_threshold(model, table)
    names = [n for n, _ in liteattn_ops.attention_sites(model)]
    assert sorted(table.sites) == sorted(names)
    for entry in table.sites.values():
        assert [1, 2, 1024, 1024, 64, "float32"] in entry.shapes and [2, 2, 1024, 1024, 64, "float32"] in entry.shapes
        assert all(e <= TOLERANCE * budget for e in entry.error)
        assert entry.live_fraction < 1.0
    # the must-do tiles (key tile 0) are never removed
    table.apply(model, step=0)
    liteattn_ops.reset(model)
    run(model)
    for _, site in liteattn_ops.attention_sites(model):
        for name, state in site.states().items():
            assert bool(unpack_bits(state, 8)[..., 0].all()), name


# ------------------------------------------------------------------------------------------------
# the table: file, set_threshold under compile, bad tables
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_save_load_round_trip(calibrated, tmp_path, suffix):
    table = calibrated[2][0.02]
    path = table.save(tmp_path / f"thresholds{suffix}")
    again = ThresholdTable.load(path)
    assert again == table
    if suffix == ".json":
        text = path.read_text()
        assert '"version": 1' in text and '"-inf"' in text or "-inf" not in text


def test_set_threshold_with_a_table_does_not_recompile(calibrated):
    from torch._dynamo.testing import CompileCounterWithBackend

    model, _, tables, _ = calibrated
    x = torch.randn(1, 1024, model.dim)
    liteattn_ops.reset(model)
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with torch.no_grad():
        compiled(x)
        for budget in (0.005, 0.08, 0.02):
            liteattn_ops.set_threshold(compiled, tables[budget])
            compiled(x)
    assert counter.frame_count == 1
    site = model.blocks[0].attn
    assert site.threshold == tables[0.02].sites["blocks.0.attn"].thresholds[0]


def _table_dict(calibrated):
    return json.loads(json.dumps(calibrated[2][0.02].to_dict()))


def test_bad_tables_raise_naming_the_site(calibrated, tmp_path):
    model, _, tables, _ = calibrated
    good = tables[0.02]
    before = [site.threshold for _, site in liteattn_ops.attention_sites(model)]

    with pytest.raises(ThresholdTableError, match="calibrated on .*LocalModel.*not on .*OtherModel"):
        liteattn_ops.set_threshold(OtherModel(), good)

    d = _table_dict(calibrated)
    d["version"] = 99
    with pytest.raises(ThresholdTableError, match="version 99"):
        ThresholdTable.from_dict(d)

    d = _table_dict(calibrated)
    d["sites"]["blocks.1.attn"]["thresholds"][0][1] = 2.0
    with pytest.raises(ThresholdTableError, match=r"site 'blocks.1.attn', range 0, head 1: .*<= 0"):
        ThresholdTable.from_dict(d)

    d = _table_dict(calibrated)
    d["sites"]["blocks.0.attn"]["heads"] = 3
    d["sites"]["blocks.0.attn"]["thresholds"] = [[-5.0, -5.0, -5.0]]
    bad_heads = ThresholdTable.from_dict(d)
    with pytest.raises(ThresholdTableError, match="site 'blocks.0.attn': the table has 3 heads .* 2 heads"):
        liteattn_ops.set_threshold(model, bad_heads)

    d = _table_dict(calibrated)
    d["sites"]["blocks.7.attn"] = d["sites"].pop("blocks.1.attn")
    with pytest.raises(ThresholdTableError, match="site 'blocks.7.attn' of the table is not an attention site"):
        liteattn_ops.set_threshold(model, ThresholdTable.from_dict(d))

    path = tmp_path / "t.json"
    path.write_text('{"format": "something else"}')
    with pytest.raises(ThresholdTableError, match="not a liteattn_ops threshold table"):
        ThresholdTable.load(path)
    # nothing changed on the model
    assert [site.threshold for _, site in liteattn_ops.attention_sites(model)] == before


def test_bad_arguments():
    model = LocalModel(depth=1)
    with pytest.raises(ValueError, match="target_error"):
        calibrate(model, make_run(), target_error=0)
    with pytest.raises(ValueError, match="metric"):
        calibrate(model, make_run(), metric="l2")
    with pytest.raises(ValueError, match="granularity"):
        calibrate(model, make_run(), granularity="token")
    with pytest.raises(ValueError, match="schedule"):
        calibrate(model, make_run(), schedule=[3, 2])
    with pytest.raises(ValueError, match="no LiteAttention sites"):
        calibrate(nn.Linear(2, 2), make_run())


# ------------------------------------------------------------------------------------------------
# the error-aware prototype criterion (simulated; the op implements only the max test)
# ------------------------------------------------------------------------------------------------

def test_mass_criterion_matches_its_definition_literally():
    g = torch.Generator().manual_seed(4)
    q, k, v = local_qkv((2, 16, 16), batch=1, heads=2, head_dim=HEAD_DIM, sharpness=12.0, generator=g)
    n_tiles = q.shape[2] // 128
    live = torch.rand(1, 2, n_tiles, n_tiles, generator=g) < 0.9
    a = analyse_call(q, k, v, live, criterion="mass")
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(HEAD_DIM)
    for h in range(2):
        for m in range(n_tiles):
            rows = scores[0, h, m * 128:(m + 1) * 128]
            vis = a.visited[0, h, m]
            p = torch.exp(rows - rows.max(-1, keepdim=True).values).view(128, n_tiles, 128).sum(-1) * vis
            mass = p / p.sum(-1, keepdim=True)                           # (rows, Nt), over visited tiles
            worst = mass.max(0).values
            removable = [n for n in range(n_tiles) if vis[n] and not (a.margin[0, h, m, n].isinf())]
            total = 0.0
            for n in sorted(removable, key=lambda n: float(worst[n])):
                total += float(worst[n])
                assert float(a.margin[0, h, m, n]) == pytest.approx(math.log2(total), abs=1e-4)
            # the max test's first visited tile is never removed by this criterion either
            assert not vis.any() or len(removable) < int(vis.sum())


def test_mass_criterion_calibration_is_simulated_and_cannot_be_applied():
    model = LocalModel(depth=1)
    run = make_run(steps=3)
    table = calibrate(model, run, target_error=0.03, criterion="mass")
    assert table.calibration["criterion"] == "mass"
    entry = table.sites["blocks.0.attn"]
    assert max(entry.error) <= TOLERANCE * 0.03 and entry.live_fraction < 1.0
    with pytest.raises(ThresholdTableError, match="'mass' criterion"):
        liteattn_ops.set_threshold(model, table)
    with pytest.raises(ValueError, match="criterion"):
        calibrate(model, run, criterion="sum")


def test_export_takes_a_table(calibrated):
    model, _, tables, _ = calibrated
    table = tables[0.08]
    liteattn_ops.set_threshold(model, float("-inf"))
    ep = liteattn_ops.export(model, (torch.randn(1, 1024, model.dim),), thresholds=table)
    assert model.blocks[1].attn.threshold == table.sites["blocks.1.attn"].thresholds[0]
    buffers = {name: t for name, t in ep.named_buffers() if "threshold" in name}
    assert any(t.tolist() == table.sites["blocks.1.attn"].thresholds[0] for t in buffers.values()), buffers
