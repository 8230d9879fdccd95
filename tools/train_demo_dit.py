#!/usr/bin/env python3
"""Train the demo's small video DiT with rectified flow on procedural videos.

Writes into ``--out`` (default: ``liteattn_ops/demo/models/``, the shipped checkpoint):

* ``demo_dit.safetensors``: EMA weights in float16;
* ``demo_dit.json``: model config, training command and settings, steps, final
  loss, wall time, device;
* ``demo_dit_loss.png``: loss curve;
* ``demo_dit_samples.png``: a few samples per class at two resolutions.

Multi-resolution: each step draws one (frames, height, width) from
``--resolutions`` and a batch size that keeps the tokens per step near
``--tokens-per-step``, so the 3-D RoPE sees the positions of every size the demo
runs at. Training stops at ``--steps`` or at ``--time-budget`` seconds, whichever
comes first; the learning-rate schedule follows whichever is further along.

Recipes (``--recipe``; explicit flags override a recipe's values):

* ``v1``: the first shipped checkpoint (one H200, about 8 minutes): sizes up to 16x128x128
  (16,384 tokens), no locality term::

      python tools/train_demo_dit.py --device cuda --recipe v1

* ``sparse``: a model whose attention is local the way trained video DiTs are, for the GPU demo
  (one H200, 20 minutes of training plus about a minute of sampling and measuring): sizes up to
  32x128x128 (32,768 tokens, the Wan2.1-1.3B 480p token count) and a locality term (the
  attention mass that random queries give to keys outside a (2 frames, 6 rows, 6 columns) box,
  weight 0.05; see ``liteattn_ops.demo.models.dit.Locality``). Small far mass is what lets
  LiteAttention drop the far tiles (their scores sit many log2 units below the row maximum)::

      python tools/train_demo_dit.py --device cuda --recipe sparse

After training the script measures how sparse the model is (``--sparsity-threshold``, at the
largest trained size on CUDA, the smallest on CPU): live fraction per layer and head after 20
Euler steps with LiteAttention, written into the JSON and printed.

``--arch wan`` trains a small diffusers ``WanTransformer3DModel`` instead (the same sizes, patch
(1, 4, 4), learned class tokens as its cross-attention context;
``liteattn_ops.demo.models.wan_small``), with the locality term taken from its SDPA calls, and
writes ``demo_wan.safetensors`` / ``.json``; the demo runs it with ``--preset wan-small``, sampled
with diffusers' ``FlowMatchEulerDiscreteScheduler``::

    python tools/train_demo_dit.py --device cuda --recipe sparse --arch wan

CPU smoke test (seconds)::

    python tools/train_demo_dit.py --device cpu --steps 20 --dim 64 --depth 2 \
        --resolutions 4x32x32 --tokens-per-step 1024 --out /tmp/dit
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from liteattn_ops.demo.models.dit import DiTConfig, VideoDiT, sample  # noqa: E402
from liteattn_ops.demo.models.videos import CLASS_NAMES, generate_videos  # noqa: E402

DEFAULT_RESOLUTIONS = "8x64x64:0.35,16x64x64:0.2,8x96x96:0.15,8x128x128:0.15,16x128x128:0.15"
RECIPES = {
    "v1": {"resolutions": DEFAULT_RESOLUTIONS, "time_budget": 450.0, "locality_weight": 0.0},
    "sparse": {"resolutions": "8x64x64:0.15,16x128x128:0.35,32x128x128:0.5", "time_budget": 1200.0,
               "locality_weight": 0.05, "locality_radius": "2,6,6"},
}


def parse_resolutions(spec: str) -> list[tuple[tuple[int, int, int], float]]:
    out = []
    for item in spec.split(","):
        res, _, w = item.partition(":")
        f, h, wd = (int(v) for v in res.lower().split("x"))
        out.append(((f, h, wd), float(w) if w else 1.0))
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(REPO / "liteattn_ops" / "demo" / "models"))
    p.add_argument("--arch", choices=("dit", "wan"), default="dit",
                   help="dit: the project's VideoDiT; wan: a small diffusers WanTransformer3DModel "
                   "(liteattn_ops.demo.models.wan_small, sampled with FlowMatchEulerDiscreteScheduler)")
    p.add_argument("--name", default=None, help="file name stem (default demo_dit, or demo_wan with --arch wan)")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="v1", help="a set of defaults (see above)")
    p.add_argument("--steps", type=int, default=100_000, help="upper bound on optimizer steps")
    p.add_argument("--time-budget", type=float, default=None, help="seconds of training (excl. setup/sampling)")
    p.add_argument("--resolutions", default=None, help="FxHxW[:weight],...")
    p.add_argument("--locality-weight", type=float, default=None,
                   help="weight of the locality term (0: off); see liteattn_ops.demo.models.dit.Locality")
    p.add_argument("--locality-radius", default=None, help="T,H,W box of near keys in tokens (default 2,6,6)")
    p.add_argument("--locality-queries", type=int, default=64, help="sampled queries per (batch, head)")
    p.add_argument("--sparsity-threshold", type=float, default=-8.0,
                   help="threshold of the sparsity measured after training (log2 units)")
    p.add_argument("--no-sparsity", action="store_true", help="skip the sparsity measurement")
    p.add_argument("--tokens-per-step", type=int, default=65536)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--class-dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dim", type=int, default=DiTConfig.dim)
    p.add_argument("--depth", type=int, default=DiTConfig.depth)
    p.add_argument("--num-heads", type=int, default=None, help="default: dim // 64")
    p.add_argument("--mlp-ratio", type=float, default=DiTConfig.mlp_ratio)
    p.add_argument("--save-every", type=float, default=90.0, help="seconds between checkpoint saves")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--no-samples", action="store_true")
    args = p.parse_args(argv)
    for key, value in RECIPES[args.recipe].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.name is None:
        args.name = "demo_wan" if args.arch == "wan" else "demo_dit"
    if args.locality_radius is None:
        args.locality_radius = "2,6,6"
    try:
        args.locality_radius = tuple(int(v) for v in str(args.locality_radius).split(","))
        assert len(args.locality_radius) == 3 and min(args.locality_radius) >= 0
    except (ValueError, AssertionError):
        p.error(f"--locality-radius must be three integers >= 0 (T,H,W), got {args.locality_radius!r}")
    if not args.locality_weight >= 0:
        p.error(f"--locality-weight must be >= 0, got {args.locality_weight}")
    if not args.time_budget > 0:
        p.error(f"--time-budget must be > 0, got {args.time_budget}")
    return args


@torch.no_grad()
def sampler_of(model):
    """The demo's sampler for this model: Euler for the VideoDiT, diffusers' FlowMatchEulerDiscreteScheduler
    for the Wan model."""
    from liteattn_ops.demo.models.wan_small import WanClassModel, sample_flow_match

    return sample_flow_match if isinstance(model, WanClassModel) else sample


def measure_sparsity(model, device, size, threshold: float, steps: int = 20) -> dict:
    """Live fraction per layer and head after `steps` Euler steps with LiteAttention at `threshold`
    (one video per class), and the PSNR of the LiteAttention videos against the dense ones."""
    import liteattn_ops

    f, h, w = size
    n = len(CLASS_NAMES)
    noise = torch.randn(n, 3, f, h, w, generator=torch.Generator().manual_seed(4321)).to(device)
    y = torch.arange(n, device=device)
    model = copy.deepcopy(model).eval()
    cuda = str(device).startswith("cuda")
    autocast = cuda
    if cuda and type(model).__name__ == "WanClassModel":
        # bf16 weights, no autocast: diffusers' RMSNorm keeps float32 q/k next to a bf16 v under autocast,
        # a call LiteAttention leaves to SDPA (the demo's wan-small preset does the same)
        model, noise, autocast = model.to(torch.bfloat16), noise.to(torch.bfloat16), False
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        run = sampler_of(model)
        dense = run(model, noise, y, steps=steps)
        liteattn_ops.enable(model, threshold=threshold)
        lite = run(model, noise, y, steps=steps)
    stats = {name: s for name, s in liteattn_ops.stats(model).items() if s["live_fraction"] is not None}
    liteattn_ops.disable(model)
    mse = float(((dense.clamp(-1, 1) - lite.clamp(-1, 1)) / 2).pow(2).mean())
    return {
        "size": list(size), "threshold": threshold, "steps": steps, "videos": n,
        "live_fraction": sum(s["live_fraction"] for s in stats.values()) / max(1, len(stats)),
        "per_layer": {k: s["live_fraction"] for k, s in stats.items()},
        "per_head": {k: s["live_fraction_per_head"] for k, s in stats.items()},
        "psnr_db_vs_dense": (10 * math.log10(1 / mse)) if mse > 0 else "inf",
    }


def lr_at(progress: float, step: int, args) -> float:
    warm = min(1.0, (step + 1) / max(1, args.warmup))
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return args.lr * warm * (0.1 + 0.9 * cos)


def save_checkpoint(ema: VideoDiT, meta: dict, out: Path, name: str):
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in ema.state_dict().items()}
    tmp = out / f".{name}.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt", "config": json.dumps(meta["model_config"])})
    os.chmod(tmp, 0o644)
    os.replace(tmp, out / f"{name}.safetensors")
    tmpj = out / f".{name}.json.tmp"
    tmpj.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmpj, out / f"{name}.json")


def plot_loss(history: list[tuple[int, float]], path: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [s for s, _ in history]
    losses = [l for _, l in history]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, losses, lw=0.5, alpha=0.35, label="per step")
    k = max(1, len(losses) // 50)
    if len(losses) > k:
        sm = [sum(losses[max(0, i - k + 1): i + 1]) / len(losses[max(0, i - k + 1): i + 1]) for i in range(len(losses))]
        ax.plot(steps, sm, lw=1.5, label=f"moving mean ({k})")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("rectified-flow MSE")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@torch.no_grad()
def save_samples(model, path: Path, device, steps: int, sizes):
    """A PNG: for each size, one row per class with frames side by side."""
    import numpy as np
    from PIL import Image

    rows = []
    width = 0
    for f, h, w in sizes:
        n = len(CLASS_NAMES)
        g = torch.Generator().manual_seed(1234)
        noise = torch.randn(n, 3, f, h, w, generator=g).to(device)
        y = torch.arange(n, device=device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=str(device).startswith("cuda")):
            x = sampler_of(model)(model, noise, y, steps=steps)
        vid = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 4, 1).cpu().numpy()
        for b in range(n):
            frames = list(vid[b][:: max(1, f // 8)][:8])
            row = np.concatenate(frames, axis=1)
            rows.append(row)
            width = max(width, row.shape[1])
    rows = [np.pad(r, ((0, 2), (0, width - r.shape[1]), (0, 0))) for r in rows]
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda asked for, but no CUDA device is available")
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    heads = args.num_heads or max(1, args.dim // 64)
    if args.arch == "wan":
        from liteattn_ops.demo.models.wan_small import WanClassModel, WanSmallConfig

        cfg = WanSmallConfig(dim=args.dim, depth=args.depth, num_heads=heads, mlp_ratio=args.mlp_ratio,
                             num_classes=len(CLASS_NAMES))
        model = WanClassModel(cfg).to(device)
    else:
        cfg = DiTConfig(dim=args.dim, depth=args.depth, num_heads=heads, mlp_ratio=args.mlp_ratio,
                        num_classes=len(CLASS_NAMES))
        model = VideoDiT(cfg).to(device)
    locality = None
    if args.locality_weight > 0:
        from liteattn_ops.demo.models.dit import Locality

        locality = Locality(radius=args.locality_radius, queries=args.locality_queries)
        if args.arch == "dit":
            model.set_locality(locality)   # computed inside SelfAttention (training mode only)
    ema = copy.deepcopy(model).eval()
    if args.arch == "dit":
        ema.set_locality(None)
    for p_ in ema.parameters():
        p_.requires_grad_(False)
    nparams = model.num_params()
    resolutions = parse_resolutions(args.resolutions)
    for (f, h, w), _ in resolutions:
        model.token_grid(f, h, w)  # validates divisibility
    weights = torch.tensor([wt for _, wt in resolutions])
    decay, no_decay = [], []
    for n_, p_ in model.named_parameters():
        (decay if p_.dim() >= 2 and "embed" not in n_ and "modulation" not in n_ else no_decay).append(p_)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.99), fused=device.type == "cuda",
    )
    out = Path(args.out)
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, REPO)] + (sys.argv[1:] if argv is None else list(argv)))
    print(f"model: {nparams / 1e6:.2f} M parameters, config {cfg.to_dict()}", flush=True)
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; "
          f"resolutions: {resolutions}", flush=True)
    print(f"command: {command}", flush=True)
    print(f"time budget: {args.time_budget:.0f} s of training (or {args.steps} steps, whichever comes first), "
          f"then samples and the sparsity measurement; recipe {args.recipe}, locality weight {args.locality_weight}"
          f"{f', radius {args.locality_radius}' if locality else ''}", flush=True)

    from tqdm import tqdm

    gen = torch.Generator().manual_seed(args.seed + 1)
    history: list[tuple[int, float]] = []
    far_tail = None
    t_start = time.perf_counter()
    last_save = t_start
    step = 0
    ema_loss = None
    res_counts = [0] * len(resolutions)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    pbar = tqdm(total=args.steps, desc="train", dynamic_ncols=True, mininterval=2.0, file=sys.stderr)

    far_history: list[float] = []

    def meta(final: bool):
        nonlocal far_tail
        elapsed = time.perf_counter() - t_start
        tail = [l for _, l in history[-200:]]
        far_tail = (sum(far_history[-20:]) / len(far_history[-20:])) if far_history else None
        return {
            "model_config": cfg.to_dict(),
            "num_params": nparams,
            "class_names": list(CLASS_NAMES),
            "objective": "rectified flow: x_t = (1 - t) x0 + t noise, predict v = noise - x0; pixels in [-1, 1]",
            "arch": args.arch,
            "sampler": {"kind": "FlowMatchEulerDiscreteScheduler" if args.arch == "wan" else "euler",
                        "shift": 3.0, "guidance": 1.0},
            "training": {
                "command": command,
                "steps": step,
                "final_loss": (sum(tail) / len(tail)) if tail else None,
                "final_loss_note": "mean MSE over the last 200 steps",
                "wall_time_s": round(elapsed, 1),
                "complete": final,
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "torch": torch.__version__,
                "resolutions": [[list(r), w] for r, w in resolutions],
                "steps_per_resolution": res_counts,
                "tokens_per_step": args.tokens_per_step,
                "lr": args.lr, "warmup": args.warmup, "ema": args.ema, "seed": args.seed,
                "class_dropout": args.class_dropout,
                "recipe": args.recipe,
                "time_budget_s": args.time_budget,
                "locality": None if locality is None else {"weight": args.locality_weight,
                                                           "radius": list(args.locality_radius),
                                                           "queries": args.locality_queries,
                                                           "final_far_mass": far_tail},
                "weights": "EMA, stored as float16",
            },
        }

    model.train()
    while step < args.steps:
        elapsed = time.perf_counter() - t_start
        if elapsed >= args.time_budget:
            break
        progress = max(step / args.steps, elapsed / args.time_budget)
        lr = lr_at(progress, step, args)
        for g_ in opt.param_groups:
            g_["lr"] = lr
        ri = int(torch.multinomial(weights, 1, generator=gen))
        f, h, w = resolutions[ri][0]
        res_counts[ri] += 1
        gt, gh, gw = model.token_grid(f, h, w)
        bs = max(1, args.tokens_per_step // (gt * gh * gw))
        x0, y = generate_videos(bs, f, h, w, seed=args.seed * 1_000_003 + step, device=device)
        # logit-normal t (SD3) mixed with uniform; t = 1 is noise
        u = torch.randn(bs, generator=gen).sigmoid()
        t = torch.where(torch.rand(bs, generator=gen) < 0.1, torch.rand(bs, generator=gen), u).to(device)
        drop = (torch.rand(bs, generator=gen) < args.class_dropout).to(device)
        y = torch.where(drop, torch.full_like(y, cfg.num_classes), y)
        noise = torch.randn_like(x0)
        tb = t.view(-1, 1, 1, 1, 1)
        xt = (1 - tb) * x0 + tb * noise
        probe = None
        if locality is not None and args.arch == "wan":
            from liteattn_ops.demo.models.wan_small import SDPALocalityProbe

            probe = SDPALocalityProbe(locality, (gt, gh, gw))   # the far mass of every self-attention call
        with autocast, (probe if probe is not None else contextlib.nullcontext()):
            v = model(xt, t, y)
        loss = F.mse_loss(v.float(), noise - x0)
        flow_loss = loss
        if probe is not None:
            far = torch.stack(probe.losses).mean() if probe.losses else None
        else:
            far = model.locality_loss() if locality is not None else None
        if far is not None:
            loss = loss + args.locality_weight * far
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            d = min(args.ema, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - d)
        step += 1
        if step % 10 == 0 or step < 10:
            lv = float(flow_loss.detach())  # one sync every 10 steps
            history.append((step, lv))
            if far is not None:
                far_history.append(float(far.detach()))
            ema_loss = lv if ema_loss is None else 0.95 * ema_loss + 0.05 * lv
        pbar.update(1)
        if step % args.log_every == 0:
            pbar.set_postfix(loss=f"{ema_loss:.4f}", lr=f"{lr:.1e}", res=f"{f}x{h}x{w}")
            print(f"step {step} t={time.perf_counter() - t_start:.0f}s loss {ema_loss:.4f} lr {lr:.2e}"
                  + (f" far mass {far_history[-1]:.4f}" if far_history else ""), flush=True)
        if time.perf_counter() - last_save > args.save_every:
            save_checkpoint(ema, meta(False), out, args.name)
            last_save = time.perf_counter()
    pbar.close()
    if device.type == "cuda":
        torch.cuda.synchronize()
    m = meta(True)
    save_checkpoint(ema, m, out, args.name)
    tr = m["training"]
    print(f"done: {step} steps in {tr['wall_time_s']} s, final loss {tr['final_loss']:.4f}; "
          f"steps per resolution {res_counts}", flush=True)
    if history:
        plot_loss(history, out / f"{args.name}_loss.png",
                  f"demo DiT ({nparams / 1e6:.1f} M params): {step} steps, {tr['wall_time_s']:.0f} s on {tr['device']}")
    if not args.no_samples:
        t0 = time.perf_counter()
        sizes = sorted({r for r, _ in resolutions}, key=lambda r: r[0] * r[1] * r[2])
        sizes = [sizes[0]] + ([sizes[-1]] if len(sizes) > 1 else [])
        save_samples(ema, out / f"{args.name}_samples.png", device, args.sample_steps, sizes)
        print(f"samples written in {time.perf_counter() - t0:.1f} s", flush=True)
    if not args.no_sparsity:
        t0 = time.perf_counter()
        sizes = sorted({r for r, _ in resolutions}, key=lambda r: r[0] * r[1] * r[2])
        size = sizes[-1] if device.type == "cuda" else sizes[0]
        m["sparsity"] = measure_sparsity(ema, device, size, args.sparsity_threshold,
                                         steps=20 if device.type == "cuda" else 3)
        save_checkpoint(ema, m, out, args.name)
        sp = m["sparsity"]
        print(f"sparsity at {size} (threshold {sp['threshold']}, {sp['steps']} steps): live {sp['live_fraction']:.3f}, "
              f"PSNR vs dense {sp['psnr_db_vs_dense'] if isinstance(sp['psnr_db_vs_dense'], str) else round(sp['psnr_db_vs_dense'], 2)} dB "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)
        for name, heads in sp["per_head"].items():
            print(f"  {name}: " + " ".join(f"{x:.2f}" for x in heads), flush=True)
    print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()
