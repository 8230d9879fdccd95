"""python -m liteattn_ops.calibration: calibrate the demo DiT, write the table and a short report.

    python -m liteattn_ops.calibration                        # CPU, 2,048 tokens, budget 0.03
    python -m liteattn_ops.calibration --budget 0.01,0.03,0.1 --compare -- uniform sweep, PSNR/SSIM
    python -m liteattn_ops.demo --thresholds out/calibration/thresholds_0.03.json

Writes into --out: thresholds_<budget>.json (the ThresholdTable), report.json and report.md (per
site: thresholds, live fraction, error; with --compare also the final video's PSNR/SSIM against
dense for each table and for a sweep of uniform thresholds, and the live-tile factor at equal PSNR).

This front end needs the demo (it imports liteattn_ops.demo.models); the library part of
liteattn_ops.calibration does not.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m liteattn_ops.calibration", description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", default="0.03",
                   help="target error(s), comma-separated (relative, per call); 'none': only the --compare sweep")
    p.add_argument("--metric", default="l1", choices=("l1", "rmse", "cosine"))
    p.add_argument("--granularity", default="head", choices=("head", "layer"))
    p.add_argument("--criterion", default="max", choices=("max", "mass"),
                   help="max: the op's test; mass: the error-aware prototype, simulated (comparison only)")
    p.add_argument("--schedule", default="", help="step boundaries, e.g. 2,10 (default: one range)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--resolution", default="64x64")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", type=int, default=0)
    p.add_argument("--compare", action="store_true", help="also measure PSNR/SSIM and sweep uniform thresholds")
    p.add_argument("--uniform", default="-14,-12,-10,-8,-6,-5,-4,-3,-2",
                   help="uniform thresholds of the --compare sweep")
    p.add_argument("--out", default="out/calibration")
    args = p.parse_args(argv)
    try:
        args.budgets = [] if args.budget == "none" else [float(b) for b in args.budget.split(",") if b.strip()]
        args.schedule = [int(s) for s in args.schedule.split(",") if s.strip()] or None
        args.uniform = [float(u) for u in args.uniform.split(",") if u.strip()]
        args.height, args.width = (int(x) for x in args.resolution.lower().split("x"))
    except ValueError as e:
        p.error(f"bad number: {e}")
    if args.budget != "none" and (not args.budgets or any(not 0 < b < math.inf for b in args.budgets)):
        p.error(f"--budget must be positive numbers, got {args.budget!r}")
    if any(u > 0 for u in args.uniform):
        p.error("--uniform thresholds must be <= 0")
    return args


class DemoRun:
    """The demo DiT and one fixed generation (noise, label, steps), as `run(model)`."""

    def __init__(self, args):
        from ..demo.models import load_demo_model, sample

        self.sample = sample
        self.device = torch.device(args.device)
        self.model, self.meta = load_demo_model(device=self.device)
        self.grid = self.model.token_grid(args.frames, args.height, args.width)
        g = torch.Generator().manual_seed(args.seed)
        self.noise = torch.randn(1, 3, args.frames, args.height, args.width, generator=g).to(self.device)
        self.labels = torch.full((1,), args.label, dtype=torch.long, device=self.device)
        self.model.rope(self.grid, self.device)
        self.steps, self.live_per_step = args.steps, []

    def __call__(self, model, track=None):
        self.live_per_step = []

        def callback(i, t):
            if track is not None:
                self.live_per_step.append(track())

        with torch.no_grad():
            self.last_video = self.sample(model, self.noise, self.labels, steps=self.steps, callback=callback)
        return self.last_video

    def frames(self, video):
        return ((video[0].float().clamp(-1, 1) + 1) / 2).permute(1, 2, 3, 0).cpu()


def _quality(ref, test) -> dict:
    try:
        from ..demo.quality import video_quality
    except ImportError:
        from ..demo.app import video_quality
    q = video_quality(ref, test)
    return {"psnr_db": q["psnr_db"], "ssim": q["ssim"]}


def _self_sites(model):
    import liteattn_ops

    return [(n, s) for n, s in liteattn_ops.attention_sites(model) if s.live_fraction() is not None]


def _live(model) -> float:
    sites = _self_sites(model)
    return sum(float(s.live_fraction()) for _, s in sites) / max(1, len(sites))


def _generate(demo: DemoRun, model) -> dict:
    import liteattn_ops

    liteattn_ops.reset(model)
    t0 = time.perf_counter()
    video = demo(model, track=lambda: _live(model))
    wall = time.perf_counter() - t0
    lives = demo.live_per_step
    computed = (1.0 + sum(lives[:-1])) / len(lives) if lives else 1.0   # visited fraction, mean over steps
    per_site = {n: round(float(s.live_fraction()), 4) for n, s in _self_sites(model)}
    return {"video": video, "live_end": lives[-1] if lives else 1.0, "computed": computed, "wall_s": wall,
            "per_site_live": per_site}


def _factor(calibrated: dict, uniform: list[dict], key: str):
    """Live fraction of uniform thresholds at the calibrated run's PSNR over the calibrated one:
    (interpolated on the sweep, best uniform threshold with at least that PSNR)."""
    target = calibrated["psnr_db"]
    pts = sorted(((u["psnr_db"], u[key]) for u in uniform if isinstance(u["psnr_db"], float)), key=lambda p: p[0])
    ok = [live for psnr, live in pts if psnr >= target]
    best = min(ok) if ok else None
    interp = None
    for (p0, l0), (p1, l1) in zip(pts, pts[1:]):
        if p0 <= target <= p1 and p1 > p0:
            interp = l0 + (l1 - l0) * (target - p0) / (p1 - p0)
    mine = calibrated[key]
    return (None if interp is None else round(interp / mine, 3), None if best is None else round(best / mine, 3))


def main(argv=None) -> int:
    import liteattn_ops
    from . import calibrate

    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    demo = DemoRun(args)
    model = demo.model
    liteattn_ops.enable(model, threshold=-math.inf)
    report = {"criterion": args.criterion, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
              "command": "python -m liteattn_ops.calibration " + " ".join(sys.argv[1:] if argv is None else argv),
              "tokens": demo.grid[0] * demo.grid[1] * demo.grid[2], "steps": args.steps, "tables": []}
    dense = None
    if args.compare:
        t0 = time.perf_counter()
        with liteattn_ops.disable_context(model) if hasattr(liteattn_ops, "disable_context") else _NoSites(model):
            dense_video = demo(model)
        report["dense_wall_s"] = round(time.perf_counter() - t0, 2)
        dense = demo.frames(dense_video)

    for budget in args.budgets:
        t0 = time.perf_counter()
        table = calibrate(model, demo, target_error=budget, metric=args.metric, granularity=args.granularity,
                          schedule=args.schedule, criterion=args.criterion)
        wall = time.perf_counter() - t0
        last_pass_video = demo.last_video
        path = table.save(out / f"thresholds_{budget:g}.json")
        entry = {"budget": budget, "table": str(path), "calibration_wall_s": round(wall, 2),
                 "calibration": table.calibration,
                 "sites": {n: {"thresholds": e.thresholds, "live_fraction": e.live_fraction,
                               "live_fraction_per_head": e.live_fraction_per_head, "error": e.error,
                               "error_per_head": e.error_per_head}
                           for n, e in table.sites.items() if e.thresholds is not None}}
        lives = [e.live_fraction for e in table.sites.values() if e.live_fraction is not None]
        entry["last_pass"] = {"live_end": round(sum(lives) / len(lives), 4),
                              **(_quality(dense, demo.frames(last_pass_video)) if args.compare else {})}
        if args.compare and len(table.schedule) == 1 and args.criterion == "max":
            liteattn_ops.set_threshold(model, table)
            gen = _generate(demo, model)
            entry.update({"live_end": round(gen["live_end"], 4), "computed": round(gen["computed"], 4),
                          "generation_wall_s": round(gen["wall_s"], 2), **_quality(dense, demo.frames(gen["video"]))})
        report["tables"].append(entry)
        print(f"budget {budget:g}: {path} ({wall:.1f} s)", flush=True)

    if args.compare:
        report["uniform"] = []
        for thr in args.uniform:
            liteattn_ops.set_threshold(model, thr)
            gen = _generate(demo, model)
            report["uniform"].append({"threshold": thr, "live_end": round(gen["live_end"], 4),
                                      "computed": round(gen["computed"], 4), "wall_s": round(gen["wall_s"], 2),
                                      "per_site_live": gen["per_site_live"],
                                      **_quality(dense, demo.frames(gen["video"]))})
            print(f"uniform {thr:g}: PSNR {report['uniform'][-1]['psnr_db']}", flush=True)
        for entry in report["tables"]:
            if "psnr_db" in entry:
                entry["factor_vs_uniform_live_end"] = _factor(entry, report["uniform"], "live_end")
                entry["factor_vs_uniform_computed"] = _factor(entry, report["uniform"], "computed")

    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(markdown(report))
    print(markdown(report))
    return 0


class _NoSites:
    """Dense generation: every site at threshold -inf (the op then equals plain attention)."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        import liteattn_ops

        self.saved = {n: s.threshold for n, s in liteattn_ops.attention_sites(self.model)}
        liteattn_ops.set_threshold(self.model, float("-inf"))
        liteattn_ops.reset(self.model)

    def __exit__(self, *exc):
        import liteattn_ops

        liteattn_ops.set_threshold(self.model, self.saved)


def _fmt(x, digits=3):
    if x is None:
        return "—"
    if isinstance(x, float):
        return "−inf" if x == -math.inf else f"{x:.{digits}f}"
    return str(x)


def markdown(report: dict) -> str:
    lines = [f"Calibration of the demo DiT — {report['date']}, {report['machine']}",
             f"`{report['command']}`, {report['tokens']} tokens, {report['steps']} steps", ""]
    if report.get("uniform"):
        lines += ["| run | threshold(s) | live at end | computed | PSNR (dB) | SSIM | factor (interp / best uniform), end | computed | wall (s) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for e in report["tables"]:
            if "psnr_db" not in e:
                continue
            fe, fc = e["factor_vs_uniform_live_end"], e["factor_vs_uniform_computed"]
            lines.append(f"| calibrated, budget {e['budget']:g} | per head | {_fmt(e['live_end'])} | {_fmt(e['computed'])} | "
                         f"{_fmt(e['psnr_db'], 2)} | {_fmt(e['ssim'], 4)} | {_fmt(fe[0])} / {_fmt(fe[1])} | "
                         f"{_fmt(fc[0])} / {_fmt(fc[1])} | {e['calibration_wall_s']:.0f} (2 passes) |")
        for u in report["uniform"]:
            lines.append(f"| uniform | {_fmt(u['threshold'], 0)} | {_fmt(u['live_end'])} | {_fmt(u['computed'])} | "
                         f"{_fmt(u['psnr_db'], 2)} | {_fmt(u['ssim'], 4)} | | | {u['wall_s']:.0f} |")
        lines.append("")
    for e in report["tables"]:
        lines += [f"Budget {e['budget']:g} ({e['table']}; calibration {e['calibration_wall_s']:.0f} s, passes "
                  f"{e['calibration']['wall_s']} s; last pass = the table's own run: "
                  f"{e['calibration']['last_pass_is_the_table']})", "",
                  "| site | thresholds per head | live per head | error (max per call) | error per head |",
                  "|---|---|---|---|---|"]
        for name, s in e["sites"].items():
            thr = " / ".join("[" + ", ".join(_fmt(x, 2) for x in r) + "]" for r in s["thresholds"])
            live = ", ".join(_fmt(x, 2) for x in (s["live_fraction_per_head"] or []))
            err_h = " / ".join("[" + ", ".join(_fmt(x, 4) for x in r) + "]" for r in s["error_per_head"] if r)
            lines.append(f"| {name} | {thr} | {live} | {', '.join(_fmt(x, 4) for x in s['error'])} | {err_h} |")
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
