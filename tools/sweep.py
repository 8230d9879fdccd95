#!/usr/bin/env python3
"""Threshold sweep on the trained demo DiT: threshold -> live fraction, PSNR/SSIM vs dense, speedup.

    python tools/sweep.py                                   # CPU, 2,048 tokens (reference op)
    python tools/sweep.py --device cuda --out out/sweep     # the demo's GPU default size, compiled

One dense run (plain SDPA), then one LiteAttention run per threshold, all from the same noise
with the same steps. The model is routed once with ``liteattn_ops.enable`` (and compiled once
with ``backend="liteattn"`` under ``--compile``); each threshold is set in place with
``liteattn_ops.set_threshold`` and the skip states are reset with ``liteattn_ops.reset``, so
no threshold recompiles. Writes ``sweep.json``, ``sweep.md`` (the table) and ``sweep.png``
into ``--out`` (a temporary folder moved into place at the end) and prints the table.

Columns: final live fraction (tiles live after the last step), computed fraction (mean over
steps of the tiles each step visited), speedup = dense time / LiteAttention time over the timed
steps (whole step; attention: over the demo's untimed torch.profiler pass, see
liteattn_ops.demo.timing), PSNR/SSIM of the LiteAttention video against the dense one. It runs
through the demo's public runner (liteattn_ops.demo.DemoRunner), timed exactly as the demo is.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from liteattn_ops.demo import DemoError, DemoRunner, parse_args as demo_parse_args, validate  # noqa: E402
from liteattn_ops.demo.cli import threshold_ok  # noqa: E402
from liteattn_ops.demo.outputs import publish_dir  # noqa: E402
from liteattn_ops.demo.quality import json_number, video_quality  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--thresholds", default="-inf,-14,-12,-10,-8,-6,-4,-2",
                   help="comma-separated thresholds in log2 units (<= 0; -inf never skips)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--resolution", default=None, help="HxW (default: the demo's, 64x64 on CPU, 128x128 on CUDA)")
    p.add_argument("--frames", type=int, default=None, help="frames (default: the demo's, 4 on CPU, 32 on CUDA)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--compile", dest="mode", action="store_const", const="compile")
    mode.add_argument("--eager", dest="mode", action="store_const", const="eager")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode of both runs (default: the demo's)")
    p.add_argument("--preset", default=None, choices=("demo-dit", "wan-small"), help="the model (default: the demo's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", type=int, default=0)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--no-profile", action="store_true", help="no attention-only times (faster)")
    p.add_argument("--no-warmup", action="store_true", help="eager only: no untimed warm-up step")
    p.add_argument("--out", default="out/sweep")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    try:
        args.thresholds = [float(t) for t in args.thresholds.split(",") if t.strip()]
    except ValueError:
        p.error(f"--thresholds must be comma-separated numbers, got {args.thresholds!r}")
    if not args.thresholds or not all(threshold_ok(t) for t in args.thresholds):
        p.error("--thresholds must be <= 0")
    return args


def demo_namespace(args) -> argparse.Namespace:
    """The demo's settings for these sweep arguments, validated by the demo (so --out is checked
    before any work)."""
    ns = demo_parse_args([
        "--device", args.device, "--steps", str(args.steps), f"--threshold={args.thresholds[0]}",
        "--seed", str(args.seed), "--label", str(args.label), "--batch", str(args.batch), "--out", args.out,
    ] + (["--compile-mode", args.compile_mode] if args.compile_mode else [])
      + (["--preset", args.preset] if args.preset else [])
      + (["--resolution", args.resolution] if args.resolution else [])
      + (["--frames", str(args.frames)] if args.frames else [])
      + (["--checkpoint", args.checkpoint] if args.checkpoint else [])
      + (["--" + args.mode] if args.mode else []) + (["--quiet"] if args.quiet else [])
      + (["--no-profile"] if args.no_profile else []) + (["--no-warmup"] if args.no_warmup else []))
    validate(ns)
    return ns


def run_sweep(args) -> dict:
    """One dense run, then one LiteAttention run per threshold, through the demo's public runner
    (routed and compiled once; set_threshold + reset between thresholds, no recompile)."""
    ns = demo_namespace(args)
    rows = []
    with DemoRunner(ns) as runner:
        dense = runner.dense()
        ref_frames = runner.pipe.to_frames(dense.video)
        for thr in args.thresholds:
            lite = runner.lite(threshold=thr)
            q = video_quality(ref_frames, runner.pipe.to_frames(lite.video))
            computed = [r["computed_fraction"] for r in lite.per_step]
            rows.append({
                "threshold": json_number(thr),
                "final_live_fraction": lite.per_step[-1]["live_fraction"],
                "computed_fraction": sum(computed) / len(computed),
                "live_fraction_per_step": [r["live_fraction"] for r in lite.per_step],
                "final_per_layer": lite.per_step[-1]["live_fraction_per_layer"],
                "time_s": lite.total_time_s,
                "attention_time_s": lite.attention_time_s,
                "speedup": dense.total_time_s / lite.total_time_s,
                "attention_speedup": (dense.attention_time_s / lite.attention_time_s)
                if dense.attention_time_s and lite.attention_time_s else None,
                "psnr_db": q["psnr_db"],
                "ssim": q["ssim"],
            })
        report = runner.report(dense, lite)
    return {
        "device": report["device"],
        "device_name": report["device_name"],
        "torch": report["torch"],
        "mode": report["mode"],
        "compile_mode": report["compile_mode"],
        "preset": report["preset"],
        "cuda_graphs": report["cuda_graphs"],
        "sdpa_backend": report["sdpa_backend"],
        "steps": ns.steps,
        "frames": ns.frames, "height": ns.height, "width": ns.width, "tokens": report["tokens"],
        "seed": ns.seed, "label": ns.label, "batch": ns.batch,
        "timing": report["timing"],
        "dense": {"time_s": dense.total_time_s, "attention_time_s": dense.attention_time_s},
        "rows": rows,
        "notes": report["notes"],
    }


def fmt(v, spec):
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return format(v, spec)


def table(result: dict) -> str:
    lines = [
        f"{result['preset']}, {result['frames']} frames x {result['height']}x{result['width']} = {result['tokens']} tokens, "
        f"{result['steps']} steps, {result['device_name']} ({result['mode']}); dense {result['dense']['time_s']:.3f} s",
        "",
        "| threshold | live at end | computed | time (s) | speedup | attn speedup | PSNR (dB) | SSIM |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {fmt(r['threshold'], 'g')} | {r['final_live_fraction']:.3f} | {r['computed_fraction']:.3f} | "
            f"{r['time_s']:.3f} | {r['speedup']:.3f}x | {fmt(r['attention_speedup'], '.3f')} | "
            f"{fmt(r['psnr_db'], '.2f')} | {r['ssim']:.4f} |"
        )
    for n in result["notes"]:
        lines += ["", "Note: " + n]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if not isinstance(r["threshold"], str)]
    x = [r["threshold"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), dpi=100)
    axes[0].plot(x, [r["final_live_fraction"] for r in rows], "o-", label="live at the end")
    axes[0].plot(x, [r["computed_fraction"] for r in rows], "s-", label="computed (mean over steps)")
    axes[0].set_ylim(0, 1.02)
    axes[0].set_ylabel("fraction of KV tiles")
    axes[1].plot(x, [r["speedup"] for r in rows], "o-", label="whole step")
    if any(r["attention_speedup"] for r in rows):
        axes[1].plot(x, [r["attention_speedup"] for r in rows], "s-", label="attention")
    axes[1].axhline(1.0, color="gray", lw=0.8)
    axes[1].set_ylabel("speedup vs dense SDPA")
    psnr = [r["psnr_db"] if not isinstance(r["psnr_db"], str) else float("nan") for r in rows]
    axes[2].plot(x, psnr, "o-", color="C3", label="PSNR")
    axes[2].set_ylabel("PSNR vs dense (dB)")
    ax2 = axes[2].twinx()
    ax2.plot(x, [r["ssim"] for r in rows], "s--", color="C4", label="SSIM")
    ax2.set_ylabel("SSIM")
    for ax in axes:
        ax.set_xlabel("threshold (log2 units)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(f"threshold sweep: demo DiT, {result['tokens']} tokens, {result['steps']} steps, "
                 f"{result['device_name']} ({result['mode']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write(result: dict, out: Path) -> None:
    import json
    import shutil
    import tempfile

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / "sweep.json").write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
        (tmp / "sweep.md").write_text(table(result) + "\n")
        plot(result, tmp / "sweep.png")
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    try:
        result = run_sweep(args)
    except DemoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result["wall_time_s"] = time.perf_counter() - t0
    write(result, Path(args.out))
    print(table(result))
    print(f"wrote {args.out}/sweep.json, sweep.md, sweep.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
