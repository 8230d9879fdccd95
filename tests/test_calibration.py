"""Calibration (liteattn_ops.calibration): margins against the op, the profile's predictions, the
global allocation (its properties on synthetic curves and on a model), the budget and the cap on a
fresh run, monotonicity in the budget, per-head treatment, the per-site rule, the table file,
set_threshold under compile, and errors for bad tables.

The test model is local by construction: q = k = a scaled random-Fourier-feature embedding of a
3-D token grid (liteattn_ops.testing's construction) plus a small input-dependent part, so the
attention pattern drifts a little from step to step and thresholds really drop tiles; head 0 is
sharp (local), head 1 broad.
"""

from __future__ import annotations

import importlib
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import liteattn_ops
from liteattn_ops.calibration import Profile, ThresholdTable, ThresholdTableError, analyse_call, calibrate, profile
from liteattn_ops.calibration.calibrate import CAP, TOLERANCE, _Curves, _Units, allocate
from liteattn_ops.calibration.margins import next_live, relative_error, threshold_grid
from liteattn_ops.core.state import pack_bits, unpack_bits
from liteattn_ops.testing import local_qkv, token_grid

GRID = (4, 16, 16)          # 1,024 tokens
HEAD_DIM = 64
BM, BN = liteattn_ops.tile_shape(HEAD_DIM, torch.float32)   # the op's tiles (query rows x key columns)


def _tiles(seqlen):
    """(Mt, Nt): query and key tiles of a self-attention call of `seqlen` tokens."""
    return math.ceil(seqlen / BM), math.ceil(seqlen / BN)


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


def make_run(steps=3, batch=1, seed=0, table=None):
    """run(model): a small 'denoising loop' whose attention inputs drift from step to step; with a
    scheduled `table`, applied step by step (a fresh run of that table)."""

    def run(model):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, GRID[0] * GRID[1] * GRID[2], model.dim, generator=g)
        with torch.no_grad():
            for i in range(steps):
                if table is not None:
                    table.apply(model, step=i)
                x = 0.8 * x + 0.2 * torch.tanh(model(x))
        return x

    return run


def measured_errors(model, run, metric="l1", site_errors=None):
    """Run `run(model)` and measure, independently of the calibration code, every call's relative
    error against PyTorch's dense SDPA on the same inputs: {site: [per-call (H,) errors (max over
    the batch)]}, and the final live fraction per site and head. `site_errors`, a dict, receives
    {site: [per-call l1 error of the site's whole output, mean over the batch]}."""
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
            if site_errors is not None:
                whole = (out - dense).abs().sum((1, 2, 3)) / dense.abs().sum((1, 2, 3))
                site_errors.setdefault(name, []).append(float(whole.mean()))

        handles += [site.register_forward_pre_hook(pre), site.register_forward_hook(post)]
    liteattn_ops.reset(model)
    try:
        run(model)
    finally:
        for h in handles:
            h.remove()
    live = {name: site.live_fraction(per_head=True) for name, site in liteattn_ops.attention_sites(model)}
    return errors, live


def site_errors(model, run):
    """{site: [per-call l1 error of the site's whole output against dense SDPA, mean over the batch]}."""
    out = {}
    measured_errors(model, run, site_errors=out)
    return out


BUDGETS = (0.005, 0.02, 0.08)


@pytest.fixture(scope="module")
def calibrated():
    """Global-allocation tables for three budgets from one shared profile pass, and one fresh,
    independently measured run per table."""
    torch.manual_seed(0)
    model = LocalModel()
    run = make_run()
    prof = profile(model, run)
    tables = {b: calibrate(model, run, target_error=b, profile=prof) for b in BUDGETS}
    fresh = {}
    for b, table in tables.items():   # one fresh run per table, measured independently
        liteattn_ops.set_threshold(model, table)
        whole = {}
        fresh[b] = (*measured_errors(model, run, site_errors=whole), whole)
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
    m_tiles, n_tiles = _tiles(q.shape[2])
    live = torch.rand(2, 3, m_tiles, n_tiles, generator=g) < 0.8
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
    m_tiles, n_tiles = _tiles(q.shape[2])
    live = torch.ones(1, 2, m_tiles, n_tiles, dtype=torch.bool)
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

def test_table_keeps_the_budget_and_the_cap_on_a_fresh_run(calibrated):
    """Global allocation: on a fresh run with the table, the mean per-call site error is within
    the budget and every head's per-call error within the cap (cap x budget), both with the stated
    tolerance; the table's own report agrees with the independent measurement."""
    model, run, tables, fresh = calibrated
    for budget, table in tables.items():
        errors, live, site_err = fresh[budget]
        assert set(errors) == set(table.sites)
        assert table.calibration["allocation"] == "global" and table.calibration["cap"] == pytest.approx(CAP * budget)
        for name, per_call in errors.items():
            worst = float(torch.stack(per_call).max())
            assert worst <= TOLERANCE * CAP * budget, (budget, name, worst)
        calls = [e for per_call in site_err.values() for e in per_call]
        assert sum(calls) / len(calls) <= TOLERANCE * budget, (budget, sum(calls) / len(calls))
        if table.calibration["last_pass_is_the_table"]:   # the check pass was this very generation
            assert table.calibration["mean_error"] == pytest.approx(sum(calls) / len(calls), rel=1e-3, abs=1e-6)
            for name, entry in table.sites.items():
                worst = float(torch.stack(errors[name]).max(0).values.max())
                assert max(entry.error_per_head[0]) == pytest.approx(worst, rel=1e-3, abs=1e-6)
                assert entry.error_mean[0] == pytest.approx(sum(site_err[name]) / len(site_err[name]), rel=1e-3,
                                                            abs=1e-6)
    # and it skips: the loosest budget leaves well under all tiles live
    live = fresh[max(tables)][1]
    assert sum(float(f.mean()) for f in live.values()) / len(live) < 0.7
    # on the CPU (float32) the op decides every tile as predicted: nothing was resynced
    assert all(table.calibration["resynced_tiles"] == 0 and table.calibration["resynced_sites"] == []
               for table in tables.values())


def test_shadow_state_follows_the_op_where_its_decisions_differ(monkeypatch):
    """A 16-bit kernel may decide a tile whose margin is within rounding of the threshold otherwise than
    the float32 prediction. The calibration then follows the op's own state (and counts the tiles)
    instead of predicting the next call from a live set the op does not have: here the prediction is
    made wrong on purpose (the diagonal tile of query tile 0, which the op always keeps, predicted
    removed); without the resync the next call's output would not match and calibrate would raise."""
    import importlib

    calibrate_module = importlib.import_module("liteattn_ops.calibration.calibrate")  # the module, not the function
    real = calibrate_module.next_live

    def off_by_one(live, analysis, threshold):
        new = real(live, analysis, threshold).clone()
        new[0, 0, 0, 0] = False
        return new

    monkeypatch.setattr(calibrate_module, "next_live", off_by_one)
    model, run = LocalModel(), make_run()
    table = calibrate(model, run, target_error=0.02)
    assert table.calibration["resynced_tiles"] > 0 and table.calibration["resynced_sites"] == sorted(table.sites)


def test_looser_budget_never_gives_more_live_tiles(calibrated):
    model, run, tables, fresh = calibrated
    live_by_budget, predicted = [], []
    for budget in sorted(tables):
        _, live, _ = fresh[budget]
        live_by_budget.append(sum(float(f.mean()) for f in live.values()) / len(live))
        predicted.append(tables[budget].calibration["allocation_predicted_computed"][-1])
    assert live_by_budget == sorted(live_by_budget, reverse=True), live_by_budget
    assert live_by_budget[0] > live_by_budget[-1]
    assert predicted == sorted(predicted, reverse=True), predicted   # the allocation's own prediction


def test_local_head_skips_broad_head_gets_its_own_threshold(calibrated):
    """Per-head thresholds: the local head (0) drops most tiles; the broad head (1) gets a
    threshold of its own, below the local one. A uniform threshold at the local head's value puts
    the broad head's error above the cap (the max test's cliff)."""
    model, run, tables, fresh = calibrated
    budget = 0.02
    table = tables[budget]
    errors, live, _ = fresh[budget]
    for name, entry in table.sites.items():
        local, broad = entry.thresholds[0]
        assert broad < local
        assert float(live[name][0]) < float(live[name][1])
    uniform = max(entry.thresholds[0][0] for entry in table.sites.values())
    liteattn_ops.set_threshold(model, uniform)
    errors, _ = measured_errors(model, run)
    assert max(float(torch.stack(e)[:, 1].max()) for e in errors.values()) > TOLERANCE * CAP * budget


# ------------------------------------------------------------------------------------------------
# the profile pass and the allocation
# ------------------------------------------------------------------------------------------------

def _open_loop_run(steps=4):
    """A run whose attention inputs drift from call to call but do not depend on the outputs, so
    the dense trajectory and the sparse one see the same inputs."""

    def run(model):
        g = torch.Generator().manual_seed(5)
        x0 = torch.randn(1, GRID[0] * GRID[1] * GRID[2], model.dim, generator=g)
        dx = torch.randn(x0.shape, generator=g)
        with torch.no_grad():
            for t in range(steps):
                model(x0 + 0.3 * t * dx)

    return run


def test_profile_predicts_a_uniform_thresholds_errors_and_tiles():
    """The profile pass (op dense, removal key = running minimum of margins) predicts, for every
    candidate threshold, what a generation with that uniform threshold does: its mean per-call
    site error and its live tiles at the end (here the inputs do not depend on the outputs, so the
    only difference is the op's running max over fewer tiles)."""
    model = LocalModel(depth=1)
    run = _open_loop_run()
    prof = profile(model, run)
    name = "blocks.0.attn"
    c = prof.curves[name][0]
    assert c.calls == 4 and prof.steps == 4
    grid = prof.grid.double()
    for thr in (-8.0, -4.0, -2.0):
        g = int((grid <= thr).sum()) - 1
        liteattn_ops.set_threshold(model, thr)
        errs = site_errors(model, run)[name]
        live = model.blocks[0].attn.live_fraction(per_head=True)
        assert float(c.err_sum[:, g].sum()) / c.calls == pytest.approx(sum(errs) / len(errs), rel=0.05, abs=1e-4), thr
        torch.testing.assert_close(prof.live_end[name][:, g].float(), live.float(), atol=0.03, rtol=0), thr
        assert errs[0] < 1e-5                                  # the first call is exact: nothing gone yet


def _synthetic_profile(curves: dict) -> Profile:
    """A Profile of sites with one head each from {name: (cost (G,), err (G,))} on a short grid."""
    grid = torch.tensor([-math.inf, -8.0, -6.0, -4.0, -2.0, 0.0])
    out = {}
    for name, (cost, err) in curves.items():
        cost, err = torch.tensor(cost, dtype=torch.float64)[None], torch.tensor(err, dtype=torch.float64)[None]
        out[name] = [_Curves(calls=1, cost=cost, err_sum=err, err_max=err, site_max=err[0])]
    return Profile(curves=out, heads={n: 1 for n in curves}, live_end={}, metric="l1", granularity="head",
                   ranges=[[0, None]], grid=grid, wall_s=0.0, analysis_s=0.0, steps=1)


def test_allocation_spends_the_budget_where_it_buys_tiles():
    """The local site removes 60 of its 100 tiles for an error of 0.01; the broad one 10 for 0.03.
    At a goal the local site alone can meet, the broad site gets -inf (it does not eat the budget);
    the per-site rule would have given it a threshold. A looser goal never gives more tiles, the
    cap is never passed, and the predicted mean error stays within the goal."""
    prof = _synthetic_profile({
        "local": ([100, 90, 70, 40, 30, 20], [0, 0.001, 0.004, 0.01, 0.03, 0.1]),
        "broad": ([100, 99, 98, 95, 92, 90], [0, 0.004, 0.01, 0.02, 0.03, 0.1])})
    previous = None
    for goal in (0.002, 0.005, 0.011, 0.02, 0.05, 0.2):
        thr, summary = allocate(prof, goal, cap=1.0, safety=1.0)
        assert summary["predicted_mean_error"] <= goal + 1e-12           # mean over the 2 site calls
        chosen = {n: float(t[0][0]) for n, t in thr.items()}
        if goal == 0.011:
            # local at -4 (60 tiles for 0.01); its next step (-2: 500 tiles per unit error) would pass
            # the goal, and the broad site's best rate (267 per unit error, at -2) is below it
            assert chosen == {"local": -4.0, "broad": -math.inf}
        if previous is not None:
            assert summary["predicted_computed"] <= previous["predicted_computed"]
            assert all(chosen[n] >= previous["chosen"][n] for n in chosen)
        previous = {**summary, "chosen": chosen}
    # a cap of 0.01 per call: no site above it, whatever the goal
    thr, summary = allocate(prof, 1.0, cap=0.01, safety=1.0)
    assert {n: float(t[0][0]) for n, t in thr.items()} == {"local": -4.0, "broad": -6.0}


def test_schedule_ranges_are_non_decreasing_over_the_steps():
    grid_curves = ([100, 90, 70, 40, 30, 20], [0, 0.001, 0.004, 0.01, 0.03, 0.1])
    prof = _synthetic_profile({"a": grid_curves})
    early = _Curves(calls=1, cost=torch.tensor([[100.0, 99, 98, 97, 96, 95]], dtype=torch.float64),
                    err_sum=torch.tensor([[0, 0.0001, 0.0002, 0.0003, 0.0004, 0.0005]], dtype=torch.float64),
                    err_max=torch.zeros(1, 6, dtype=torch.float64), site_max=torch.zeros(6, dtype=torch.float64))
    prof.curves["a"] = [early, prof.curves["a"][0]]
    prof.ranges = [[0, 1], [1, None]]
    thr, _ = allocate(prof, 0.01, cap=1.0, safety=1.0)
    # alone, the early range would take 0 (its errors are tiny) and the late one -4: the early
    # range's prediction assumed its threshold for every step, so it is lowered to the late one's
    first, second = (float(t[0]) for t in thr["a"])
    assert (first, second) == (-4.0, -4.0)


def test_replan_takes_the_spent_error_and_the_floor():
    """_Units.solve for the later ranges: what the earlier ones spent comes off the goal, and no
    unit goes below its floor (the highest threshold its head already used)."""
    curves = ([100, 90, 70, 40, 30, 20], [0, 0.001, 0.004, 0.01, 0.03, 0.1])
    prof = _synthetic_profile({"a": curves})
    prof.curves["a"] = [prof.curves["a"][0], prof.curves["a"][0]]
    prof.ranges = [[0, 1], [1, None]]
    units = _Units(prof)                                   # 2 calls (one per range)
    thr, summary = units.solve(0.01, 1.0, 1.0, first_range=1)
    assert thr["a"][0] is None and float(thr["a"][1][0]) == -4.0        # 0.01 of the 0.02 allowed (-2: 0.03)
    thr, summary = units.solve(0.01, 1.0, 1.0, first_range=1, spent=0.012)
    assert float(thr["a"][1][0]) == -6.0                                # 0.008 left: one step lower
    assert summary["predicted_mean_error"] == pytest.approx((0.012 + 0.004) / 2)
    floor = torch.tensor([0, 4])                           # range 1's head already used grid[4] = -2
    thr, _ = units.solve(0.01, 1.0, 1.0, first_range=1, spent=0.019, floor=floor)
    assert float(thr["a"][1][0]) == -2.0                                # the floor, though over the goal


def test_replan_spends_what_the_earlier_ranges_left():
    """Per-step ranges: the profile's curves take each range's threshold as if applied from the first
    step, so they overstate a rising schedule's error; the check pass re-plans the later ranges from
    the error the earlier ones measurably spent. On fresh runs the re-planned tables stay within the
    budget and the cap, spend more of the budget than the profile's allocation alone, and leave no more
    tiles live (fewer at the loose budget)."""
    steps, schedule = 5, [1, 2, 3, 4]
    model, run = LocalModel(), make_run(steps=steps)
    prof = profile(model, run, schedule=schedule)
    for budget in (0.005, 0.08):
        result = {}
        for replan in (False, True):
            table = calibrate(model, run, target_error=budget, schedule=schedule, profile=prof, replan=replan)
            assert table.calibration["allocation_replans"] == [len(schedule) if replan else 0]
            whole = {}
            errors, live = measured_errors(model, make_run(steps=steps, table=table), site_errors=whole)
            calls = [e for per_call in whole.values() for e in per_call]
            mean = sum(calls) / len(calls)
            assert mean <= TOLERANCE * budget, (budget, replan, mean)
            worst = max(float(torch.stack(per_call).max()) for per_call in errors.values())
            assert worst <= TOLERANCE * CAP * budget, (budget, replan, worst)
            # the check pass ran the final table's trajectory: it measured this very mean
            assert table.calibration["mean_error"] == pytest.approx(mean, rel=1e-3, abs=1e-6)
            if replan:   # the last re-plan's prediction: what was spent plus a pessimistic rest, within the goal
                predicted = table.calibration["allocation_replanned_mean_error"][0]
                assert mean <= predicted + 1e-6 <= 0.8 * budget + 2e-6, (budget, mean, predicted)
            result[replan] = (mean, sum(float(f.mean()) for f in live.values()) / len(live))
        assert result[True][0] >= result[False][0], (budget, result)
        assert result[True][1] <= result[False][1], (budget, result)
    assert result[True][1] < result[False][1] - 0.05, result          # budget 0.08: clearly fewer live


def test_first_range_takes_the_later_ranges_minimum():
    """The first step's calls see nothing removed yet, so their curves are flat in the threshold: the
    range takes the later ranges' minimum (which their predictions already assume from the first step),
    not -inf — otherwise the first step removes nothing and the second computes every tile again."""
    curves = ([100, 90, 70, 40, 30, 20], [0, 0.001, 0.004, 0.01, 0.03, 0.1])
    prof = _synthetic_profile({"a": curves})
    first = _Curves(calls=1, cost=torch.full((1, 6), 100.0, dtype=torch.float64),
                    err_sum=torch.zeros(1, 6, dtype=torch.float64), err_max=torch.zeros(1, 6, dtype=torch.float64),
                    site_max=torch.zeros(6, dtype=torch.float64))
    prof.curves["a"] = [first, prof.curves["a"][0], prof.curves["a"][0]]
    prof.ranges = [[0, 1], [1, 2], [2, None]]
    thr, _ = allocate(prof, 0.01 * 2 / 3, cap=1.0, safety=1.0)   # error sum 0.02 over 3 calls
    assert [float(t[0]) for t in thr["a"]] == [-4.0, -4.0, -4.0]
    thr, _ = allocate(prof, 1e-9, cap=1.0, safety=1.0)            # no budget: -inf everywhere
    assert [float(t[0]) for t in thr["a"]] == [-math.inf] * 3
    # a dense warm-up step after the first (flat too) does the same; a head flat at every range keeps -inf
    prof.curves["a"] = [first, first, prof.curves["a"][1], prof.curves["a"][2]]
    prof.curves["broad"] = [first] * 4
    prof.heads["broad"] = 1
    prof.ranges = [[0, 1], [1, 2], [2, 3], [3, None]]
    thr, _ = allocate(prof, 0.01 * 2 / 5, cap=1.0, safety=1.0)
    assert [float(t[0]) for t in thr["a"]] == [-4.0] * 4
    assert [float(t[0]) for t in thr["broad"]] == [-math.inf] * 4


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
    liteattn_ops.enable(model, threshold=-math.inf, must_do=[(0, BN)])
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
    assert table.calibration["allocation"] == "global"
    assert table.schedule == [[0, 2], [2, None]]
    with pytest.raises(ThresholdTableError, match="per-step"):
        liteattn_ops.set_threshold(model, table)
    names = [n for n, _ in liteattn_ops.attention_sites(model)]
    assert sorted(table.sites) == sorted(names)
    for entry in table.sites.values():
        assert [1, 2, 1024, 1024, 64, "float32"] in entry.shapes and [2, 2, 1024, 1024, 64, "float32"] in entry.shapes
        assert all(e <= TOLERANCE * CAP * budget for e in entry.error)
        assert entry.live_fraction < 1.0
    # the must-do tiles (key tile 0) are never removed
    table.apply(model, step=0)
    liteattn_ops.reset(model)
    run(model)
    for _, site in liteattn_ops.attention_sites(model):
        for name, state in site.states().items():
            assert bool(unpack_bits(state, _tiles(1024)[1])[..., 0].all()), name


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
    with pytest.raises(ValueError, match="allocation"):
        calibrate(model, make_run(), allocation="knapsack")
    with pytest.raises(ValueError, match="cap"):
        calibrate(model, make_run(), cap=0.5)
    with pytest.raises(ValueError, match="passes"):
        calibrate(model, make_run(), passes=1)
    with pytest.raises(ValueError, match="passes"):
        calibrate(model, make_run(), allocation="site", passes=3)
    prof = profile(model, make_run(steps=1))
    with pytest.raises(ValueError, match="another model"):
        calibrate(LocalModel(depth=1), make_run(), profile=prof)
    with pytest.raises(ValueError, match="granularity 'head'"):
        calibrate(model, make_run(), profile=prof, granularity="layer")


def test_site_allocation_keeps_every_site_within_the_budget():
    """allocation="site" (the per-site rule): every head's per-call error within the budget itself
    on a fresh run, and a looser budget no more live tiles."""
    torch.manual_seed(0)
    model, run = LocalModel(), make_run()
    lives = []
    for budget in (0.01, 0.04):
        table = calibrate(model, run, target_error=budget, allocation="site")
        assert table.calibration["allocation"] == "site"
        liteattn_ops.set_threshold(model, table)
        errors, live = measured_errors(model, run)
        for name, per_call in errors.items():
            assert float(torch.stack(per_call).max()) <= TOLERANCE * budget, (budget, name)
        lives.append(sum(float(f.mean()) for f in live.values()) / len(live))
    assert lives[1] < lives[0]


# ------------------------------------------------------------------------------------------------
# the error-aware prototype criterion (simulated; the op implements only the max test)
# ------------------------------------------------------------------------------------------------

def test_mass_criterion_matches_its_definition_literally():
    g = torch.Generator().manual_seed(4)
    q, k, v = local_qkv((2, 16, 16), batch=1, heads=2, head_dim=HEAD_DIM, sharpness=12.0, generator=g)
    m_tiles, n_tiles = _tiles(q.shape[2])
    live = torch.rand(1, 2, m_tiles, n_tiles, generator=g) < 0.9
    a = analyse_call(q, k, v, live, criterion="mass")
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(HEAD_DIM)
    for h in range(2):
        for m in range(m_tiles):
            rows = scores[0, h, m * BM:(m + 1) * BM]
            vis = a.visited[0, h, m]
            p = torch.exp(rows - rows.max(-1, keepdim=True).values).view(rows.shape[0], n_tiles, BN).sum(-1) * vis
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
    assert max(entry.error) <= TOLERANCE * CAP * 0.03 and entry.live_fraction < 1.0
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


# ------------------------------------------------------------------------------------------------
# the command line: --preset wan-small through the demo's pipeline, --write-default beside --checkpoint
# ------------------------------------------------------------------------------------------------

def test_cli_preset_wan_small_writes_the_default_table_beside_the_checkpoint(tmp_path):
    """python -m liteattn_ops.calibration --preset wan-small --checkpoint C --write-default on a tiny
    random WanClassModel: the generation is the demo's WanSmallPipeline (FlowMatchEulerDiscreteScheduler,
    float32 on the CPU), the table lands as <stem>_thresholds.json beside C with C's hash, the demo
    finds it as its default and it applies to the model the demo builds."""
    pytest.importorskip("diffusers")
    import argparse
    import hashlib

    from safetensors.torch import save_file

    from liteattn_ops.calibration.__main__ import main, parse_args
    from liteattn_ops.demo.cli import default_thresholds_file
    from liteattn_ops.demo.models.wan_small import WanClassModel, WanSmallConfig

    assert parse_args([]).preset == "demo-dit"
    torch.manual_seed(0)
    cfg = WanSmallConfig(dim=128, num_heads=2, depth=1, mlp_ratio=1.0, class_tokens=2, freq_dim=16)  # head dim 64
    model = WanClassModel(cfg)
    ckpt = tmp_path / "ckpt" / "tiny_wan.safetensors"
    ckpt.parent.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    ckpt.with_suffix(".json").write_text(json.dumps({"arch": "wan", "model_config": cfg.to_dict()}))

    out = tmp_path / "out"
    rc = main(["--preset", "wan-small", "--checkpoint", str(ckpt), "--frames", "2", "--resolution", "32x32",
               "--steps", "2", "--budget", "0.05", "--write-default", "--out", str(out)])
    assert rc == 0
    default = ckpt.with_name("tiny_wan_thresholds.json")
    assert default.is_file() and (out / "thresholds_0.05.json").is_file()
    table = ThresholdTable.load(default)
    assert table.model.endswith("WanClassModel")
    cal = table.calibration
    assert cal["preset"] == "wan-small" and cal["checkpoint"] == "tiny_wan.safetensors"
    assert cal["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert cal["generation"]["dtype"] == "float32" and cal["generation"]["autocast"] is False
    assert sorted(n for n, e in table.sites.items() if e.thresholds is not None) == ["transformer.blocks.0.attn1.liteattn"]
    report = json.loads((out / "report.json").read_text())
    assert report["preset"] == "wan-small" and report["tokens"] == 2 * 8 * 8
    # the demo's default lookup finds it, and it fits the demo's model
    demo_args = argparse.Namespace(preset="wan-small", checkpoint=str(ckpt))
    assert default_thresholds_file(demo_args) == default
    fresh = WanClassModel(cfg)
    liteattn_ops.enable(fresh)
    liteattn_ops.set_threshold(fresh, table)
    # a missing checkpoint is a clear error, not a traceback
    assert main(["--preset", "wan-small", "--checkpoint", str(tmp_path / "none.safetensors"),
                 "--out", str(out)]) == 2


def test_cli_compare_runs_a_scheduled_table_step_by_step(tmp_path, monkeypatch):
    """--compare with --schedule: the fresh generation applies the table's thresholds step by step
    (table.apply(model, step=i) before step i), so a table with several step ranges gets its own
    fresh-run quality and factor like a one-range table."""
    pytest.importorskip("diffusers")
    from safetensors.torch import save_file

    from liteattn_ops.calibration.__main__ import main, parse_args
    from liteattn_ops.demo.models.wan_small import WanClassModel, WanSmallConfig

    assert parse_args(["--steps", "4", "--schedule", "per-step"]).schedule == [1, 2, 3]
    torch.manual_seed(0)
    cfg = WanSmallConfig(dim=128, num_heads=2, depth=1, mlp_ratio=1.0, class_tokens=2, freq_dim=16)
    ckpt = tmp_path / "tiny_wan.safetensors"
    save_file({k: v.contiguous() for k, v in WanClassModel(cfg).state_dict().items()}, str(ckpt))
    ckpt.with_suffix(".json").write_text(json.dumps({"arch": "wan", "model_config": cfg.to_dict()}))
    applied = []
    real_apply = ThresholdTable.apply
    monkeypatch.setattr(ThresholdTable, "apply", lambda self, model, step=None: applied.append(step) or
                        real_apply(self, model, step))
    out = tmp_path / "out"
    rc = main(["--preset", "wan-small", "--checkpoint", str(ckpt), "--frames", "2", "--resolution", "32x32",
               "--steps", "3", "--schedule", "1", "--budget", "0.05", "--compare", "--uniform=-2", "--out", str(out)])
    assert rc == 0
    assert applied == [0, 1, 2]
    (entry,) = json.loads((out / "report.json").read_text())["tables"]
    assert len(ThresholdTable.load(entry["table"]).schedule) == 2
    assert {"psnr_db", "live_end", "computed", "fresh_max_error"} <= set(entry)


def test_cli_several_caps_share_one_profile(tmp_path, monkeypatch):
    """--cap 3,10: one table per cap and budget, each made with its own cap (recorded in the table), from one
    profile pass between them; a bad cap is a usage error."""
    pytest.importorskip("diffusers")
    from safetensors.torch import save_file

    from liteattn_ops.calibration import __main__ as cli
    from liteattn_ops.demo.models.wan_small import WanClassModel, WanSmallConfig

    assert cli.parse_args(["--cap", "3,10"]).caps == [3.0, 10.0] and cli.parse_args([]).caps == [None]
    with pytest.raises(SystemExit):
        cli.parse_args(["--cap", "0"])
    torch.manual_seed(0)
    cfg = WanSmallConfig(dim=128, num_heads=2, depth=1, mlp_ratio=1.0, class_tokens=2, freq_dim=16)
    ckpt = tmp_path / "tiny_wan.safetensors"
    save_file({k: v.contiguous() for k, v in WanClassModel(cfg).state_dict().items()}, str(ckpt))
    ckpt.with_suffix(".json").write_text(json.dumps({"arch": "wan", "model_config": cfg.to_dict()}))
    calibrate_module = importlib.import_module("liteattn_ops.calibration.calibrate")  # the module, not the function

    profiles = []
    real_profile = calibrate_module.profile
    monkeypatch.setattr(calibrate_module, "profile", lambda *a, **k: profiles.append(1) or real_profile(*a, **k))
    out = tmp_path / "out"
    rc = cli.main(["--preset", "wan-small", "--checkpoint", str(ckpt), "--frames", "2", "--resolution", "32x32",
                   "--steps", "2", "--budget", "0.05", "--cap", "3,10", "--out", str(out)])
    assert rc == 0
    caps = {ThresholdTable.load(out / f"thresholds_0.05_cap{c}.json").calibration["cap_factor"] for c in (3, 10)}
    assert caps == {3.0, 10.0}
    assert [e["cap"] for e in json.loads((out / "report.json").read_text())["tables"]] == [3.0, 10.0]
    assert profiles == [1]
