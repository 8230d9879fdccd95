"""What the demo writes and prints: report.json, plot.png, side_by_side.gif, the summary."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .pipelines import SPEED_ONLY_LABEL

CPU_PLOT_NOTE = ("CPU: the reference op computes every score to decide what to skip, so CPU times show no "
                 "speedup; this is not the GPU's speedup (the kernel skips the tiles).")


def _psnr_text(q) -> str:
    return q["psnr_db"] if isinstance(q["psnr_db"], str) else f"{q['psnr_db']:.2f}"


def write_plot(report: dict, path: Path) -> None:
    """Live fraction per layer and step (heat map), step and attention time per step of both runs,
    and the forced-fraction step times when there are any."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    lite, dense = report["liteattention"], report["dense"]
    forced = report.get("forced_live_fractions") or []
    panels = 3 if forced else 2
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.6), dpi=100)

    ax = axes[0]
    steps = [r["step"] for r in lite["per_step"]]
    layers = list(lite["per_step"][0].get("live_fraction_per_layer") or {})
    if layers:
        grid = [[r["live_fraction_per_layer"][name] for r in lite["per_step"]] for name in layers]
        im = ax.imshow(grid, aspect="auto", origin="lower", vmin=0, vmax=1, cmap="viridis",
                       extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, len(layers) - 0.5), interpolation="nearest")
        fig.colorbar(im, ax=ax, label="live fraction of KV tiles (after the step)")
        ticks = list(range(len(layers))) if len(layers) <= 12 else list(range(0, len(layers), max(1, len(layers) // 10)))
        ax.set_yticks(ticks, [layers[i].removesuffix(".liteattn") for i in ticks], fontsize=7)
        mean = [r["live_fraction"] for r in lite["per_step"]]
        ax.set_title(f"live fraction per layer and step (threshold {report['threshold']}); "
                     f"mean at the end {mean[-1]:.2f}", fontsize=9)
    else:
        ax.text(0.5, 0.5, "no routed self-attention", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("denoising step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))

    ax = axes[1]
    ax.plot(steps, [r["step_time_s"] * 1e3 for r in dense["per_step"]], "o-", color="C0", label="dense SDPA: step")
    ax.plot(steps, [r["step_time_s"] * 1e3 for r in lite["per_step"]], "o-", color="C1", label="LiteAttention: step")
    for run, color, name in ((dense, "C0", "dense"), (lite, "C1", "LiteAttention")):
        pts = [(r["step"], r["attention_time_s"] * 1e3) for r in run["per_step"] if r.get("attention_time_s")]
        if pts:
            ax.plot(*zip(*pts), "s--", color=color, alpha=0.7, ms=4, label=f"{name}: attention (profiled)")
    ax.set_xlabel("denoising step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("ms")
    sp = report["speedup"]
    title = f"time per step: speedup {sp['total']:.2f}x"
    if sp.get("attention"):
        title += f", attention {sp['attention']:.2f}x"
    ax.set_title(title, fontsize=9)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)

    if forced:
        ax = axes[2]
        fr = [f["live_fraction"] for f in forced]
        ms = [f["step_time_s"] * 1e3 for f in forced]
        ax.plot(fr, ms, "o-", color="C2", label="LiteAttention, fixed skip states")
        dense_ms = dense["total_time_s"] / len(dense["per_step"]) * 1e3
        ax.axhline(dense_ms, color="C0", ls="--", label=f"dense SDPA {dense_ms:.1f} ms")
        for f, m in zip(fr, ms):
            ax.annotate(f"{dense_ms / m:.2f}x", (f, m), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("forced live fraction of KV tiles")
        ax.set_ylabel("ms per step")
        ax.set_xlim(0, 1.05)
        ax.set_ylim(bottom=0)
        ax.set_title("step time at forced live fractions (threshold -inf)", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)

    graphs = report.get("cuda_graphs") or {}
    title = (f"{report['preset']} on {report['device_name']} ({report['kernel']}), {report['tokens']} tokens, "
             f"{report['mode']}{'/' + report['compile_mode'] if report.get('compile_mode') else ''}, "
             f"CUDA graphs {'yes' if graphs.get('recorded') else 'no'}")
    q = report.get("quality")
    if q:
        title += f" | PSNR {_psnr_text(q)} dB, SSIM {q['ssim']:.4f}"
    if report["speed_only"]:
        title += "\n" + SPEED_ONLY_LABEL
    fig.suptitle(title, fontsize=10)
    if report["device"].startswith("cpu"):
        fig.text(0.5, 0.01, CPU_PLOT_NOTE, ha="center", va="bottom", fontsize=9, color="darkred",
                 bbox=dict(facecolor="mistyrose", edgecolor="darkred", boxstyle="round"))
        fig.tight_layout(rect=(0, 0.07, 1, 1))
    else:
        fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def difference_gain(frames_dense: torch.Tensor, frames_lite: torch.Tensor) -> float:
    """A round gain (1, 2, 5, 10, 20, ...) that brings the 98th percentile of |difference| to about
    half of full scale, so small differences are visible (1 when the videos are identical; the
    few largest differences saturate)."""
    diff = (frames_dense - frames_lite).abs().flatten().float()
    level = float(torch.quantile(diff[:: max(1, diff.numel() // 1_000_000)], 0.98))
    if level <= 0:
        level = float(diff.max())
        if level <= 0:
            return 1.0
    gain = 1.0
    for exponent in range(0, 10):
        for mantissa in (1, 2, 5):
            g = mantissa * 10.0**exponent
            if g * level <= 0.5:
                gain = g
    return gain


def write_gif(frames_dense: torch.Tensor, frames_lite: torch.Tensor, path: Path, fps: float = 8.0) -> float:
    """dense | LiteAttention | gain x |difference|, upscaled to >= 192 px high, with captions
    (the gain is written on the difference panel). Returns the gain."""
    from PIL import Image, ImageDraw

    t, h, w, _ = frames_dense.shape
    scale = max(1, 192 // h)
    gain = difference_gain(frames_dense, frames_lite)
    diff = ((frames_dense - frames_lite).abs() * gain).clamp(0, 1)
    strip = torch.cat([frames_dense, frames_lite, diff], dim=2)  # (T, H, 3W, 3)
    identical = bool((frames_dense == frames_lite).all())
    label = "identical" if identical else f"|diff| x {gain:g}"
    images = []
    for i in range(t):
        arr = (strip[i].numpy() * 255).round().astype("uint8")
        im = Image.fromarray(arr).resize((3 * w * scale, h * scale), Image.NEAREST)
        canvas = Image.new("RGB", (im.width, im.height + 14), (0, 0, 0))
        canvas.paste(im, (0, 14))
        d = ImageDraw.Draw(canvas)
        for j, text in enumerate(("dense SDPA", "LiteAttention", label)):
            d.text((j * w * scale + 3, 1), text, fill=(255, 255, 255))
        images.append(canvas)
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return gain


def write_outputs(result, out: Path) -> dict:
    """Write everything into a temporary folder beside `out`, then move it into place."""
    report = result.report
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        files = {"report": out / "report.json", "plot": out / "plot.png"}
        if result.frames_dense is not None:
            files["gif"] = out / "side_by_side.gif"
            report["gif_difference_gain"] = write_gif(result.frames_dense, result.frames_lite, tmp / "side_by_side.gif")
        write_plot(report, tmp / "plot.png")
        report["outputs"] = {k: str(v) for k, v in files.items()}
        (tmp / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return files


def publish_dir(tmp: Path, out: Path) -> None:
    """Move the finished folder `tmp` to `out`, replacing what was there, so a reader never sees a
    half-written output folder."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _ms(v) -> str:
    return "-" if v is None else f"{v * 1e3:.1f} ms"


def summary(report: dict) -> str:
    lite, dense, sp = report["liteattention"], report["dense"], report["speedup"]
    graphs = report.get("cuda_graphs") or {}
    graphs_text = ("yes" if graphs.get("recorded") else "requested, none recorded" if graphs.get("requested") else "no")
    mode = report["mode"] + (f" (torch.compile mode={report['compile_mode']})" if report.get("compile_mode") else "")
    lines = [
        f"LiteAttention demo: {report['preset']} | mode {mode} | device {report['device']} ({report['device_name']}) | "
        f"kernel {report['kernel']} | CUDA graphs {graphs_text}",
        f"  {report['frames']} frames x {report['height']}x{report['width']} = {report['tokens']} tokens, "
        f"batch {report['batch']}, {report['steps']} steps, threshold {report['threshold']}",
    ]
    if report["speed_only"]:
        lines.append("  " + SPEED_ONLY_LABEL)
    prof = report["timing"]["profiled_steps"]
    for name, run in (("dense SDPA   ", dense), ("LiteAttention", lite)):
        text = f"  {name}  : {run['total_time_s']:.3f} s ({run['total_time_s'] / len(run['per_step']) * 1e3:.2f} ms/step)"
        if run.get("attention_time_s") is not None:
            text += f"; attention {_ms(run['attention_time_s'] / max(1, run['profiled_steps']))}/step " \
                    f"of {_ms(run['profiled_time_s'] / max(1, run['profiled_steps']))}/step profiled"
        lines.append(text)
    lines.append(f"  speedup        : {sp['total']:.3f}x whole step" +
                 (f", {sp['attention']:.3f}x attention ({prof} profiled steps)" if sp.get("attention") else ""))
    lines.append(f"  live fraction  : {lite['final_live_fraction']:.3f} at the end, "
                 f"{lite['mean_computed_fraction']:.3f} computed on average over the steps "
                 f"({1 - lite['mean_computed_fraction']:.0%} of the tiles skipped)")
    layers = lite.get("final_per_layer") or {}
    if layers and len(layers) <= 8:
        lines.append("  per layer      : " + ", ".join(
            f"{n.removesuffix('.liteattn').removesuffix('.self_attn')} {v:.2f}" for n, v in layers.items()))
    q = report.get("quality")
    if q:
        lines.append(f"  quality vs dense: PSNR {_psnr_text(q)} dB, SSIM {q['ssim']:.4f}")
    for f in report.get("forced_live_fractions") or []:
        lines.append(f"  forced live {f['live_fraction']:.2f}: {f['step_time_s'] * 1e3:.1f} ms/step "
                     f"(measured live {f['measured_live_fraction']:.3f})")
    for n in report["notes"]:
        lines.append(f"  note: {n}")
    for k, v in report.get("outputs", {}).items():
        lines.append(f"  {k:7s}: {v}")
    return "\n".join(lines)
