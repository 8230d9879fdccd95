#!/usr/bin/env python3
"""Everything the main job needs measured on one H200, in one command (about 6-8 minutes):

    python tools/demo_gpu.py            # reports under $OUT (default ./out), a table printed last

with the package installed with its CUDA kernel (liteattn_ops.is_available()). In order:

1. the GPU default demo (`python -m liteattn_ops.demo --device cuda`: 32 frames x 128x128 =
   32,768 tokens, both runs torch.compile'd the same way, threshold -8), whose untimed profiler
   pass gives the per-step breakdown: attention kernels vs every other kernel, dense vs
   LiteAttention;
2. a short threshold sweep (tools/sweep.py, compiled, 20 steps);
3. the Wan2.1-1.3B 480p preset (random weights, speed only): dense, LiteAttention, forced live
   fractions 0.75 / 0.5 / 0.25;
4. if the time allows, the demo again with CUDA graphs for both runs (--compile-mode reduce-overhead).

With a retrained model: `python tools/demo_gpu.py --checkpoint PATH [--preset wan-small]`. The
training itself (tools/train_demo_dit.py --recipe sparse: 20 minutes of training) is longer than
one 10-minute device command: start it in the background (setsid) and collect the checkpoint, or
give it --time-budget 420 to fit one call.

Device-tool limits: at most 8 files come back from $OUT, so the complete output folders go to
$FULL_OUT (default /tmp/liteattn_demo_gpu) and $OUT gets: summary.md (the table), log.txt, the
demo's report.json and plot.png, the sweep's sweep.json, the Wan preset's report.json and plot.png,
and the CUDA-graph demo's report.json.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUDGET_S = float(os.environ.get("DEMO_GPU_BUDGET_S", 450))   # stop starting new parts after this


def run(name: str, cmd: list[str], log, timeout: float) -> tuple[int, float]:
    t0 = time.perf_counter()
    log.write(f"\n$ {' '.join(cmd)}\n")
    log.flush()
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd)}", flush=True)
    try:
        proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        rc, text = proc.returncode, proc.stdout
    except subprocess.TimeoutExpired as e:
        rc, text = 124, (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    dt = time.perf_counter() - t0
    log.write(text + f"\n[{name}: rc {rc}, {dt:.0f} s]\n")
    log.flush()
    tail = "\n".join(line for line in text.splitlines() if "it/s" not in line and "s/it" not in line)[-3000:]
    print(tail, flush=True)
    print(f"[{name}: rc {rc}, {dt:.0f} s]", flush=True)
    return rc, dt


def load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def ms(v) -> str:
    return "-" if v is None else f"{v * 1e3:.2f}"


def demo_rows(name: str, r: dict) -> list[str]:
    if not r:
        return [f"| {name} | (no report) | | | | | | | |"]
    d, l, q = r["dense"], r["liteattention"], r.get("quality") or {}
    steps = len(d["per_step"])
    graphs = "yes" if (r.get("cuda_graphs") or {}).get("recorded") else "no"
    psnr = q.get("psnr_db")
    psnr = "-" if psnr is None else psnr if isinstance(psnr, str) else f"{psnr:.2f}"
    ssim = f"{q['ssim']:.4f}" if "ssim" in q else "-"
    attn = r["speedup"].get("attention")
    return [f"| {name} | {r['tokens']} | {r['mode']}/{r.get('compile_mode') or '-'}, CUDA graphs {graphs} | "
            f"{ms(d['total_time_s'] / steps)} | {ms(l['total_time_s'] / steps)} | {r['speedup']['total']:.3f}x | "
            f"{psnr} / {ssim} | {1 - l['mean_computed_fraction']:.1%} | {f'{attn:.3f}x' if attn else '-'} |"]


def breakdown(r: dict) -> list[str]:
    """Per profiled step, mean over the steps: attention kernels vs everything else (ms)."""
    if not r or not r["dense"].get("profile") or not r["liteattention"].get("profile"):
        return ["(no profile)"]
    lines = ["| run | attention kernels (ms/step) | other kernels (ms/step) | all kernels | timed step (ms) |",
             "|---|---|---|---|---|"]
    for name, run_ in (("dense SDPA", r["dense"]), ("LiteAttention", r["liteattention"])):
        prof = run_["profile"]
        attn = sum(p["attention_time_s"] for p in prof) / len(prof)
        total = sum(p["kernel_time_s"] for p in prof) / len(prof)
        step = run_["total_time_s"] / len(run_["per_step"])
        lines.append(f"| {name} | {ms(attn)} | {ms(total - attn)} | {ms(total)} | {ms(step)} |")
    lite = r["liteattention"]["profile"]
    lines.append("")
    lines.append("LiteAttention attention kernels per step (ms): " +
                 " ".join(f"{p['attention_time_s'] * 1e3:.2f}" for p in lite))
    return lines


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None,
                        help="a retrained model (tools/train_demo_dit.py) for the demo and the sweep")
    parser.add_argument("--preset", default="demo-dit", choices=("demo-dit", "wan-small"),
                        help="the model of the demo and the sweep (wan-small needs --checkpoint or a shipped one)")
    opts = parser.parse_args(argv)
    model_args = (["--checkpoint", opts.checkpoint] if opts.checkpoint else [])
    demo_model_args = model_args + ["--preset", opts.preset]
    out = Path(os.environ.get("OUT", "./out"))
    full = Path(os.environ.get("FULL_OUT", "/tmp/liteattn_demo_gpu"))
    out.mkdir(parents=True, exist_ok=True)
    if full.exists():
        shutil.rmtree(full)
    full.mkdir(parents=True)
    py = sys.executable
    start = time.perf_counter()
    check = subprocess.run([py, "-c", "import torch, liteattn_ops; assert torch.cuda.is_available(), 'no GPU'; "
                            "assert liteattn_ops.is_available(), 'liteattn_ops._C not built'; "
                            "print(torch.__version__, torch.cuda.get_device_name())"],
                           cwd=REPO, capture_output=True, text=True)
    if check.returncode:
        print("error: needs a CUDA GPU and liteattn_ops built with its kernel:\n" + check.stderr[-2000:])
        return 2
    env_line = check.stdout.strip()
    parts = {}
    with open(out / "log.txt", "w") as log:
        log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')} {env_line}\n")
        parts["demo"] = run("demo", [py, "-m", "liteattn_ops.demo", "--device", "cuda", "--quiet",
                                     "--out", str(full / "demo")] + demo_model_args, log, 240)
        if opts.preset == "demo-dit":   # (the sweep drives the demo DiT)
            parts["sweep"] = run("sweep", [py, "tools/sweep.py", "--device", "cuda", "--steps", "20", "--no-profile",
                                           "--thresholds=-inf,-10,-8,-6,-4", "--quiet", "--out", str(full / "sweep")]
                                 + model_args, log, 200)
        parts["wan"] = run("wan", [py, "-m", "liteattn_ops.demo", "--device", "cuda", "--preset", "wan2.1-1.3b-480p",
                                   "--eager", "--steps", "5", "--quiet", "--out", str(full / "wan")], log, 200)
        left = BUDGET_S - (time.perf_counter() - start)
        if left > 60:
            parts["demo_cuda_graphs"] = run(
                "demo_cuda_graphs", [py, "-m", "liteattn_ops.demo", "--device", "cuda", "--quiet", "--compile-mode",
                                     "reduce-overhead", "--out", str(full / "demo_cuda_graphs")] + demo_model_args,
                log, min(240, left))
        else:
            log.write(f"\n[demo_cuda_graphs skipped: {left:.0f} s left of the {BUDGET_S:.0f} s budget]\n")

    demo, cg = load(full / "demo" / "report.json"), load(full / "demo_cuda_graphs" / "report.json")
    sweep, wan = load(full / "sweep" / "sweep.json"), load(full / "wan" / "report.json")
    lines = [f"# liteattn_ops demo on the GPU ({env_line}, {time.strftime('%Y-%m-%d')})", "",
             "Commands: see log.txt. Times: CUDA events at step boundaries, no sync inside the timed loop; "
             "attention: torch.profiler kernel times in a separate untimed pass.", "",
             "| run | tokens | mode | dense ms/step | LiteAttention ms/step | speedup | PSNR / SSIM | tiles skipped "
             "(mean over steps) | attention speedup |", "|---|---|---|---|---|---|---|---|---|"]
    lines += demo_rows("demo (default)", demo)
    if cg:
        lines += demo_rows("demo, CUDA graphs", cg)
    if demo:
        lines += ["", "Per-layer live fraction at the end: " + ", ".join(
            f"{k.removesuffix('.liteattn')} {v:.2f}" for k, v in demo["liteattention"]["final_per_layer"].items()), ""]
        lines += ["## One compiled step, profiled (demo default)", ""] + breakdown(demo)
    if sweep:
        lines += ["", "## Threshold sweep", "", "| threshold | live at end | computed | speedup | PSNR (dB) | SSIM |",
                  "|---|---|---|---|---|---|"]
        for row in sweep["rows"]:
            p = row["psnr_db"]
            lines.append(f"| {row['threshold']} | {row['final_live_fraction']:.3f} | {row['computed_fraction']:.3f} | "
                         f"{row['speedup']:.3f}x | {p if isinstance(p, str) else f'{p:.2f}'} | {row['ssim']:.4f} |")
    if wan:
        steps = len(wan["dense"]["per_step"])
        lines += ["", "## Wan2.1-1.3B 480p (random weights, speed only)", "", "| run | ms/step | vs dense |", "|---|---|---|"]
        dense_s = wan["dense"]["total_time_s"] / steps
        lines.append(f"| dense SDPA | {ms(dense_s)} | 1.00x |")
        lines.append(f"| LiteAttention thr {wan['threshold']} | {ms(wan['liteattention']['total_time_s'] / steps)} | "
                     f"{wan['speedup']['total']:.2f}x |")
        for f in wan.get("forced_live_fractions") or []:
            lines.append(f"| forced live {f['live_fraction']:.2f} | {ms(f['step_time_s'])} | {dense_s / f['step_time_s']:.2f}x |")
        if wan.get("attention_share_dense"):
            lines.append(f"\nattention share of the dense step (profiled): {wan['attention_share_dense']:.0%}")
    lines += ["", "| part | rc | seconds |", "|---|---|---|"] + [f"| {k} | {rc} | {dt:.0f} |" for k, (rc, dt) in parts.items()]
    table = "\n".join(lines)
    (out / "summary.md").write_text(table + "\n")
    for src, dst in ((full / "demo" / "report.json", "demo_report.json"), (full / "demo" / "plot.png", "demo_plot.png"),
                     (full / "sweep" / "sweep.json", "sweep.json"), (full / "wan" / "report.json", "wan_report.json"),
                     (full / "wan" / "plot.png", "wan_plot.png"),
                     (full / "demo_cuda_graphs" / "report.json", "demo_cuda_graphs_report.json")):
        if src.is_file():
            shutil.copy(src, out / dst)
    print("\n" + table, flush=True)
    print(f"\nwrote {out} (full outputs in {full}); {time.perf_counter() - start:.0f} s", flush=True)
    return 0 if all(rc == 0 for rc, _ in parts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
