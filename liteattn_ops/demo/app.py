"""End-to-end demo: how much faster does a video DiT generate with LiteAttention, and at what cost?

    python -m liteattn_ops.demo                       # the trained demo DiT, CPU or GPU
    python -m liteattn_ops.demo --device cuda --resolution 128x128 --frames 16   # 16,384 tokens
    python -m liteattn_ops.demo --device cuda --preset wan2.1-1.3b-480p          # speed only

It samples one video twice from the same noise with the same Euler steps: once with plain
``F.scaled_dot_product_attention`` (dense) and once with LiteAttention, routed by the public API
(``liteattn_ops.enable(model, threshold=...)``, then ``torch.compile(model, backend="liteattn")``
with ``--compile``, the default on CUDA). Per denoising step it records the live fraction of
every self-attention layer (``liteattn_ops.stats``) and the step and attention times; at the end
the speedup, the quality of the LiteAttention video against the dense one (PSNR and SSIM over
frames), and where the outputs are. Outputs (into ``--out``, written to a temporary folder and
moved into place at the end, so a failed run leaves nothing half-written):

* ``report.json``: settings, per-step records of both runs, totals, speedup, quality;
* ``plot.png``: live fraction per step and layer; step (and attention) time per step, both runs;
* ``side_by_side.gif``: dense | LiteAttention | 4 x |difference|, frame by frame (demo DiT only).

Presets:

* ``demo-dit`` (default): the small video DiT trained in this project (``liteattn_ops.models``),
  whose attention is learned, local and temporally coherent, so skip fractions and quality are
  real. Default on CPU: 8 frames x 64x64 pixels = 2,048 tokens (about a minute with the
  reference op); default on CUDA: 16 frames x 128x128 = 16,384 tokens, the largest size it
  was trained at.
* ``wan2.1-1.3b-480p``: diffusers' ``WanTransformer3DModel`` at the real Wan2.1-1.3B config
  (30 layers, 12 x 128 heads) and the 480p / 81-frame token count (32,760), RANDOMLY
  INITIALISED: for speed only. Random weights give near-uniform attention, so skipping is not
  meaningful; it reports our kernel's dense speed inside the whole model against SDPA (cuDNN),
  and the step time at forced live fractions (fixed skip states, threshold -inf).

On the CPU the LiteAttention path is the exact reference implementation of the op, which
computes every score to decide what to skip: it is an oracle, not a fast path, so CPU times
do not measure LiteAttention's speed; the live fractions and the quality numbers are the real ones.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

PRESETS = ("demo-dit", "wan2.1-1.3b-480p")
SPEED_ONLY_LABEL = "SPEED ONLY: random-initialised weights, skipping and quality are not meaningful"


class DemoError(Exception):
    """Bad input or an unusable environment: printed as one line, exit status 2."""


# ------------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m liteattn_ops.demo",
        description="Sample a video twice from the same noise, dense SDPA vs LiteAttention; "
        "report speedup, live fractions and PSNR/SSIM.",
    )
    p.add_argument("--preset", default="demo-dit", choices=PRESETS)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda if available)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 20; 10 for the Wan preset)")
    p.add_argument("--threshold", type=float, default=-8.0,
                   help="skip threshold in log2 units, <= 0 (-inf: never skip)")
    p.add_argument("--resolution", default=None,
                   help="HxW in pixels (default 64x64 on CPU, 128x128 on CUDA; 480x832 for the Wan preset)")
    p.add_argument("--frames", type=int, default=None,
                   help="frames (default 8 on CPU, 16 on CUDA; 81 for the Wan preset)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--compile", dest="mode", action="store_const", const="compile",
                      help='torch.compile(model, backend="liteattn") (default on CUDA)')
    mode.add_argument("--eager", dest="mode", action="store_const", const="eager",
                      help="liteattn_ops.enable() without compiling (default on CPU)")
    p.add_argument("--out", default="out/demo", help="output folder (replaced as a whole at the end)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", type=int, default=0, help="class to generate (demo DiT): 0 balls, 1 boxes, "
                   "2 rings, 3 diamonds")
    p.add_argument("--batch", type=int, default=1, help="videos sampled together")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (demo DiT)")
    p.add_argument("--shift", type=float, default=3.0, help="flow schedule shift")
    p.add_argument("--checkpoint", default=None, help="demo DiT safetensors (default: the shipped one)")
    p.add_argument("--forced", default="0.75,0.5,0.25",
                   help="Wan preset: live fractions to time with fixed skip states")
    p.add_argument("--sdpa-backend", default="auto", choices=("auto", "cudnn", "flash", "efficient", "math"),
                   help="SDPA backend tried first for the calls that stay SDPA (the dense run, and cross-attention "
                   "in both runs); auto: cuDNN first on CUDA, PyTorch's default on CPU")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up steps")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    args.mode_requested = args.mode
    return args


def _parse_resolution(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().replace(",", "x").split("x"))
    except ValueError:
        raise DemoError(f"--resolution must look like HxW (e.g. 64x64), got {text!r}") from None
    if h <= 0 or w <= 0:
        raise DemoError(f"--resolution must be positive, got {text!r}")
    return h, w


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


def validate(args: argparse.Namespace) -> None:
    """Check everything that can be checked before any work or any file is written."""
    args.device = _resolve_device(args.device)
    wan = args.preset == "wan2.1-1.3b-480p"
    if args.steps is None:
        args.steps = 10 if wan else 20
    if args.steps < 1:
        raise DemoError(f"--steps must be >= 1, got {args.steps}")
    if not threshold_ok(args.threshold):
        raise DemoError(f"--threshold must be <= 0 (log2 units; -inf never skips), got {args.threshold}")
    if args.batch < 1:
        raise DemoError(f"--batch must be >= 1, got {args.batch}")
    gpu = args.device.type == "cuda"
    args.height, args.width = _parse_resolution(args.resolution or ("480x832" if wan else "128x128" if gpu else "64x64"))
    if args.frames is None:
        args.frames = 81 if wan else 16 if gpu else 8
    if args.frames < 1:
        raise DemoError(f"--frames must be >= 1, got {args.frames}")
    if args.mode is None:
        args.mode = "compile" if args.device.type == "cuda" else "eager"
    if wan:
        if args.device.type != "cuda":
            raise DemoError("--preset wan2.1-1.3b-480p needs --device cuda (1.3 B parameters, 32,760 tokens)")
        if args.height % 16 or args.width % 16 or (args.frames - 1) % 4:
            raise DemoError(f"--preset wan2.1-1.3b-480p: resolution must be divisible by 16 (VAE 8 x patch 2) "
                            f"and frames must be 4k+1, got {args.height}x{args.width}, {args.frames} frames")
        try:
            args.forced = [float(f) for f in args.forced.split(",") if f.strip()]
        except ValueError:
            raise DemoError(f"--forced must be comma-separated fractions, got {args.forced!r}") from None
        if any(not 0 < f <= 1 for f in args.forced):
            raise DemoError(f"--forced fractions must be in (0, 1], got {args.forced}")
    else:
        from .models import CLASS_NAMES

        if not 0 <= args.label < len(CLASS_NAMES):
            raise DemoError(f"--label must be in [0, {len(CLASS_NAMES)}), got {args.label}")
    check_out(Path(args.out))


def check_out(out: Path) -> None:
    """--out must be a folder or not exist yet, under a writable existing ancestor (created at the end)."""
    if out.exists() and not out.is_dir():
        raise DemoError(f"--out {out} exists and is not a folder")
    ancestor = out.resolve().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK):
        raise DemoError(f"--out {out}: cannot create it under {ancestor}")


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------


class StepClock:
    """Wall time of one denoising step (device-synchronised) and the time spent in self-attention.

    Attention time: while ``attention_timing`` is active, ``F.scaled_dot_product_attention`` is
    wrapped so each self-attention call (S_q == S_k) is timed with CUDA events (host clock on
    CPU). The wrapper sits outside liteattn's router, so the LiteAttention time includes the
    routing. Not available when compiled (the attention is inside a fused graph): None then.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.pending: list = []
        self.cpu_time = 0.0

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def attention_timing(self, enabled: bool):
        if not enabled:
            yield
            return
        inner = F.scaled_dot_product_attention

        def timed_sdpa(query, key, value, *a, **kw):
            if query.shape[-2] != key.shape[-2]:
                return inner(query, key, value, *a, **kw)
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = inner(query, key, value, *a, **kw)
                end.record()
                self.pending.append((start, end))
            else:
                t0 = time.perf_counter()
                out = inner(query, key, value, *a, **kw)
                self.cpu_time += time.perf_counter() - t0
            return out

        F.scaled_dot_product_attention = timed_sdpa
        try:
            yield
        finally:
            F.scaled_dot_product_attention = inner

    def take_attention(self) -> float:
        """Seconds of self-attention since the last call (synchronises)."""
        self.sync()
        total = self.cpu_time + sum(s.elapsed_time(e) for s, e in self.pending) / 1e3
        self.pending.clear()
        self.cpu_time = 0.0
        return total


# ------------------------------------------------------------------------------------------------
# Models ("pipelines": a model plus a function that runs N denoising steps from fixed noise)
# ------------------------------------------------------------------------------------------------


class DemoDiTPipeline:
    preset = "demo-dit"
    speed_only = False

    def __init__(self, args):
        from .models import CLASS_NAMES, load_demo_model

        try:
            self.model, self.meta = load_demo_model(args.checkpoint, device=args.device)
        except ValueError as e:  # CheckpointError is a ValueError
            raise DemoError(str(e)) from None
        try:
            self.grid = self.model.token_grid(args.frames, args.height, args.width)
        except ValueError as e:
            raise DemoError(f"--resolution/--frames: {e}") from None
        self.args = args
        self.device = args.device
        self.class_names = CLASS_NAMES
        g = torch.Generator().manual_seed(args.seed)
        self.noise = torch.randn(args.batch, 3, args.frames, args.height, args.width, generator=g).to(self.device)
        self.labels = torch.full((args.batch,), args.label, dtype=torch.long, device=self.device)
        self.model.rope(self.grid, self.noise.device)  # fill the RoPE cache outside any compiled graph
        self.tokens = self.grid[0] * self.grid[1] * self.grid[2]
        self.autocast = self.device.type == "cuda"

    def describe(self) -> dict:
        cfg = self.model.cfg
        return {
            "name": "demo video DiT (trained in this project, liteattn_ops/models)",
            "config": cfg.to_dict(),
            "num_params": self.model.num_params(),
            "self_attention_layers": cfg.depth,
            "heads": cfg.num_heads,
            "head_dim": cfg.head_dim,
            "token_grid": list(self.grid),
            "training": self.meta.get("training", {}),
            "class": self.class_names[self.args.label],
            "dtype": "bfloat16 autocast" if self.autocast else "float32",
        }

    def run(self, model, steps: int, callback: Callable[[int, float], None]) -> torch.Tensor:
        from .models import sample

        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
            return sample(model, self.noise, self.labels, steps=steps, shift=self.args.shift,
                          guidance=self.args.guidance, callback=callback)

    def to_frames(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> float (T, H, W, 3) in [0, 1] of the first video."""
        return ((video[0].float().clamp(-1, 1) + 1) / 2).permute(1, 2, 3, 0).cpu()


WAN_1_3B_CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024,
)


class WanPipeline:
    preset = "wan2.1-1.3b-480p"
    speed_only = True

    def __init__(self, args):
        try:
            from diffusers import WanTransformer3DModel
        except ImportError as e:
            raise DemoError(f"--preset wan2.1-1.3b-480p needs diffusers (pip install diffusers): {e}") from None
        self.args = args
        self.device = args.device
        lat_t, lat_h, lat_w = (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8
        self.grid = (lat_t, lat_h // 2, lat_w // 2)
        self.tokens = self.grid[0] * self.grid[1] * self.grid[2]
        torch.manual_seed(args.seed)
        with torch.device(self.device):
            self.model = WanTransformer3DModel(**WAN_1_3B_CONFIG).to(dtype=torch.bfloat16).eval()
        g = torch.Generator().manual_seed(args.seed)
        self.noise = torch.randn(args.batch, 16, lat_t, lat_h, lat_w, generator=g).to(self.device, torch.bfloat16)
        self.text = (torch.randn(args.batch, 512, 4096, generator=g) * 0.1).to(self.device, torch.bfloat16)

    def describe(self) -> dict:
        return {
            "name": "diffusers WanTransformer3DModel, Wan2.1-1.3B config, " + SPEED_ONLY_LABEL,
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in WAN_1_3B_CONFIG.items()},
            "num_params": sum(p.numel() for p in self.model.parameters()),
            "self_attention_layers": WAN_1_3B_CONFIG["num_layers"],
            "heads": 12,
            "head_dim": 128,
            "token_grid": list(self.grid),
            "latent_shape": list(self.noise.shape),
            "dtype": "bfloat16",
        }

    @torch.no_grad()
    def run(self, model, steps: int, callback: Callable[[int, float], None]) -> torch.Tensor:
        ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
        ts = self.args.shift * ts / (1 + (self.args.shift - 1) * ts)
        x = self.noise.float()
        for i in range(steps):
            t = float(ts[i])
            tt = torch.full((x.shape[0],), t * 1000.0, device=self.device)
            v = model(hidden_states=x.to(torch.bfloat16), timestep=tt, encoder_hidden_states=self.text,
                      return_dict=False)[0]
            x = x + (float(ts[i + 1]) - t) * v.float()
            callback(i, t)
        return x

    def to_frames(self, video):
        return None


# ------------------------------------------------------------------------------------------------
# Quality
# ------------------------------------------------------------------------------------------------


def psnr_db(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two images/videos with values in [0, 1] (inf when identical)."""
    mse = float(((a.double() - b.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM of two (H, W, C) images in [0, 1]: Gaussian window 11, sigma 1.5, per channel."""
    x = a.double().permute(2, 0, 1)[None]
    y = b.double().permute(2, 0, 1)[None]
    c = x.shape[1]
    size = min(11, x.shape[-1], x.shape[-2])
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * 1.5**2))
    g = g / g.sum()
    win = (g[:, None] * g[None, :]).expand(c, 1, size, size)

    def filt(z):
        return F.conv2d(z, win, groups=c)

    mu_x, mu_y = filt(x), filt(y)
    sxx = filt(x * x) - mu_x**2
    syy = filt(y * y) - mu_y**2
    sxy = filt(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return float(s.mean())


def video_quality(ref: torch.Tensor, test: torch.Tensor) -> dict:
    """PSNR/SSIM of (T, H, W, 3) videos in [0, 1], per frame and over the whole video."""
    per_psnr = [psnr_db(ref[t], test[t]) for t in range(ref.shape[0])]
    per_ssim = [ssim(ref[t], test[t]) for t in range(ref.shape[0])]
    return {
        "psnr_db": _num(psnr_db(ref, test)),
        "psnr_db_per_frame": [_num(v) for v in per_psnr],
        "ssim": sum(per_ssim) / len(per_ssim),
        "ssim_per_frame": per_ssim,
        "max_abs_diff": float((ref - test).abs().max()),
        "note": "LiteAttention video vs the dense video, pixels in [0, 1]; PSNR 'inf' = identical",
    }


def _num(v: float):
    """JSON-safe number: inf/nan as strings."""
    return v if math.isfinite(v) else str(v)


# ------------------------------------------------------------------------------------------------
# The two runs
# ------------------------------------------------------------------------------------------------


def _progress(total: int, desc: str, quiet: bool):
    if quiet:
        return contextlib.nullcontext(None)
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, leave=True, file=sys.stderr)


def _self_attention_stats(model) -> dict:
    """liteattn_ops.stats(model) restricted to self-attention sites that hold a state."""
    from .. import stats

    return {name: s for name, s in stats(model).items() if s["live_fraction"] is not None}


CPU_NOTE = ("CPU: the LiteAttention op runs its exact reference implementation, which computes every score "
            "(it skips no work), so CPU times do not measure LiteAttention's speed; the live fractions and the "
            "quality numbers are the real ones.")


def threshold_ok(value: float) -> bool:
    """The op's threshold rule (<= 0 in log2 units, or -inf), for command-line values."""
    return not math.isnan(value) and value <= 0


def computed_fractions(per_step: list) -> list:
    """Fraction of tiles each step computed: the live fraction after the previous step (all at step 0)."""
    out, prev = [], 1.0
    for rec in per_step:
        out.append(prev)
        prev = rec["live_fraction"] if rec["live_fraction"] is not None else prev
    return out


def _warm_up(pipe, run_model, eager_model, mode: str, steps: int, what: str, notes: list):
    """Untimed warm-up steps (compilation happens here). If compiling fails, fall back to the eager
    model and say so in the notes. Returns (mode, model to time)."""
    if not steps:
        return mode, run_model
    try:
        pipe.run(run_model, steps, lambda i, t: None)
        return mode, run_model
    except Exception as e:  # noqa: BLE001
        if mode != "compile":
            raise
        notes.append(f"{what} failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); fell back to eager")
        torch._dynamo.reset()
        pipe.run(eager_model, steps, lambda i, t: None)   # (the caller resets the skip states after)
        return "eager", eager_model


def sample_run(pipe, model, args, clock: StepClock, *, lite: bool, time_attention: bool, desc: str) -> dict:
    """Run the denoising loop once, timing every step; returns the records and the video."""
    records = []
    t_prev = [0.0]
    stats_model = getattr(model, "_orig_mod", model)  # stats on the module, not the compiled wrapper

    def callback(i, t):
        clock.sync()
        now = time.perf_counter()
        rec = {"step": i, "t": t, "step_time_s": now - t_prev[0]}
        rec["attention_time_s"] = clock.take_attention() if time_attention else None
        if lite:
            st = _self_attention_stats(stats_model)
            rec["live_fraction_per_layer"] = {n: s["live_fraction"] for n, s in st.items()}
            rec["live_fraction"] = (sum(rec["live_fraction_per_layer"].values()) / len(st)) if st else None
        records.append(rec)
        if bar is not None:
            bar.update(1)
            if lite and rec["live_fraction"] is not None:
                bar.set_postfix(live=f"{rec['live_fraction']:.3f}")
        clock.sync()
        t_prev[0] = time.perf_counter()

    with _progress(args.steps, desc, args.quiet) as bar:
        with clock.attention_timing(time_attention):
            clock.take_attention()
            clock.sync()
            t_prev[0] = t0 = time.perf_counter()
            video = pipe.run(model, args.steps, callback)
            clock.sync()
            total = time.perf_counter() - t0
    # the time spent in the callback itself (stats) is excluded from the step times
    out = {"total_time_s": sum(r["step_time_s"] for r in records), "wall_time_s": total, "per_step": records}
    if time_attention:
        out["attention_time_s"] = sum(r["attention_time_s"] for r in records)
    else:
        out["attention_time_s"] = None
    return out, video


def sdpa_priority(name: str, device: torch.device):
    """Context that makes SDPA try `name` first (falling back to the others when unsupported)."""
    if name == "auto" and device.type != "cuda":
        return contextlib.nullcontext(), "default"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    first = "cudnn" if name == "auto" else name
    backends = [order[first]] + [b for k, b in order.items() if k != first]
    try:
        return sdpa_kernel(backends, set_priority=True), f"{first} first"
    except TypeError:  # older torch: no priority order
        return sdpa_kernel(backends), "any"


def _compile_backend():
    from .. import backend as make_backend

    try:
        import torch._dynamo as dynamo

        if "liteattn" in dynamo.list_backends(exclude_tags=()):
            return "liteattn"
    except Exception:  # noqa: BLE001  (the registry lookup is best effort)
        pass
    return make_backend()


def run_demo(args) -> tuple[dict, Optional[torch.Tensor], Optional[torch.Tensor], Optional[object]]:
    ctx, args.sdpa_order = sdpa_priority(args.sdpa_backend, args.device)
    with ctx:
        return _run_demo(args)


def _run_demo(args):
    import liteattn_ops

    pipe = WanPipeline(args) if args.preset == "wan2.1-1.3b-480p" else DemoDiTPipeline(args)
    model = pipe.model
    device = args.device
    clock = StepClock(device)
    notes = []
    if pipe.speed_only:
        notes.append(SPEED_ONLY_LABEL)
    if device.type == "cpu":
        notes.append(CPU_NOTE)
    elif not liteattn_ops.is_available():
        raise DemoError("--device cuda: liteattn_ops was installed without its CUDA kernel (liteattn_ops._C); "
                        "reinstall with nvcc on PATH, or use --device cpu")
    mode = args.mode
    warm_steps = 0 if args.no_warmup else (1 if device.type == "cpu" else 2)

    # ---------------- dense
    dense_model = torch.compile(model) if mode == "compile" else model
    mode, dense_model = _warm_up(pipe, dense_model, model, mode, warm_steps, "torch.compile", notes)
    dense, dense_video = sample_run(pipe, dense_model, args, clock, lite=False,
                                    time_attention=mode == "eager", desc="dense SDPA")

    # ---------------- LiteAttention
    sites = liteattn_ops.enable(model, threshold=args.threshold)
    lite_model = model
    if mode == "compile":
        lite_model = torch.compile(model, backend=_compile_backend())
    try:
        mode, lite_model = _warm_up(pipe, lite_model, model, mode, warm_steps,
                                    "torch.compile(backend='liteattn')", notes)
        liteattn_ops.reset(model)
        lite, lite_video = sample_run(pipe, lite_model, args, clock, lite=True,
                                      time_attention=mode == "eager", desc=f"LiteAttention thr={args.threshold:g}")
        final_stats = _self_attention_stats(model)
        routed = liteattn_ops.format_report(model)
        forced = None
        if pipe.speed_only:
            forced = forced_fraction_runs(pipe, lite_model, model, args, clock)
    finally:
        liteattn_ops.disable(model)

    if mode == "compile":
        notes.append("compiled: attention calls sit inside fused graphs, so only whole-step times are reported; "
                     "run with --eager for per-step attention times")
    for rec, computed in zip(lite["per_step"], computed_fractions(lite["per_step"])):
        rec["computed_fraction"] = computed
    lite["final_live_fraction"] = lite["per_step"][-1]["live_fraction"]
    lite["mean_computed_fraction"] = sum(r["computed_fraction"] for r in lite["per_step"]) / len(lite["per_step"])
    lite["final_per_layer"] = {n: s["live_fraction"] for n, s in final_stats.items()}
    lite["final_per_head"] = {n: s["live_fraction_per_head"] for n, s in final_stats.items()}
    lite["routed_sites"] = routed.splitlines()

    report = {
        "preset": pipe.preset,
        "speed_only": pipe.speed_only,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "liteattn_ops": liteattn_ops.__version__,
        "kernel": "CUDA (liteattn_ops._C)" if device.type == "cuda" else "CPU reference",
        "mode": mode,
        "mode_requested": args.mode_requested or "default",
        "sdpa_backend": args.sdpa_order,
        "threshold": _num(args.threshold),
        "steps": args.steps,
        "warmup_steps": warm_steps,
        "frames": args.frames,
        "height": args.height,
        "width": args.width,
        "batch": args.batch,
        "tokens": pipe.tokens,
        "seed": args.seed,
        "guidance": args.guidance,
        "shift": args.shift,
        "model": pipe.describe(),
        "routed_sites": len(sites),
        "dense": dense,
        "liteattention": lite,
        "speedup": {
            "total": dense["total_time_s"] / lite["total_time_s"],
            "attention": (dense["attention_time_s"] / lite["attention_time_s"])
            if dense["attention_time_s"] and lite["attention_time_s"] else None,
            "note": "dense time / LiteAttention time over the timed denoising steps (warm-up excluded)",
        },
        "notes": notes,
    }
    if forced is not None:
        report["forced_live_fractions"] = forced
    frames_dense = pipe.to_frames(dense_video)
    frames_lite = pipe.to_frames(lite_video)
    if frames_dense is not None:
        report["quality"] = video_quality(frames_dense, frames_lite)
    else:
        report["quality"] = None
    return report, frames_dense, frames_lite, pipe


def forced_fraction_runs(pipe, lite_model, model, args, clock) -> list[dict]:
    """Speed at fixed live fractions: every state set to a random mask with that fraction of live
    tiles in every query-tile row (at least one), threshold -inf so nothing changes."""
    import liteattn_ops
    from ..routing.router import routed_sites
    from ..core.state import pack_bits
    from ..testing import forced_live

    results = []
    thr = args.threshold
    liteattn_ops.set_threshold(model, -math.inf)
    g = torch.Generator().manual_seed(0)
    steps = min(args.steps, 3)
    try:
        for frac in [1.0] + list(args.forced):
            for _, site in routed_sites(model):
                for name, state in site.states().items():
                    mask = forced_live(*site.live_mask(name).shape, frac, "balanced", g)
                    state.copy_(pack_bits(mask.to(state.device), fill=False))
            clock.sync()
            t0 = time.perf_counter()
            pipe.run(lite_model, steps, lambda i, t: None)
            clock.sync()
            results.append({"live_fraction": frac, "step_time_s": (time.perf_counter() - t0) / steps,
                            "steps": steps})
    finally:
        liteattn_ops.set_threshold(model, thr)
    return results


# ------------------------------------------------------------------------------------------------
# Outputs
# ------------------------------------------------------------------------------------------------


def write_plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lite, dense = report["liteattention"], report["dense"]
    has_attn = dense["attention_time_s"] is not None
    fig, axes = plt.subplots(1, 3 if has_attn else 2, figsize=(15 if has_attn else 10, 4), dpi=100)
    ax = axes[0]
    steps = [r["step"] for r in lite["per_step"]]
    layers = list(lite["per_step"][0]["live_fraction_per_layer"])
    cmap = plt.get_cmap("viridis")
    for j, name in enumerate(layers):
        ax.plot(steps, [r["live_fraction_per_layer"][name] for r in lite["per_step"]], lw=1,
                color=cmap(j / max(1, len(layers) - 1)), label=name if len(layers) <= 8 else None)
    ax.plot(steps, [r["live_fraction"] for r in lite["per_step"]], "k--", lw=2, label="mean")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("denoising step")
    ax.set_ylabel("live fraction of KV tiles (after the step)")
    ax.set_title(f"live fraction per layer, threshold {report['threshold']}")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax = axes[1]
    ax.plot(steps, [r["step_time_s"] * 1e3 for r in dense["per_step"]], "o-", label="dense SDPA")
    ax.plot(steps, [r["step_time_s"] * 1e3 for r in lite["per_step"]], "o-", label="LiteAttention")
    ax.set_xlabel("denoising step")
    ax.set_ylabel("ms")
    ax.set_title(f"step time (speedup {report['speedup']['total']:.2f}x)")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.grid(alpha=0.3)
    if has_attn:
        ax = axes[2]
        ax.plot(steps, [r["attention_time_s"] * 1e3 for r in dense["per_step"]], "o-", label="dense SDPA")
        ax.plot(steps, [r["attention_time_s"] * 1e3 for r in lite["per_step"]], "o-", label="LiteAttention")
        ax.set_xlabel("denoising step")
        ax.set_ylabel("ms")
        sp = report["speedup"]["attention"]
        ax.set_title("self-attention time per step" + (f" (speedup {sp:.2f}x)" if sp else ""))
        ax.set_ylim(bottom=0)
        ax.legend()
        ax.grid(alpha=0.3)
    q = report.get("quality")
    title = f"{report['preset']} on {report['device_name']}, {report['tokens']} tokens, {report['mode']}"
    if q:
        title += f" | PSNR {q['psnr_db'] if isinstance(q['psnr_db'], str) else round(q['psnr_db'], 2)} dB, " \
                 f"SSIM {q['ssim']:.4f}"
    if report["speed_only"]:
        title += " | " + SPEED_ONLY_LABEL
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_gif(frames_dense: torch.Tensor, frames_lite: torch.Tensor, path: Path, fps: float = 8.0) -> None:
    """dense | LiteAttention | 4 x |difference|, upscaled to >= 192 px high, with captions."""
    from PIL import Image, ImageDraw

    t, h, w, _ = frames_dense.shape
    scale = max(1, 192 // h)
    diff = ((frames_dense - frames_lite).abs() * 4).clamp(0, 1)
    strip = torch.cat([frames_dense, frames_lite, diff], dim=2)  # (T, H, 3W, 3)
    images = []
    for i in range(t):
        arr = (strip[i].numpy() * 255).round().astype("uint8")
        im = Image.fromarray(arr).resize((3 * w * scale, h * scale), Image.NEAREST)
        canvas = Image.new("RGB", (im.width, im.height + 14), (0, 0, 0))
        canvas.paste(im, (0, 14))
        d = ImageDraw.Draw(canvas)
        for j, text in enumerate(("dense SDPA", "LiteAttention", "4x |diff|")):
            d.text((j * w * scale + 3, 1), text, fill=(255, 255, 255))
        images.append(canvas)
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)


def write_outputs(report: dict, frames_dense, frames_lite, out: Path) -> dict:
    """Write everything into a temporary folder beside `out`, then move it into place."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        files = {"report": out / "report.json", "plot": out / "plot.png"}
        if frames_dense is not None:
            files["gif"] = out / "side_by_side.gif"
            write_gif(frames_dense, frames_lite, tmp / "side_by_side.gif")
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


def summary(report: dict) -> str:
    lite, dense, sp = report["liteattention"], report["dense"], report["speedup"]
    lines = [
        f"LiteAttention demo: {report['preset']} on {report['device_name']} ({report['kernel']}, {report['mode']})",
        f"  {report['frames']} frames x {report['height']}x{report['width']} = {report['tokens']} tokens, "
        f"{report['steps']} steps, threshold {report['threshold']}",
    ]
    if report["speed_only"]:
        lines.append("  " + SPEED_ONLY_LABEL)
    lines.append(f"  dense SDPA     : {dense['total_time_s']:.3f} s" +
                 (f" (attention {dense['attention_time_s']:.3f} s)" if dense["attention_time_s"] is not None else ""))
    lines.append(f"  LiteAttention  : {lite['total_time_s']:.3f} s" +
                 (f" (attention {lite['attention_time_s']:.3f} s)" if lite["attention_time_s"] is not None else ""))
    lines.append(f"  speedup        : {sp['total']:.3f}x total" +
                 (f", {sp['attention']:.3f}x attention" if sp["attention"] else ""))
    lines.append(f"  live fraction  : {lite['final_live_fraction']:.3f} at the end, "
                 f"{lite['mean_computed_fraction']:.3f} computed on average over the steps")
    layers = lite.get("final_per_layer") or {}
    if layers and len(layers) <= 8:
        lines.append("  per layer      : " + ", ".join(
            f"{n.removesuffix('.liteattn')} {v:.2f}" for n, v in layers.items()))
    q = report.get("quality")
    if q:
        lines.append(f"  quality vs dense: PSNR {q['psnr_db'] if isinstance(q['psnr_db'], str) else format(q['psnr_db'], '.2f')} dB, "
                     f"SSIM {q['ssim']:.4f}")
    for f in report.get("forced_live_fractions") or []:
        lines.append(f"  forced live {f['live_fraction']:.2f}: {f['step_time_s'] * 1e3:.1f} ms/step")
    for n in report["notes"]:
        lines.append(f"  note: {n}")
    for k, v in report.get("outputs", {}).items():
        lines.append(f"  {k:7s}: {v}")
    return "\n".join(lines)


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as e:  # argparse already printed its message
        return int(e.code or 0)
    try:
        validate(args)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*liteattn_ops was installed without its CUDA kernel.*")
            report, fd, fl, _ = run_demo(args)
    except DemoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        write_outputs(report, fd, fl, Path(args.out))
    except OSError as e:
        print(f"error: could not write the outputs into {args.out}: {e}", file=sys.stderr)
        return 1
    print(summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
