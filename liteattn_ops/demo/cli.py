"""Command line of the demo: arguments, their validation (everything that can be checked before any
work is done or any file is written), and `main`."""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from .errors import DemoError

PRESETS = ("demo-dit", "wan-small", "wan2.1-1.3b-480p")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
DEFAULT_THRESHOLD = -8.0
# Defaults per device. CUDA: 32 frames x 128x128 = 32,768 tokens, the token count of Wan2.1-1.3B at
# 480p (32,760), where attention is most of a step of the demo models; CPU: 4 x 64x64 = 1,024 tokens (the
# exact reference op computes every score; 2,048 tokens took 3.7 min with the small Wan model on 2 busy cores).
DEFAULT_SIZE = {"cuda": ("128x128", 32), "cpu": ("64x64", 4)}
WAN_SIZE = ("480x832", 81)
DEFAULT_FORCED_WAN = (0.75, 0.5, 0.25)


PRESET_HELP = """presets:
  wan-small         (default) a small diffusers WanTransformer3DModel trained in this project with a
                    locality term (tools/train_demo_dit.py --arch wan --recipe sparse; shipped in
                    liteattn_ops/demo/models/demo_wan.safetensors), sampled with diffusers'
                    FlowMatchEulerDiscreteScheduler: the code path of a diffusers user
  demo-dit          the project's own small video DiT (liteattn_ops/demo/models/demo_dit.safetensors),
                    trained without the locality term: two of its five layers never drop a tile
  wan2.1-1.3b-480p  diffusers' WanTransformer3DModel at the Wan2.1-1.3B config and 480p/81-frame token
                    count (32,760), RANDOM weights: speed only (dense, and forced live fractions)

On the CPU the LiteAttention op is its exact reference, which computes every score: CPU times do not
measure LiteAttention's speed; the live fractions and the quality are the real ones."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m liteattn_ops.demo",
        description="Sample a video twice from the same noise, dense SDPA vs LiteAttention; "
        "report speedup, live fractions and PSNR/SSIM.",
        epilog=PRESET_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", default="wan-small", choices=PRESETS)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda if available)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 20; 10 for the Wan preset)")
    p.add_argument("--threshold", type=float, default=None,
                   help=f"skip threshold in log2 units, <= 0 (-inf: never skip; default {DEFAULT_THRESHOLD})")
    p.add_argument("--thresholds", metavar="FILE", default=None,
                   help="calibrated per-site thresholds (liteattn_ops.calibration.ThresholdTable); "
                   "replaces --threshold. Default: <checkpoint stem>_thresholds.json beside the checkpoint if it "
                   "exists (else --threshold)")
    p.add_argument("--resolution", default=None,
                   help="HxW in pixels (default 64x64 on CPU, 128x128 on CUDA; 480x832 for the Wan preset)")
    p.add_argument("--frames", type=int, default=None,
                   help="frames (default 4 on CPU, 32 on CUDA; 81 for the Wan preset)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--compile", dest="mode", action="store_const", const="compile",
                      help='torch.compile both runs; LiteAttention with backend="liteattn" (default on CUDA)')
    mode.add_argument("--eager", dest="mode", action="store_const", const="eager",
                      help="liteattn_ops.enable() without compiling (default on CPU)")
    p.add_argument("--compile-mode", default=None, choices=COMPILE_MODES,
                   help="torch.compile mode of both runs (reduce-overhead: CUDA graphs for both; the default "
                   "on CUDA, where a step of the small models is otherwise bound by the host's kernel launches; "
                   "'default' elsewhere)")
    p.add_argument("--out", default="out/demo", help="output folder (replaced as a whole at the end)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise (and of the Wan preset's weights)")
    p.add_argument("--label", type=int, default=0, help="class to generate (demo DiT): 0 balls, 1 boxes, "
                   "2 rings, 3 diamonds")
    p.add_argument("--batch", type=int, default=1, help="videos sampled together")
    p.add_argument("--guidance", type=float, default=1.0,
                   help="classifier-free guidance scale (demo DiT; 1: none, else cond and uncond in one batch)")
    p.add_argument("--shift", type=float, default=3.0, help="flow schedule shift (> 0)")
    p.add_argument("--checkpoint", default=None,
                   help="safetensors of the demo DiT (default: the shipped one) or, with --preset wan-small, of the "
                   "small Wan model (default liteattn_ops/demo/models/demo_wan.safetensors, written by "
                   "tools/train_demo_dit.py --arch wan)")
    p.add_argument("--forced", default=None,
                   help="live fractions to time with fixed skip states, comma-separated in (0, 1] "
                   "(default 0.75,0.5,0.25 for the Wan preset, none for the demo DiT)")
    p.add_argument("--int8", action="store_true",
                   help="INT8 Q/K mode of the liteattn op (enable(..., use_int8=True)); the dense run stays SDPA")
    p.add_argument("--sdpa-backend", default="auto", choices=("auto", "cudnn", "flash", "efficient", "math"),
                   help="SDPA backend tried first for the calls that stay SDPA (the dense run, and cross-attention "
                   "in both runs); auto: cuDNN first on CUDA, PyTorch's default on CPU")
    p.add_argument("--no-warmup", action="store_true",
                   help="eager only: no untimed warm-up step (compiled runs always warm up: compilation is never timed)")
    p.add_argument("--no-profile", action="store_true",
                   help="skip the untimed torch.profiler pass that measures attention-only time")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    args.mode_requested = args.mode
    return args


def threshold_ok(value: float) -> bool:
    """The op's threshold rule (<= 0 in log2 units, or -inf), for command-line values."""
    return not math.isnan(value) and value <= 0


def _parse_resolution(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().replace(",", "x").split("x"))
    except ValueError:
        raise DemoError(f"--resolution must look like HxW (e.g. 64x64), got {text!r}") from None
    if h <= 0 or w <= 0:
        raise DemoError(f"--resolution must be positive, got {text!r}")
    return h, w


def _parse_forced(text) -> list[float]:
    if text is None:
        return []
    try:
        fractions = [float(f) for f in text.split(",") if f.strip()]
    except ValueError:
        raise DemoError(f"--forced must be comma-separated fractions in (0, 1], got {text!r}") from None
    if not fractions or any(not 0 < f <= 1 for f in fractions):  # (also rejects nan)
        raise DemoError(f"--forced fractions must be in (0, 1], got {text!r}")
    return fractions


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DemoError(f"unknown --device {name!r} (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DemoError("--device cuda was asked for, but PyTorch sees no CUDA GPU on this machine "
                            "(use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DemoError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise DemoError(f"--device {name!r} is not supported (cpu or cuda)")
    return device


def load_threshold_table(path: str):
    """The calibrated threshold table of --thresholds (liteattn_ops.calibration, imported only here)."""
    p = Path(path)
    if not p.is_file():
        raise DemoError(f"--thresholds {path}: no such file")
    try:
        from ..calibration import ThresholdTable
    except ImportError as e:
        raise DemoError(f"--thresholds needs liteattn_ops.calibration, which this install lacks ({e})") from None
    try:
        return ThresholdTable.load(p)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DemoError(f"--thresholds {path}: not a threshold table ({type(e).__name__}: {e})") from None


def default_thresholds_file(args) -> "Path | None":
    """`<checkpoint stem>_thresholds.json` beside the model's checkpoint, if it exists (written by
    liteattn_ops.calibration for that checkpoint)."""
    from .pipelines import WAN_SMALL_CHECKPOINT
    from .models import CHECKPOINT

    ckpt = Path(args.checkpoint) if args.checkpoint else (WAN_SMALL_CHECKPOINT if args.preset == "wan-small" else CHECKPOINT)
    candidate = ckpt.with_name(ckpt.stem + "_thresholds.json")
    return candidate if candidate.is_file() else None


def validate(args: argparse.Namespace) -> None:
    """Check everything that can be checked before any work or any file is written; fill defaults."""
    wan = args.preset == "wan2.1-1.3b-480p"
    if args.steps is None:
        args.steps = 10 if wan else 20
    if args.steps < 1:
        raise DemoError(f"--steps must be >= 1, got {args.steps}")
    if args.threshold is not None and args.thresholds is not None:
        raise DemoError("give --threshold or --thresholds FILE, not both")
    if args.threshold is not None and not threshold_ok(args.threshold):
        raise DemoError(f"--threshold must be <= 0 (log2 units; -inf never skips), got {args.threshold}")
    if args.batch < 1:
        raise DemoError(f"--batch must be >= 1, got {args.batch}")
    if not math.isfinite(args.guidance):
        raise DemoError(f"--guidance must be a finite number (1: no guidance), got {args.guidance}")
    if not (math.isfinite(args.shift) and args.shift > 0):
        raise DemoError(f"--shift must be a finite number > 0 (3 is Wan's), got {args.shift}")
    args.forced = _parse_forced(args.forced) or (list(DEFAULT_FORCED_WAN) if wan else [])
    args.device = _resolve_device(args.device)
    gpu = args.device.type == "cuda"
    size = WAN_SIZE if wan else DEFAULT_SIZE["cuda" if gpu else "cpu"]
    args.height, args.width = _parse_resolution(args.resolution or size[0])
    if args.frames is None:
        args.frames = size[1]
    if args.frames < 1:
        raise DemoError(f"--frames must be >= 1, got {args.frames}")
    if args.mode is None:
        args.mode = "compile" if gpu else "eager"
    if args.mode != "compile" and args.compile_mode not in (None, "default"):
        raise DemoError(f"--compile-mode {args.compile_mode} needs --compile")
    if args.compile_mode is None:
        # CUDA graphs for both runs on the GPU: measured on the H200 (BENCHMARKS.md, wave 3), the compiled
        # small Wan model spends ~9 ms of host time per step launching kernels, which hides the sparse run's
        # 4.6 ms of GPU work (1.41x with mode=default, 2.81x with CUDA graphs).
        args.compile_mode = "reduce-overhead" if (gpu and args.mode == "compile") else "default"
    if args.no_warmup and args.mode == "compile":
        raise DemoError("--no-warmup works with --eager only (a compiled run compiles in its warm-up step)")
    if wan:
        if not gpu:
            raise DemoError("--preset wan2.1-1.3b-480p needs --device cuda (1.3 B parameters, 32,760 tokens)")
        if args.height % 16 or args.width % 16 or (args.frames - 1) % 4:
            raise DemoError(f"--preset wan2.1-1.3b-480p: resolution must be divisible by 16 (VAE 8 x patch 2) "
                            f"and frames must be 4k+1, got {args.height}x{args.width}, {args.frames} frames")
    else:
        from .models import CLASS_NAMES

        if not 0 <= args.label < len(CLASS_NAMES):
            raise DemoError(f"--label must be in [0, {len(CLASS_NAMES)}), got {args.label}")
    if args.thresholds is None and args.threshold is None and args.preset != "wan2.1-1.3b-480p":
        # calibrated thresholds beside the checkpoint are the default once they exist
        default_table = default_thresholds_file(args)
        if default_table is not None:
            args.thresholds = str(default_table)
    if args.threshold is None:
        args.threshold = DEFAULT_THRESHOLD
    args.threshold_table = load_threshold_table(args.thresholds) if args.thresholds else None
    check_out(Path(args.out))


def check_out(out: Path) -> None:
    """--out must be a folder or not exist yet, and creatable: the missing part of the path is
    created for real inside a scratch folder of its nearest existing ancestor, then removed, so a
    read-only file system, a parent that is a file or a bad name fail now, for root too."""
    out = Path(os.path.abspath(out))
    if out.exists() and not out.is_dir():
        raise DemoError(f"--out {out} exists and is not a folder")
    ancestor, missing = out, []
    while not ancestor.exists():
        missing.insert(0, ancestor.name)
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise DemoError(f"--out {out}: cannot be created, {ancestor} is not a folder")
    target = out.parent if out.exists() else ancestor
    try:
        scratch = Path(tempfile.mkdtemp(prefix=".liteattn-demo-check-", dir=target))
    except OSError as e:
        raise DemoError(f"--out {out}: cannot write into {target} ({e.strerror or e})") from None
    try:
        if missing:
            scratch.joinpath(*missing).mkdir(parents=True)
        probe = scratch.joinpath(*missing, "probe")
        probe.write_bytes(b"")
    except OSError as e:
        raise DemoError(f"--out {out}: cannot be created under {ancestor} ({e.strerror or e})") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv=None) -> int:
    from .outputs import summary, write_outputs
    from .runner import run_demo

    try:
        args = parse_args(argv)
    except SystemExit as e:  # argparse already printed its message
        return int(e.code or 0)
    try:
        validate(args)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*liteattn_ops was installed without its CUDA kernel.*")
            result = run_demo(args)
    except DemoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        write_outputs(result, Path(args.out))
    except OSError as e:
        print(f"error: could not write the outputs into {args.out}: {e}", file=sys.stderr)
        return 1
    print(summary(result.report))
    return 0
