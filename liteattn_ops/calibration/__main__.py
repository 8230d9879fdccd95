"""python -m liteattn_ops.calibration: calibrate a demo model, write the table and a short report.

    python -m liteattn_ops.calibration                        # CPU, 2,048 tokens, budget 0.03
    python -m liteattn_ops.calibration --preset wan-small --budget 0.01 --write-default
    python -m liteattn_ops.calibration --budget 0.01,0.03,0.1 --compare -- uniform sweep, PSNR/SSIM
    python -m liteattn_ops.demo --thresholds out/calibration/thresholds_0.03.json

Writes into --out: thresholds_<budget>.json (the ThresholdTable), report.json and report.md (per
site: thresholds, live fraction, error; with --compare also the final video's PSNR/SSIM against
dense for each table and for a sweep of uniform thresholds, and the live-tile factor at equal PSNR).

--preset picks the model as the demo does (liteattn_ops.demo.pipelines: demo-dit, the project's DiT;
wan-small, the small diffusers WanTransformer3DModel sampled with FlowMatchEulerDiscreteScheduler,
bf16 weights on CUDA, float32 on the CPU), and the generation is the demo's own pipeline run.

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
    p.add_argument("--preset", default="demo-dit", choices=PRESETS,
                   help="the demo model to calibrate, built and sampled by the demo's pipeline")
    p.add_argument("--checkpoint", default=None,
                   help="safetensors of the preset's model (default: the shipped one: demo_dit.safetensors, "
                        "or demo_wan.safetensors for wan-small)")
    p.add_argument("--budget", default="0.03",
                   help="target error(s), comma-separated (relative, per call); 'none': only the --compare sweep")
    p.add_argument("--metric", default="l1", choices=("l1", "rmse", "cosine"))
    p.add_argument("--granularity", default="head", choices=("head", "layer"))
    p.add_argument("--criterion", default="max", choices=("max", "mass"),
                   help="max: the op's test; mass: the error-aware prototype, simulated (comparison only)")
    p.add_argument("--schedule", default="",
                   help="step boundaries, e.g. 2,10, or 'per-step' (one range per step; on the demo DiT the best "
                        "factor, BENCHMARKS.md); default: one range")
    p.add_argument("--allocation", default="global",
                   help="global (the budget is the mean per-call site error, the cap --cap x budget per call), site "
                        "(every site's per-call error <= budget), or both: global,site")
    p.add_argument("--cap", default="", help="global allocation: per-call cap as a multiple of the budget, or several, "
                   "comma-separated (each cap x budget is one table; one profile pass between them); default 3")
    p.add_argument("--passes", type=int, default=None, help="generations per calibration (global: 2 or 3; site: 1 or 2)")
    p.add_argument("--no-replan", action="store_true",
                   help="global allocation with a schedule: keep the profile's allocation in the check pass instead of "
                        "re-planning the later ranges from the error the earlier ones spent")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=0,
                   help="dense warm-up calls per state (liteattn_ops.enable(..., warmup_steps=K)), for the "
                        "calibration and the uniform sweep alike")
    p.add_argument("--resolution", default="64x64")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", type=int, default=0)
    p.add_argument("--compare", action="store_true", help="also measure PSNR/SSIM and sweep uniform thresholds")
    p.add_argument("--uniform", default="-14,-12,-10,-8,-6,-5,-4,-3,-2",
                   help="uniform thresholds of the --compare sweep")
    p.add_argument("--out", default="out/calibration")
    p.add_argument("--write-default", action="store_true",
                   help="also write the table (one --budget) as the demo's default: <checkpoint stem>_thresholds.json "
                        "beside the checkpoint, which python -m liteattn_ops.demo --preset P then uses")
    args = p.parse_args(argv)
    try:
        args.budgets = [] if args.budget == "none" else [float(b) for b in args.budget.split(",") if b.strip()]
        if args.schedule.strip() == "per-step":
            args.schedule = list(range(1, args.steps)) or None
        else:
            args.schedule = [int(s) for s in args.schedule.split(",") if s.strip()] or None
        args.uniform = [float(u) for u in args.uniform.split(",") if u.strip()]
        args.caps = [float(c) for c in args.cap.split(",") if c.strip()] or [None]
        args.height, args.width = (int(x) for x in args.resolution.lower().split("x"))
    except ValueError as e:
        p.error(f"bad number: {e}")
    args.allocations = [a.strip() for a in args.allocation.split(",") if a.strip()]
    if not args.allocations or any(a not in ("global", "site") for a in args.allocations):
        p.error(f"--allocation must be global, site or global,site; got {args.allocation!r}")
    if args.budget != "none" and (not args.budgets or any(not 0 < b < math.inf for b in args.budgets)):
        p.error(f"--budget must be positive numbers, got {args.budget!r}")
    if args.write_default and len(args.budgets) != 1:
        p.error("--write-default needs exactly one --budget")
    if any(c is not None and not 0 < c < math.inf for c in args.caps):
        p.error(f"--cap must be positive numbers, got {args.cap!r}")
    if any(u > 0 for u in args.uniform):
        p.error("--uniform thresholds must be <= 0")
    if not 0 <= args.label < 4:
        p.error(f"--label must be in [0, 4), got {args.label}")
    try:
        args.device = torch.device(args.device)
    except RuntimeError:
        p.error(f"unknown --device {args.device!r}")
    return args


PRESETS = ("demo-dit", "wan-small")


def checkpoint_path(args) -> Path:
    """The checkpoint the preset loads: --checkpoint, else the shipped one of the preset."""
    if args.checkpoint:
        return Path(args.checkpoint)
    if args.preset == "wan-small":
        from ..demo.pipelines import WAN_SMALL_CHECKPOINT

        return WAN_SMALL_CHECKPOINT
    from ..demo.models import CHECKPOINT

    return CHECKPOINT


def default_table_path(args) -> Path:
    """Where --write-default writes: <checkpoint stem>_thresholds.json beside the checkpoint (the
    demo's default_thresholds_file)."""
    ckpt = checkpoint_path(args)
    return ckpt.with_name(ckpt.stem + "_thresholds.json")


# the demo's sampling settings (its defaults: batch 1, Wan's shift 3, no guidance)
PIPELINE_DEFAULTS = {"batch": 1, "shift": 3.0, "guidance": 1.0}


class DemoRun:
    """A demo model and one fixed generation (noise, label, steps), as `run(model)`: the demo's
    own pipeline (liteattn_ops.demo.pipelines.make_pipeline), so the model, its dtype (demo-dit:
    bf16 autocast on CUDA; wan-small: bf16 weights on CUDA, no autocast; float32 on the CPU) and
    the sampler are the demo's."""

    def __init__(self, args):
        from ..demo.pipelines import make_pipeline

        pipe_args = argparse.Namespace(preset=args.preset, checkpoint=args.checkpoint, device=args.device,
                                       frames=args.frames, height=args.height, width=args.width, seed=args.seed,
                                       label=args.label, **PIPELINE_DEFAULTS)
        self.pipe = make_pipeline(pipe_args)      # DemoError (missing/bad checkpoint, bad size): main reports it
        self.device = args.device
        self.model, self.meta, self.grid = self.pipe.model, self.pipe.meta, self.pipe.grid
        self.steps, self.live_per_step = args.steps, []

    def __call__(self, model, track=None, table=None):
        """One generation; `table`, a ThresholdTable with a schedule of several step ranges, if given, is
        applied step by step (ThresholdTable.stepwise)."""
        self.live_per_step = []

        def callback(i, t):
            if track is not None:
                self.live_per_step.append(track())

        if table is not None:
            table.apply(model, step=0)
            callback = table.stepwise(model, self.steps, callback)
        with torch.no_grad():
            self.last_video = self.pipe.run(model, self.steps, callback)
        return self.last_video

    def frames(self, video):
        return self.pipe.to_frames(video)


def _generation_record(args, demo) -> dict:
    """What the table was calibrated on, beyond the model class: the checkpoint (with its hash, so
    a retrained checkpoint is told apart) and the generation."""
    import hashlib

    ckpt = checkpoint_path(args)
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest() if ckpt.is_file() else None
    return {"preset": args.preset, "checkpoint": ckpt.name, "checkpoint_sha256": digest, "generation": {
        "steps": args.steps, "frames": args.frames, "resolution": f"{args.height}x{args.width}", "seed": args.seed,
        "label": args.label, "warmup_steps": args.warmup, "device": str(demo.device),
        "dtype": str(demo.pipe.attention_dtype).removeprefix("torch."),
        "autocast": bool(demo.pipe.autocast), **PIPELINE_DEFAULTS}}


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


def _generate(demo: DemoRun, model, measure_errors: bool = False, table=None) -> dict:
    """One generation with the model's current thresholds, or with `table` applied step by step (a
    table with several step ranges); with measure_errors, every call's l1
    error of every site against PyTorch's dense SDPA on the same inputs (float32), measured apart
    from the calibration code: {site: (max per call, mean per call)}."""
    import torch.nn.functional as F

    import liteattn_ops

    errors, handles = {}, []
    if measure_errors:
        for name, site in _self_sites_all(model):
            def pre(mod, args, kwargs):
                mod._cal_check_inputs = (*args[:3], kwargs.get("scale", args[3] if len(args) > 3 else None)) \
                    if len(args) >= 3 else None

            def post(mod, args, kwargs, out, name=name):
                inputs = getattr(mod, "_cal_check_inputs", None)
                if inputs is None or kwargs.get("left") is not None:
                    return
                q, k, v = (t.float() for t in inputs[:3])
                with torch.autocast(q.device.type, enabled=False):
                    dense = F.scaled_dot_product_attention(q, k, v, scale=inputs[3])
                o = (out[0] if isinstance(out, tuple) else out).float()
                err = ((o - dense).abs().sum((1, 2, 3)) / dense.abs().sum((1, 2, 3))).max()
                errors.setdefault(name, []).append(float(err))

            handles += [site.register_forward_pre_hook(pre, with_kwargs=True),
                        site.register_forward_hook(post, with_kwargs=True)]
    liteattn_ops.reset(model)
    try:
        t0 = time.perf_counter()
        video = demo(model, track=lambda: _live(model), table=table)
        wall = time.perf_counter() - t0
    finally:
        for h in handles:
            h.remove()
    lives = demo.live_per_step
    computed = (1.0 + sum(lives[:-1])) / len(lives) if lives else 1.0   # visited fraction, mean over steps
    per_site = {n: round(float(s.live_fraction()), 4) for n, s in _self_sites(model)}
    out = {"video": video, "live_end": lives[-1] if lives else 1.0, "computed": computed, "wall_s": wall,
           "per_site_live": per_site}
    if measure_errors:
        out["errors"] = {n: (round(max(e), 6), round(sum(e) / len(e), 6)) for n, e in errors.items()}
        calls = [x for e in errors.values() for x in e]
        out["max_error"] = round(max(calls), 6) if calls else None
        out["mean_error"] = round(sum(calls) / len(calls), 6) if calls else None
    return out


def _self_sites_all(model):
    import liteattn_ops

    return list(liteattn_ops.attention_sites(model))


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
    from .calibrate import CAP, profile

    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    t_all = time.perf_counter()
    from ..demo.errors import DemoError

    try:
        demo = DemoRun(args)
    except DemoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model = demo.model
    liteattn_ops.enable(model, threshold=-math.inf, warmup_steps=args.warmup)
    report = {"preset": args.preset, "checkpoint": str(checkpoint_path(args)), "criterion": args.criterion, "warmup_steps": args.warmup, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
                         f"{args.device}" + (f" ({torch.cuda.get_device_name()})" if demo.device.type == "cuda" else ""),
              "command": "python -m liteattn_ops.calibration " + " ".join(sys.argv[1:] if argv is None else argv),
              "tokens": demo.grid[0] * demo.grid[1] * demo.grid[2], "steps": args.steps, "tables": []}
    dense = None
    if args.compare:
        t0 = time.perf_counter()
        with _NoSites(model):
            dense_video = demo(model)
        report["dense_wall_s"] = round(time.perf_counter() - t0, 2)
        dense = demo.frames(dense_video)

    for allocation in args.allocations:
        prof = None
        if allocation == "global" and args.budgets:
            prof = profile(model, demo, metric=args.metric, granularity=args.granularity, schedule=args.schedule)
            report[f"profile_wall_s"] = round(prof.wall_s, 2)
            print(f"profile pass: {prof.wall_s:.1f} s", flush=True)
        runs = [(b, c) for c in (args.caps if allocation == "global" else [None]) for b in args.budgets]
        for budget, cap in runs:
            t0 = time.perf_counter()
            extra = {} if args.passes is None else {"passes": args.passes}
            if allocation == "global":
                extra.update(profile=prof, cap=CAP if cap is None else cap, replan=not args.no_replan)
            table = calibrate(model, demo, target_error=budget, metric=args.metric, granularity=args.granularity,
                              schedule=args.schedule, criterion=args.criterion, allocation=allocation, **extra)
            wall = time.perf_counter() - t0 + (prof.wall_s if prof is not None else 0.0)
            last_pass_video = demo.last_video
            name = f"thresholds_{budget:g}" + (f"_cap{cap:g}" if len(args.caps) > 1 else "") + \
                (".json" if allocation == "global" else f"_{allocation}.json")
            table.calibration.update(_generation_record(args, demo))
            path = table.save(out / name)
            if args.write_default:
                default = table.save(default_table_path(args))
                report["default_table"] = str(default)
                print(f"the demo's default table: {default}", flush=True)
            entry = {"budget": budget, "allocation": allocation, "cap": table.calibration.get("cap_factor"), "table": str(path),
                     "calibration_wall_s": round(wall, 2), "calibration": table.calibration,
                     "sites": {n: {"thresholds": e.thresholds, "live_fraction": e.live_fraction,
                                   "live_fraction_per_head": e.live_fraction_per_head, "error": e.error,
                                   "error_mean": e.error_mean, "error_per_head": e.error_per_head}
                               for n, e in table.sites.items() if e.thresholds is not None}}
            lives = [e.live_fraction for e in table.sites.values() if e.live_fraction is not None]
            entry["last_pass"] = {"live_end": round(sum(lives) / len(lives), 4) if lives else None,
                                  **(_quality(dense, demo.frames(last_pass_video)) if args.compare else {})}
            if args.compare and args.criterion == "max":
                scheduled = len(table.schedule) > 1
                if not scheduled:
                    liteattn_ops.set_threshold(model, table)
                gen = _generate(demo, model, measure_errors=True, table=table if scheduled else None)
                entry.update({"live_end": round(gen["live_end"], 4), "computed": round(gen["computed"], 4),
                              "generation_wall_s": round(gen["wall_s"], 2), "fresh_errors": gen["errors"],
                              "fresh_max_error": gen["max_error"], "fresh_mean_error": gen["mean_error"],
                              **_quality(dense, demo.frames(gen["video"]))})
            report["tables"].append(entry)
            print(f"{_label(entry)}: {path} ({wall:.1f} s)"
                  + (f", PSNR {_fmt(entry['psnr_db'], 2)} dB, live {entry['live_end']:.3f}" if "psnr_db" in entry else ""),
                  flush=True)

    if args.compare:
        report["uniform"] = []
        for thr in args.uniform:
            liteattn_ops.set_threshold(model, thr)
            gen = _generate(demo, model)
            report["uniform"].append({"threshold": thr, "live_end": round(gen["live_end"], 4),
                                      "computed": round(gen["computed"], 4), "wall_s": round(gen["wall_s"], 2),
                                      "per_site_live": gen["per_site_live"],
                                      **_quality(dense, demo.frames(gen["video"]))})
            print(f"uniform {thr:g}: PSNR {report['uniform'][-1]['psnr_db']}, live {gen['live_end']:.3f}", flush=True)
        for entry in report["tables"]:
            if "psnr_db" in entry:
                entry["factor_vs_uniform_live_end"] = _factor(entry, report["uniform"], "live_end")
                entry["factor_vs_uniform_computed"] = _factor(entry, report["uniform"], "computed")
    report["total_wall_s"] = round(time.perf_counter() - t_all, 1)

    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    (out / "report.md").write_text(text)
    print(text)
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


def _label(entry: dict) -> str:
    """'global 0.01' (or 'global 0.01 cap 10' when the cap is not the default)."""
    from .calibrate import CAP

    cap = entry.get("cap")
    return f"{entry['allocation']} {entry['budget']:g}" + (f" cap {cap:g}" if cap not in (None, CAP) else "")


def markdown(report: dict) -> str:
    """Per-table site details first, the summary table (calibrated vs the uniform sweep) last."""
    lines = []
    for e in report["tables"]:
        c = e["calibration"]
        lines += [f"{e['allocation']} allocation, budget {e['budget']:g} ({e['table']}; calibration "
                  f"{e['calibration_wall_s']:.0f} s, passes {c['wall_s']} s; last pass = the table's own run: "
                  f"{c['last_pass_is_the_table']}"
                  + (f"; mean error predicted {c['allocation_predicted_mean_error']}, measured "
                     f"{c['allocation_measured_mean_error']}; cap {c['cap']:g}" if e["allocation"] == "global" else "")
                  + ")", "",
                  "| site | thresholds per head | live per head | error max / mean per call | error per head (max) |",
                  "|---|---|---|---|---|"]
        for name, st in e["sites"].items():
            thr = " / ".join("[" + ", ".join(_fmt(x, 2) for x in r) + "]" for r in st["thresholds"])
            live = ", ".join(_fmt(x, 2) for x in (st["live_fraction_per_head"] or []))
            err_h = " / ".join("[" + ", ".join(_fmt(x, 4) for x in r) + "]" for r in st["error_per_head"] if r)
            mean = st.get("error_mean") or []
            lines.append(f"| {name} | {thr} | {live} | {', '.join(_fmt(x, 4) for x in st['error'])} / "
                         f"{', '.join(_fmt(x, 4) for x in mean)} | {err_h} |")
        lines.append("")
    lines += [f"Calibration of {report.get('preset', 'demo-dit')} — {report['date']}, {report['machine']}",
              f"`{report['command']}`, {report['tokens']} tokens, {report['steps']} steps, "
              f"warm-up {report.get('warmup_steps', 0)}, "
              f"total {report.get('total_wall_s', 0):.0f} s", ""]
    if report.get("uniform"):
        lines += ["| run | live at end | computed | PSNR (dB) | SSIM | factor at equal PSNR, end (interp / best) | "
                  "computed (interp / best) | fresh-run error max / mean | calibration (s) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for e in report["tables"]:
            if "psnr_db" not in e:
                continue
            fe, fc = e["factor_vs_uniform_live_end"], e["factor_vs_uniform_computed"]
            lines.append(f"| {_label(e)} | {_fmt(e['live_end'])} | {_fmt(e['computed'])} | "
                         f"{_fmt(e['psnr_db'], 2)} | {_fmt(e['ssim'], 4)} | {_fmt(fe[0])} / {_fmt(fe[1])} | "
                         f"{_fmt(fc[0])} / {_fmt(fc[1])} | {_fmt(e['fresh_max_error'], 4)} / "
                         f"{_fmt(e['fresh_mean_error'], 4)} | {e['calibration_wall_s']:.0f} |")
        for u in report["uniform"]:
            lines.append(f"| uniform {_fmt(u['threshold'], 2)} | {_fmt(u['live_end'])} | {_fmt(u['computed'])} | "
                         f"{_fmt(u['psnr_db'], 2)} | {_fmt(u['ssim'], 4)} | | | | ({u['wall_s']:.0f} s gen.) |")
        lines.append(f"dense generation {report.get('dense_wall_s', 0):.0f} s")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
