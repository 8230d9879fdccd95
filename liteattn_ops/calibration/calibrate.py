"""calibrate(model, run): per-site, per-head (optionally per step range) thresholds that keep every
site's per-call attention error within a budget, found in two generations.

The algorithm (README "Calibration" has the why). The default, allocation "global": a profile pass
(the op dense) records every candidate threshold's predicted tiles and errors per site, head and step
range (`_profile_call`); `_Units.solve` allocates the budget where it buys the most tiles; a check pass
runs the table with the per-call cap rule below and, at each new step range, re-plans the ranges not yet
reached from the error already spent (`_replan`). Allocation "site" is the per-call rule alone:

Each pass calls `run(model)` once, with hooks on every attention site. At each call of a site the
hook, before the op runs, analyses the call (`margins.analyse_call`, one pass over the scores):
every visited tile's margin (the smallest threshold at which this call removes it) and, for every
candidate threshold, the error the site's output would have on these inputs if the tiles with
margin <= threshold were gone as well. It takes the largest candidate whose error, and that of
every smaller candidate, stays within `safety * target_error` (for each head and batch element;
with granularity "layer" for the site as a whole), and lowers the current threshold of the call's
step range to it if it is lower (a running minimum: a threshold only ever goes down, so it is
safe for every call seen so far). The site's threshold is set to that value before the op runs,
so the op removes exactly what the table-so-far would remove: the calibration runs on the
trajectory its own thresholds produce, with the skips accumulated from the earlier steps.

Pass 1 starts from 0 (no constraint); pass 2 starts from pass 1's table and runs the same rule.
Where pass 2 lowers nothing, it *is* a generation with the final table, and the errors it
measures (dense attention of the same inputs against the op's output, per call) are the table's
errors; where it lowers a threshold, the generation after that point used larger thresholds than
the final table (it removed at least as much as the table would, tile for tile on its inputs).

The hooks keep their own copy of each state (the live set before each call, updated as the op
updates it: `margins.next_live`) and check after each call that the op's output equals the
predicted one, so a calibration that lost track of a state fails loudly instead of silently. After
each call the copy is then set to the op's own state: a 16-bit kernel can decide a tile whose margin
lies within rounding of the threshold differently from the float32 prediction, and without the resync
that one tile would make the next call's prediction wrong (the resynced tiles are counted and logged).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from ..core.state import live_mask
from ..core.tiling import num_tiles, tile_shape
from ..nn.attention import LiteAttention
from ..nn.model import attention_sites
from .margins import METRICS, analyse_call, next_live, relative_error, threshold_grid
from .table import SiteEntry, ThresholdTable, _model_name, _plain_name

log = logging.getLogger("liteattn_ops")

SAFETY = 0.8          # predictions aim at 0.8 x the budget: room for the drift between steps
GRID_STEP = 1.0 / 16  # candidate thresholds, log2 units
TOLERANCE = 1.25      # stated guarantee: per-call error <= 1.25 x budget (global: x cap) on a run like `run`
CAP = 3.0             # global allocation: no head's per-call error above CAP x target_error
ALLOCATIONS = ("global", "site")


class CalibrationError(RuntimeError):
    """The calibration could not follow a site (its state changed outside the calibration)."""


def _ranges(schedule) -> list[list[Optional[int]]]:
    if schedule is None:
        return [[0, None]]
    if isinstance(schedule, (str, bytes)) or not isinstance(schedule, Sequence):
        raise TypeError(f"schedule must be None or a sequence of step boundaries, e.g. [2, 10], got {schedule!r}")
    bounds = list(schedule)
    if not all(isinstance(b, int) and not isinstance(b, bool) for b in bounds) or \
            any(b <= a for a, b in zip([0] + bounds, bounds)):
        raise ValueError(f"schedule must be increasing step boundaries > 0 (e.g. [2, 10] for steps [0, 2), "
                         f"[2, 10), [10, end)), got {schedule!r}")
    starts = [0] + bounds
    return [[s, e] for s, e in zip(starts, bounds + [None])]


def _roots(model) -> list[tuple[str, nn.Module]]:
    """(prefix, module) of what holds the sites: the model, or a pipeline's nn.Module components."""
    if isinstance(model, nn.Module):
        return [("", model)]
    components = getattr(model, "components", None)
    if not isinstance(components, dict):
        components = vars(model)
    return [(f"{name}.", m) for name, m in components.items() if isinstance(m, nn.Module)]


@dataclass
class _Pending:
    key: tuple
    new_live: Tensor
    out: Tensor
    head_err: Tensor      # (H,) realized per-head error (max over the batch)
    site_err: float
    range_index: int
    site_mean: float = 0.0   # the site's error, mean over the batch
    state: Optional[tuple] = None   # (buffer name, seqlen_k, head_dim, dtype) of the op's state for this call


@dataclass
class _Site:
    name: str
    module: LiteAttention
    root: list                           # [forward count] of the root module, shared
    thresholds: list                     # per range: float64 (H,) tensor, or None before the first call
    root_module: Optional[nn.Module] = None
    heads: Optional[int] = None
    shadows: dict = field(default_factory=dict)     # key -> bool live (B, H, Mt, Nt)
    counts: dict = field(default_factory=dict)      # key -> calls since reset
    pending: list = field(default_factory=list)
    shapes: list = field(default_factory=list)
    calls: list = field(default_factory=list)       # per range
    error: list = field(default_factory=list)       # per range: max site error
    error_per_head: list = field(default_factory=list)
    lowered: bool = False
    analysed_s: float = 0.0
    error_sum: list = field(default_factory=list)   # per range: sum of the per-call site errors
    keys: dict = field(default_factory=dict)        # profile pass: state key -> running min of margins
    profile: list = field(default_factory=list)     # profile pass: per range, a _Curves
    resynced_tiles: int = 0                         # tiles the op decided otherwise than predicted
    used_max: Optional[Tensor] = None               # check pass: (H,) highest threshold used so far


@dataclass
class _Plan:
    """The check pass's re-planning (global allocation): the profile's units, the goal and cap,
    the range planned for last and what each re-plan predicted."""

    units: "_Units"
    goal: float
    cap: float
    safety: float
    planned: int = 0
    summaries: list = field(default_factory=list)


@dataclass
class _Curves:
    """What the profile pass predicts for one site and step range, for every candidate threshold
    (grid index g) applied as one uniform threshold from the start of the generation."""

    calls: int
    cost: Tensor          # float64 (H, G): visited tiles summed over the range's calls and the batch
    err_sum: Tensor       # float64 (H, G): sum over calls of the head's share of the site's error (mean over the batch)
    err_max: Tensor       # float64 (H, G): largest per-call error of the head (over calls and batch elements)
    site_max: Tensor      # float64 (G,): largest per-call error of the site, every head at grid[g]


class _Calibrator:
    def __init__(self, model, *, target_error, metric, granularity, ranges, safety, grid, criterion="max"):
        self.model, self.target, self.metric, self.criterion = model, target_error, metric, criterion
        self.granularity, self.ranges, self.safety, self.grid = granularity, ranges, safety, grid
        self.mode = "check"          # "profile": dense trajectory, curves; "check": the per-call cap rule
        self.plan: Optional[_Plan] = None   # check pass of the global allocation: re-plan at each new range
        self.roots = _roots(model)
        self.sites: dict[str, _Site] = {}
        for prefix, root in self.roots:
            counter = [0]
            for name, module in attention_sites(root):
                full = _plain_name(prefix + name) if prefix else _plain_name(name)
                self.sites[full] = _Site(full, module, counter, [None] * len(ranges), root_module=root)
        if not self.sites:
            raise ValueError(f"{type(model).__name__} has no LiteAttention sites: prepare it with "
                             "liteattn_ops.enable(model) (or build it from LiteAttention modules) before calibrating")

    # -- one pass -------------------------------------------------------------------------------
    def run_pass(self, run: Callable, start: Optional[dict]) -> float:
        for site in self.sites.values():
            site.shadows.clear(); site.counts.clear(); site.pending.clear()
            site.calls = [0] * len(self.ranges)
            site.error = [0.0] * len(self.ranges)
            site.error_per_head = [None] * len(self.ranges)
            site.error_sum = [0.0] * len(self.ranges)
            site.lowered = False
            site.used_max = None
            site.analysed_s = 0.0
            site.root[0] = 0
            site.keys.clear()
            site.profile = [None] * len(self.ranges)
            if start is not None:
                site.thresholds = [None if t is None else t.clone() for t in start[site.name]]
        handles = []
        try:
            seen_roots = set()
            for site in self.sites.values():
                root = site.root_module
                if id(root) not in seen_roots:
                    seen_roots.add(id(root))
                    counter = site.root
                    handles.append(root.register_forward_pre_hook(lambda m, a, c=counter: c.__setitem__(0, c[0] + 1)))
                handles.append(site.module.register_forward_pre_hook(
                    lambda m, a, kw, s=site: self._before(s, a, kw), with_kwargs=True))
                handles.append(site.module.register_forward_hook(
                    lambda m, a, kw, out, s=site: self._after(s, out), with_kwargs=True))
            for _, root in self.roots:
                from ..nn.model import reset

                if any(True for _ in attention_sites(root)):
                    reset(root)
            t0 = time.perf_counter()
            with torch.no_grad():
                run(self.model)
            return time.perf_counter() - t0
        finally:
            for h in handles:
                h.remove()

    def _range_of(self, step: int) -> int:
        for i, (s, e) in enumerate(self.ranges):
            if s <= step and (e is None or step < e):
                return i
        return len(self.ranges) - 1

    def _before(self, site: _Site, args, kwargs):
        site.pending.append(None)
        if kwargs.get("left") is not None or len(args) < 3:   # a call the site leaves to SDPA
            return None
        q, k, v = args[:3]
        if not all(isinstance(t, Tensor) and t.dim() == 4 for t in (q, k, v)):
            return None
        if type(site.module).__name__ == "FlashLiteAttention":   # (B, S, H, D) layout
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if q.shape[2] != k.shape[2] or (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))):
            return None   # cross-attention (routed sites run it dense) / grad mode (left to SDPA)
        try:
            tile_shape(q.shape[-1], q.dtype)
        except (TypeError, ValueError):
            return None
        scale = kwargs.get("scale", args[3] if len(args) > 3 else None)
        batch, heads = q.shape[0], q.shape[1]
        if self.granularity == "head":
            if site.heads is not None and site.heads != heads:
                raise CalibrationError(f"site {site.name!r} is called with {site.heads} and {heads} heads: "
                                       "calibrate it with granularity='layer'")
        site.heads = heads if site.heads is None else site.heads
        if int(site.module.calls) == 0:          # the site was reset (a new video): so are its states
            site.shadows.clear(); site.counts.clear(); site.keys.clear()
        key = (int(kwargs.get("slot", 0)), getattr(site.module, "branch", None), tuple(q.shape), int(k.shape[2]),
               q.dtype, q.device)
        block_m, block_n = tile_shape(q.shape[-1], q.dtype)
        live = site.shadows.get(key)
        if live is None:
            live = torch.ones(batch, heads, num_tiles(q.shape[2], block_m), num_tiles(k.shape[2], block_n),
                              dtype=torch.bool, device=q.device)
        shape = [*map(int, q.shape[:3]), int(k.shape[2]), int(q.shape[3]), str(q.dtype).removeprefix("torch.")]
        if shape not in site.shapes:
            site.shapes.append(shape)

        if self.mode == "profile":
            return self._profile_call(site, key, q, k, v, live, scale)
        t0 = time.perf_counter()
        with torch.autocast(q.device.type, enabled=False):   # the analysis is float32 (inside a bf16 autocast too)
            a = analyse_call(q, k, v, live, must_do=getattr(site.module, "must_do_ranges", None),
                             must_skip=getattr(site.module, "must_skip_ranges", None), scale=scale,
                             metric=self.metric, grid=self.grid, criterion=self.criterion)
        rel = relative_error(a.err_num, a.err_ref, self.metric)                     # (B, H, G)
        rel_site = relative_error(a.err_num.sum(1, keepdim=True), a.err_ref.sum(1, keepdim=True), self.metric)  # (B, 1, G)
        rel_for = rel_site if self.granularity == "layer" else rel
        envelope = torch.cummax(rel_for.amax(0), dim=-1).values                      # (H or 1, G)
        allowed = (envelope <= self.safety * self.target).sum(-1) - 1                # last allowed index
        grid = self.grid.to(allowed.device)
        best = torch.where(allowed >= 0, grid[allowed.clamp_min(0)], -math.inf).double().cpu()
        if self.granularity == "layer":
            best = best.expand(heads).clone()

        r = self._range_of(max(0, site.root[0] - 1))
        if self.plan is not None and r > self.plan.planned:
            self._replan(r)
        warm = site.counts.get(key, 0) < int(getattr(site.module, "warmup_steps", 0) or 0)
        current = site.thresholds[r]
        if not warm:
            new = best if current is None else torch.minimum(current, best)
            if current is not None and bool((new < current).any()):
                site.lowered = True
            site.thresholds[r] = current = new
        used = torch.full((heads,), -math.inf, dtype=torch.float64) if warm or current is None else current
        site.used_max = used.clone() if site.used_max is None else torch.maximum(site.used_max, used)
        values = used.tolist()
        if self.criterion == "mass":   # simulated: the op removes nothing, the hook supplies the output
            values = [-math.inf] * heads
        site.module.threshold = values[0] if self.granularity == "layer" else values
        new_live = next_live(live, a, used.float())
        site.analysed_s += time.perf_counter() - t0
        site.pending[-1] = _Pending(key, new_live, a.out, rel[..., 0].amax(0).cpu(), float(rel_site[..., 0].max()), r,
                                    float(rel_site[..., 0].mean()), _op_state(site, q, k, key))
        return None

    def _replan(self, r: int) -> None:
        """First call of step range r in the check pass: allocate ranges r.. again with the budget the
        earlier ranges left (goal * calls minus the per-call errors they measurably spent), each
        head no lower than the highest threshold it has used so far. The profile's curves assume a
        range's threshold from the first step, so they overstate the error of a schedule that rises
        over the steps; measuring what was spent keeps the budget from going unspent, and the floor
        keeps every remaining prediction on the safe side (earlier steps used no higher threshold).
        Ranges not yet reached are the only ones changed, so the pass stays one generation with the
        final table (apart from what the cap rule lowers)."""
        plan = self.plan
        spent = sum(sum(s.error_sum[:r]) for s in self.sites.values())
        thresholds, summary = plan.units.solve(plan.goal, plan.cap, plan.safety, first_range=r,
                                               floor=plan.units.floor(self.sites), spent=spent)
        for name, s in self.sites.items():
            for r2 in range(r, len(self.ranges)):
                if name in thresholds and thresholds[name][r2] is not None:
                    s.thresholds[r2] = thresholds[name][r2]
        plan.planned = r
        summary["range"] = r
        plan.summaries.append(summary)

    def _profile_call(self, site: _Site, key, q, k, v, live, scale):
        """Profile pass: the op runs dense (threshold -inf); the analysis gets as removal key each
        tile's running minimum margin over the earlier calls, so its error curve is this call's
        error under every uniform candidate threshold with the skips accumulated (see
        margins.analyse_call); the same key counts the tiles each candidate would visit."""
        t0 = time.perf_counter()
        batch, heads = q.shape[0], q.shape[1]
        prev = site.keys.get(key)
        if prev is None:
            prev = torch.full(live.shape, math.inf, device=q.device)
        with torch.autocast(q.device.type, enabled=False):   # the analysis is float32 (inside a bf16 autocast too)
            a = analyse_call(q, k, v, live, must_do=getattr(site.module, "must_do_ranges", None),
                             must_skip=getattr(site.module, "must_skip_ranges", None), scale=scale,
                             metric=self.metric, grid=self.grid, criterion=self.criterion, removal_key=prev)
        rel = relative_error(a.err_num, a.err_ref, self.metric)                     # (B, H, G)
        ref = a.err_ref                                                             # (B, H)
        share = ref / ref.sum(1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        num_site = a.err_num.sum(1, keepdim=True)
        rel_site = relative_error(num_site, a.err_ref.sum(1, keepdim=True), self.metric)[:, 0]  # (B, G)
        grid = self.grid.to(q.device)
        # visited tiles under grid[g]: the tiles whose key is above it (must-skip tiles never)
        flat = prev.masked_fill(a.skip_tiles, -math.inf).flatten(2).sort(-1).values   # (B, H, Mt*Nt)
        gone = torch.searchsorted(flat.contiguous(), grid.expand(batch, heads, -1).contiguous(), right=True)
        cost = (flat.shape[-1] - gone).sum(0).double().cpu()                          # (H, G)
        r = self._range_of(max(0, site.root[0] - 1))
        c = site.profile[r]
        contrib = (share[..., None] * rel).mean(0).double().cpu()
        head_max = rel.amax(0).double().cpu()
        s_max = rel_site.amax(0).double().cpu()
        if c is None:
            site.profile[r] = _Curves(calls=1, cost=cost, err_sum=contrib, err_max=head_max, site_max=s_max)
        else:
            c.calls += 1
            c.cost += cost
            c.err_sum += contrib
            c.err_max = torch.maximum(c.err_max, head_max)
            c.site_max = torch.maximum(c.site_max, s_max)
        warm = site.counts.get(key, 0) < int(getattr(site.module, "warmup_steps", 0) or 0)
        if not warm:   # warm-up calls remove nothing, so they do not lower a key
            site.keys[key] = torch.minimum(prev, a.margin).masked_fill(a.skip_tiles, -math.inf)
        site.module.threshold = -math.inf if self.granularity == "layer" else [-math.inf] * heads
        new_live = next_live(live, a, torch.full((heads,), -math.inf))
        site.analysed_s += time.perf_counter() - t0
        site.pending[-1] = _Pending(key, new_live, a.out, rel[..., 0].amax(0).cpu(), float(rel_site[:, 0].max()), r,
                                    float(rel_site[:, 0].mean()), _op_state(site, q, k, key))
        return None

    def predicted_live_end(self) -> dict:
        """Profile pass: {site: float64 (H, G)}: the fraction of tiles live after the last call under
        each uniform candidate (the mean over the site's states)."""
        out = {}
        for name, s in self.sites.items():
            fractions = []
            grid = self.grid
            for key in s.keys.values():
                flat = key.flatten(2).sort(-1).values
                gone = torch.searchsorted(flat.contiguous(), grid.to(flat.device).expand(*flat.shape[:2], -1).contiguous(),
                                          right=True)
                fractions.append((1.0 - gone.double() / flat.shape[-1]).mean(0).cpu())
            if fractions:
                out[name] = torch.stack(fractions).mean(0)
        return out

    def _after(self, site: _Site, output):
        pending = site.pending.pop() if site.pending else None
        if pending is None or output is None:
            return None
        out = output[0] if isinstance(output, tuple) else output
        if type(site.module).__name__ == "FlashLiteAttention":
            out = out.transpose(1, 2)
        expected = pending.out
        replaced = None
        if self.criterion == "mass":   # the prototype criterion's output replaces the op's
            replaced = expected.to(out.dtype)
            if type(site.module).__name__ == "FlashLiteAttention":
                replaced = replaced.transpose(1, 2)
            if isinstance(output, tuple):
                replaced = (replaced, *output[1:])
            out = expected
        scale = float(expected.abs().max()) or 1.0
        tol = 1e-4 if out.dtype == torch.float32 else 3e-2
        worst = float((out.float() - expected).abs().max()) / scale
        if not worst <= tol:
            raise CalibrationError(
                f"site {site.name!r}: the op's output differs from the calibration's prediction by {worst:.3g} "
                f"(relative; allowed {tol:g}), so the calibration lost track of this site's skip state; was a "
                "threshold, a range or a state of the model changed inside run(model)?")
        site.shadows[pending.key] = self._resync(site, pending)
        site.counts[pending.key] = site.counts.get(pending.key, 0) + 1
        r = pending.range_index
        site.calls[r] += 1
        site.error[r] = max(site.error[r], pending.site_err)
        site.error_sum[r] += pending.site_mean
        prev = site.error_per_head[r]
        site.error_per_head[r] = pending.head_err if prev is None else torch.maximum(prev, pending.head_err)
        return replaced

    def _resync(self, site: _Site, pending: _Pending) -> Tensor:
        """The live set after the call: the op's own state where it can be read (the prediction where
        the op's decisions cannot differ from it, or the mass criterion's simulated state)."""
        if self.criterion == "mass":
            return pending.new_live
        name, seqlen_k, head_dim, dtype = pending.state
        state = site.module.states().get(name)
        if state is None:
            return pending.new_live
        actual = live_mask(state, seqlen_k, head_dim, dtype).to(pending.new_live.device)
        if actual.shape != pending.new_live.shape:
            return pending.new_live
        differ = int((actual != pending.new_live).sum())
        if differ:
            site.resynced_tiles += differ
            log.info("calibration: site %s: the op kept/dropped %d tile(s) otherwise than the float32 prediction "
                     "(margins within rounding of the threshold); following the op's state", site.name, differ)
        return actual

    # -- the result -----------------------------------------------------------------------------
    def snapshot(self) -> dict:
        return {name: [None if t is None else t.clone() for t in s.thresholds] for name, s in self.sites.items()}

    def mean_error(self) -> float:
        """The last pass's mean per-call site error over every site and call."""
        calls = sum(sum(s.calls) for s in self.sites.values())
        return sum(sum(s.error_sum) for s in self.sites.values()) / max(1, calls)

    def table(self, calibration: dict, budget: Optional[float] = None) -> ThresholdTable:
        entries = {}
        for name, s in self.sites.items():
            if s.heads is None:
                entries[name] = SiteEntry(heads=None, thresholds=None)
                continue
            thresholds = []
            for t in s.thresholds:
                values = [-math.inf] * s.heads if t is None else [float(x) for x in t]
                thresholds.append(values[:1] if self.granularity == "layer" else values)
            lives = [m.float() for m in s.shadows.values()]
            per_head = torch.stack([m.mean((0, 2, 3)) for m in lives]).mean(0) if lives else None
            entries[name] = SiteEntry(
                heads=s.heads, thresholds=thresholds, shapes=s.shapes, calls=list(s.calls),
                error=[round(e, 6) for e in s.error],
                error_mean=[round(e / max(1, n), 6) for e, n in zip(s.error_sum, s.calls)],
                error_per_head=[None if e is None else [round(float(x), 6) for x in e] for e in s.error_per_head],
                live_fraction=None if per_head is None else round(float(per_head.mean()), 6),
                live_fraction_per_head=None if per_head is None else [round(float(x), 6) for x in per_head])
        return ThresholdTable(sites=entries, model=_model_name(self.model if isinstance(self.model, nn.Module)
                                                                else self.roots[0][1]),
                              metric=self.metric, target_error=self.target if budget is None else budget,
                              granularity=self.granularity,
                              schedule=[list(r) for r in self.ranges], calibration=calibration)


def _op_state(site: _Site, q: Tensor, k: Tensor, key: tuple) -> tuple:
    """(buffer name, seqlen_k, head_dim, dtype) of the op's skip state for this call ((B, H, S, D) q and k)."""
    return site.module.state_name(q, k, key[0]), int(k.shape[2]), int(q.shape[-1]), q.dtype


@dataclass
class Profile:
    """The profile pass of a calibration (one generation, the op dense): for every site and step
    range, the predicted visited tiles and errors of every candidate threshold (see `_Curves`).
    `calibrate(..., profile=p)` reuses it, so several budgets cost one profile pass between them."""

    curves: dict              # site -> [per range: _Curves or None]
    heads: dict               # site -> heads (None: never calibrated)
    live_end: dict            # site -> float64 (H, G): predicted live fraction after the last call
    metric: str
    granularity: str
    ranges: list
    grid: Tensor
    wall_s: float
    analysis_s: float
    steps: int
    calibrator: object = None   # the _Calibrator that ran it (its hooks and shadow states)


def profile(model, run: Callable, *, metric: str = "l1", granularity: str = "head",
            schedule: Optional[Sequence[int]] = None) -> Profile:
    """One generation of `run(model)` with the op dense and every call analysed (the profile pass of
    `calibrate`); pass the result to `calibrate(..., profile=...)` for one or several budgets."""
    _check_common(metric, granularity, run)
    cal = _Calibrator(model, target_error=1.0, metric=metric, granularity=granularity, ranges=_ranges(schedule),
                      safety=SAFETY, grid=threshold_grid(GRID_STEP))
    return _profile(cal, run)


def _profile(cal: "_Calibrator", run: Callable) -> Profile:
    saved = {name: s.module.threshold for name, s in cal.sites.items()}
    cal.mode = "profile"
    try:
        wall = cal.run_pass(run, None)
        live_end = cal.predicted_live_end()
        analysed = sum(s.analysed_s for s in cal.sites.values())
    finally:
        cal.mode = "check"
        _restore(cal, saved)
    return Profile(curves={n: list(s.profile) for n, s in cal.sites.items()}, heads={n: s.heads for n, s in cal.sites.items()},
                   live_end=live_end, metric=cal.metric, granularity=cal.granularity, ranges=[list(r) for r in cal.ranges],
                   grid=cal.grid, wall_s=wall, analysis_s=analysed, steps=max(s.root[0] for s in cal.sites.values()),
                   calibrator=cal)


def _restore(cal: "_Calibrator", saved: dict) -> None:
    from ..nn.model import reset

    for name, s in cal.sites.items():
        s.module.threshold = saved[name]
    for _, root in cal.roots:
        if any(True for _ in attention_sites(root)):
            reset(root)


class _Units:
    """The global allocation's units (a site's head and step range; granularity "layer": a site and
    range) with the profile's curves stacked: cost, err, emax float64 (U, G)."""

    def __init__(self, prof: Profile):
        self.prof = prof
        self.grid = prof.grid.double().cpu()
        units, costs, errs, maxes = [], [], [], []
        for name, per_range in prof.curves.items():
            for r, c in enumerate(per_range):
                if c is None:
                    continue
                if prof.granularity == "layer":
                    units.append((name, r, None))
                    costs.append(c.cost.sum(0)); errs.append(c.err_sum.sum(0)); maxes.append(c.site_max)
                else:
                    for h in range(c.cost.shape[0]):
                        units.append((name, r, h))
                        costs.append(c.cost[h]); errs.append(c.err_sum[h]); maxes.append(c.err_max[h])
        self.units = units
        self.calls = sum(c.calls for per_range in prof.curves.values() for c in per_range if c is not None)
        if units:
            self.cost, self.err, self.emax = torch.stack(costs), torch.stack(errs), torch.stack(maxes)
            self.total_tiles = float(self.cost[:, 0].sum())
        self.range_of = torch.tensor([r for _, r, _ in units], dtype=torch.long)

    def solve(self, goal: float, cap: float, safety: float, *, first_range: int = 0,
              floor: Optional[Tensor] = None, spent: float = 0.0) -> tuple[dict, dict]:
        """Thresholds for the units of ranges >= first_range (the others get None) minimising their
        predicted visited tiles subject to (spent + their predicted error sum) / calls <= goal, every
        unit's per-call error envelope <= safety * cap, and grid index >= floor (U,) where given.
        Returns ({site: [per range: float64 (H,) or None]}, summary)."""
        prof = self.prof
        out = {name: [None] * len(prof.ranges) for name in prof.curves}
        summary = {"goal": goal, "cap": cap, "lambda": None, "predicted_mean_error": 0.0, "predicted_computed": 1.0}
        if not self.units:
            return out, summary
        sel = self.range_of >= first_range
        cost_n = self.cost[sel] / max(self.total_tiles, 1.0)
        err_n = self.err[sel] / max(self.calls, 1)
        allowed = torch.cummax(self.emax[sel], -1).values <= safety * cap
        allowed[:, 0] = True                                                            # -inf: nothing removed
        if floor is not None:
            low = floor[sel]
            index = torch.arange(self.grid.shape[0])
            allowed &= index >= low[:, None]
            allowed[torch.arange(low.shape[0]), low] = True     # the floor itself, whatever the cap says
        budget = goal - spent / max(self.calls, 1)

        def choose(lam: float) -> Tensor:
            obj = (cost_n + lam * err_n).masked_fill(~allowed, math.inf)
            return obj.argmin(-1)                                                       # first: the lowest g

        def error(g: Tensor) -> float:
            return float(err_n.gather(1, g[:, None]).sum())

        lo, hi = 1e-6, 1e14
        if error(choose(lo)) <= budget:
            lam = lo
        else:
            for _ in range(80):
                mid = math.sqrt(lo * hi)
                if error(choose(mid)) <= budget:
                    hi = mid
                else:
                    lo = mid
            lam = hi
        g = choose(lam)
        # A unit whose own calls cannot be changed by its threshold (flat curves: the first step's range, whose
        # calls see nothing removed yet, and the ranges of dense warm-up steps after it) would take -inf by the
        # tie-break, but its threshold decides what the later calls find removed: it takes the highest
        # candidate, and the non-decreasing pass below lowers it to the later ranges' minimum, which their
        # predictions (made for their thresholds from the first step) already assume. Otherwise those steps
        # remove nothing and the next one computes every tile again. Only such a leading run of flat ranges
        # followed by a range that is not flat: a head with nothing removable on this trajectory keeps -inf
        # rather than a threshold that a fresh run's inputs could make bite.
        if first_range == 0 and len(prof.ranges) > 1:
            flat = ((cost_n == cost_n[:, :1]).all(-1) & (err_n == err_n[:, :1]).all(-1) & allowed.all(-1)).tolist()
            by_head: dict = {}
            for i, (name, r, h) in enumerate(self.units):
                by_head.setdefault((name, h), []).append((r, i))
            lift = torch.zeros_like(g, dtype=torch.bool)
            for ranges in by_head.values():
                ranges.sort()
                lead = 0
                while lead < len(ranges) and flat[ranges[lead][1]]:
                    lead += 1
                if lead < len(ranges):           # a range that is not flat follows
                    for _, i in ranges[:lead]:
                        lift[i] = True
            g = torch.where(lift, torch.full_like(g, self.grid.shape[0] - 1), g)
        chosen = [u for u, s in zip(self.units, sel.tolist()) if s]
        for (name, r, h), gi in zip(chosen, g.tolist()):
            heads = prof.heads[name]
            if out[name][r] is None:
                out[name][r] = torch.full((heads,), -math.inf, dtype=torch.float64)
            if h is None:
                out[name][r].fill_(float(self.grid[gi]))
            else:
                out[name][r][h] = float(self.grid[gi])
        for name, per_range in out.items():                 # non-decreasing over the step ranges
            later = None
            for r in reversed(range(len(per_range))):
                if per_range[r] is None:
                    continue
                later = per_range[r] if later is None else torch.minimum(per_range[r], later)
                per_range[r] = later.clone()
        summary.update(lam=lam, predicted_mean_error=round(spent / max(self.calls, 1) + error(g), 6),
                       predicted_computed=round(float(cost_n.gather(1, g[:, None]).sum()), 6))
        summary["lambda"] = summary.pop("lam")
        return out, summary

    def floor(self, sites: dict) -> Tensor:
        """(U,) grid index of the highest threshold each unit's head (site) has used so far in the pass."""
        values = []
        for name, _, h in self.units:
            used = sites[name].used_max
            values.append(-math.inf if used is None else float(used.max() if h is None else used[h]))
        v = torch.tensor(values, dtype=torch.float64)
        return ((self.grid[None, :] <= v[:, None]).sum(-1) - 1).clamp_min(0)


def allocate(prof: Profile, goal: float, cap: float, *, safety: float = SAFETY) -> tuple[dict, dict]:
    """The global allocation: thresholds that minimise the predicted visited tiles of the whole
    model subject to a predicted mean per-call site error <= goal, every head's (granularity
    "layer": every site's) per-call error <= safety * cap.

    For a multiplier lam, every unit u (a site's head and step range; "layer": a site and range)
    independently takes the candidate g minimising  cost_u[g] / T + lam * err_u[g] / N  among those
    whose cap envelope holds (T: all tiles visited by all calls, N: the number of site calls, so
    sum_u err_u[g_u] / N is the predicted mean per-call site error). A larger lam never gives a
    larger error (the minimiser of a sum with a bigger weight on err has no larger err), so the
    smallest lam with error <= goal is found by bisection on log(lam). Step ranges are allocated
    as units of their own and then made non-decreasing over the steps (each range's threshold
    becomes the minimum of its own and the later ones'), which keeps every range's prediction, made
    for its threshold applied from the first step, on the safe side. (The check pass then re-plans
    the later ranges from what the earlier ones measurably spent: `_Calibrator._replan`.)

    Returns ({site: [per range: float64 (H,) or None]}, summary)."""
    return _Units(prof).solve(goal, cap, safety)


def _check_common(metric, granularity, run):
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if granularity not in ("head", "layer"):
        raise ValueError(f"granularity must be 'head' or 'layer', got {granularity!r}")
    if not callable(run):
        raise TypeError(f"run must be a callable run(model) that performs one generation, got {type(run).__name__}")


def calibrate(model, run: Callable, *, target_error: float = 0.05, metric: str = "l1", granularity: str = "head",
              schedule: Optional[Sequence[int]] = None, allocation: str = "global", cap: float = CAP,
              passes: int = 2, safety: float = SAFETY, criterion: str = "max",
              profile: Optional[Profile] = None, replan: bool = True) -> ThresholdTable:
    """Thresholds for every LiteAttention site of `model` that skip as much as an error budget
    allows. Returns a ThresholdTable (see table.py); README "Calibration" has the algorithm.

    model: a module prepared with liteattn_ops.enable() (or built from LiteAttention modules), or a
        pipeline whose nn.Module components hold the sites. Calibrate the eager model (hooks run in
        eager mode); the table then applies to the compiled one too.
    run: `run(model)` performs one representative generation (the user's denoising loop, or
        `pipe(...)`); it is called `passes` times, with the states reset before each.
    target_error: the budget, in relative error of a site's attention output against dense
        attention on the same inputs, per call, in `metric`: "l1" (sum |O - O_dense| / sum
        |O_dense|), "rmse" (||O - O_dense|| / ||O_dense||) or "cosine" (1 - cos(O, O_dense)),
        per batch element. What it bounds depends on `allocation`:
    allocation: "global" (default): target_error is the *mean* per-call error over all sites and
        calls of the generation (the error the whole model spends; the final video's error is a sum
        over sites and steps), and no head's (granularity "layer": no site's) per-call error
        exceeds cap * target_error. The budget goes where it buys the most skipped tiles: a profile
        pass (the op dense) predicts every candidate threshold's visited tiles and errors, with the
        skips accumulated, for every site, head and step range; a Lagrangian allocation picks the
        thresholds (see `allocate`); a check pass runs the table and lowers any threshold whose call
        would break the cap. "site": the per-call budget of every site and head (the earlier rule):
        every head's per-call error <= target_error, found by a running minimum on the table's own
        trajectory in `passes` passes.
    cap: (allocation "global") the per-call cap as a multiple of target_error.
    granularity: "head" (one threshold per head) or "layer" (one per site).
    schedule: None (one threshold for every step) or step boundaries, e.g. [2, 10]: steps [0, 2),
        [2, 10) and [10, end) get their own thresholds. A step is one forward of `model` (of the
        component that holds the site, for a pipeline).
    passes: "global": 2 (profile + check) or 3 (then the allocation is redone once with its goal
        corrected by the measured/predicted ratio of the check pass, and checked again); "site":
        1 or 2 (the second pass starts from the first's table and verifies it).
    safety: the predictions aim at `safety * target_error` (and `safety * cap * target_error`).
    criterion: "max" (the op's test). "mass" calibrates the error-aware prototype criterion
        (margins.analyse_call) instead, *simulated*: the op runs with threshold -inf and the hook
        replaces its output by the prototype's; such a table is for comparison and cannot be
        applied (the op, the reference and the kernel implement only the max test).
    profile: (allocation "global") a `profile(model, run, ...)` of this model to reuse instead of a
        profile pass of its own (calibrating several budgets then costs one profile pass in all).
    replan: (allocation "global", a schedule of several ranges) at the first call of each step range
        the check pass allocates that range and the later ones again, with the budget the earlier
        ranges left by measurement (see `_Calibrator._replan`); False keeps the profile's allocation
        (only the cap rule changes it).

    The model's thresholds are restored and its states reset afterwards; apply the result with
    `liteattn_ops.set_threshold(model, table)`.
    """
    if isinstance(target_error, bool) or not isinstance(target_error, (int, float)) or \
            not 0 < target_error < math.inf:
        raise ValueError(f"target_error must be a positive number (relative error per call), got {target_error!r}")
    _check_common(metric, granularity, run)
    if criterion not in ("max", "mass"):
        raise ValueError(f"criterion must be 'max' (the op's test) or 'mass' (the simulated prototype), got {criterion!r}")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    if allocation == "global" and passes not in (2, 3):
        raise ValueError(f"passes must be 2 or 3 with allocation='global', got {passes!r}")
    if not isinstance(replan, bool):
        raise TypeError(f"replan must be True or False, got {replan!r}")
    if allocation == "site" and passes not in (1, 2):
        raise ValueError(f"passes must be 1 or 2 with allocation='site', got {passes!r}")
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not 1 <= cap < math.inf:
        raise ValueError(f"cap must be a number >= 1 (a multiple of target_error), got {cap!r}")
    if not 0 < safety <= 1:
        raise ValueError(f"safety must be in (0, 1], got {safety!r}")
    ranges = _ranges(schedule)
    if profile is not None:
        if allocation != "global":
            raise ValueError("profile= is for allocation='global'")
        cal = profile.calibrator
        if cal is None or cal.model is not model:
            raise ValueError("profile= was made on another model: profile(model, run) this model")
        if (profile.metric, profile.granularity, profile.ranges) != (metric, granularity, [list(r) for r in ranges]):
            raise ValueError(f"profile= was made with metric {profile.metric!r}, granularity {profile.granularity!r}, "
                             f"schedule {profile.ranges}; this calibration asks for {metric!r}, {granularity!r}, "
                             f"{[list(r) for r in ranges]}")
        cal.criterion, cal.safety = criterion, safety
    else:
        cal = _Calibrator(model, target_error=float(target_error), metric=metric, granularity=granularity,
                          ranges=ranges, safety=safety, grid=threshold_grid(GRID_STEP), criterion=criterion)
    saved = {name: s.module.threshold for name, s in cal.sites.items()}
    for s in cal.sites.values():
        s.resynced_tiles = 0
    walls, lowered, allocations = [], [], []
    t_start = time.perf_counter()
    try:
        if allocation == "site":
            cal.target = float(target_error)
            start = None
            for _ in range(passes):
                walls.append(cal.run_pass(run, start))
                lowered.append(sorted(name for name, s in cal.sites.items() if s.lowered))
                start = cal.snapshot()
        else:
            cap_abs = float(cap) * float(target_error)
            prof = profile if profile is not None else _profile(cal, run)
            if profile is None:
                walls.append(prof.wall_s)
            goal = safety * float(target_error)
            cal.mode, cal.target = "check", cap_abs
            units = _Units(prof)
            for attempt in range(passes - 1):
                thresholds, summary = units.solve(goal, cap_abs, safety)
                cal.plan = _Plan(units, goal, cap_abs, safety) if replan else None
                try:
                    walls.append(cal.run_pass(run, thresholds))
                finally:
                    plan, cal.plan = cal.plan, None
                lowered.append(sorted(name for name, s in cal.sites.items() if s.lowered))
                summary["measured_mean_error"] = round(cal.mean_error(), 6)
                replans = plan.summaries if plan is not None else []
                summary["replans"] = len(replans)
                summary["replanned_mean_error"] = (replans[-1] if replans else summary)["predicted_mean_error"]
                allocations.append(summary)
                measured, predicted = summary["measured_mean_error"], summary["predicted_mean_error"]
                if measured > 0 and predicted > 0:   # the correction for the next attempt, if any
                    goal = goal * predicted / measured if attempt == 0 else goal
        analysed = sum(s.analysed_s for s in cal.sites.values())
    finally:
        _restore(cal, saved)
    calibration = {
        "criterion": criterion, "allocation": allocation, "passes": passes,
        "profile_reused": profile is not None,
        "wall_s": [round(w, 3) for w in walls], "total_wall_s": round(time.perf_counter() - t_start, 3),
        "analysis_s_last_pass": round(analysed, 3),
        "steps": max(s.root[0] for s in cal.sites.values()), "safety": safety, "grid_step": GRID_STEP,
        "tolerance": TOLERANCE,
        "last_pass_is_the_table": not lowered[-1] if lowered else False,
        "lowered_in_last_pass": lowered[-1] if lowered else None,
        "resynced_tiles": sum(s.resynced_tiles for s in cal.sites.values()),
        "resynced_sites": sorted(name for name, s in cal.sites.items() if s.resynced_tiles),
        "note": "error = largest per-call relative error of the site's output vs dense attention on the same "
                "inputs, measured in the last pass; error_mean = its mean over the site's calls",
    }
    if allocation == "global":
        calibration.update(cap=round(float(cap) * float(target_error), 9), cap_factor=float(cap),
                           mean_error=round(cal.mean_error(), 6),
                           **{f"allocation_{k}": [a[k] for a in allocations] for k in
                              ("goal", "lambda", "predicted_mean_error", "predicted_computed", "measured_mean_error",
                               "replans", "replanned_mean_error")},
                           budget="target_error bounds the mean per-call site error over the generation; cap bounds "
                                  "every head's (layer granularity: site's) per-call error")
    else:
        calibration.update(budget="target_error bounds every head's (layer granularity: site's) per-call error")
    return cal.table(calibration, budget=float(target_error))
