"""Procedural videos for training and evaluating the demo DiT.

Everything is vectorised torch, so a batch renders on the GPU in a few
milliseconds. A video is fully determined by ``seed`` (the random parameters are
drawn on the CPU with a seeded generator, then rendered on ``device``), so the
same seed gives the same video on any device and at any resolution: the scene is
defined in continuous image coordinates in [0, 1]^2 and continuous time (one time
unit = 8 frames), and rendering samples it at pixel centres.

Scene: a textured background (two colour gratings) that the camera pans across,
and one to three shapes with soft anti-aliased edges. The class picks the shape
and how it moves:

====  ==========  ==================================================
id    name        content
====  ==========  ==================================================
0     balls       discs bouncing off the frame edges
1     boxes       squares that rotate while they bounce
2     rings       rings that pulse (grow and shrink) while drifting
3     diamonds    diamonds that orbit a point and scale
====  ==========  ==================================================
"""

from __future__ import annotations

import math

import torch

__all__ = ["CLASS_NAMES", "generate_videos"]

CLASS_NAMES = ("balls", "boxes", "rings", "diamonds")
FRAMES_PER_TIME_UNIT = 8.0
MAX_SHAPES = 3


def _tri(q: torch.Tensor) -> torch.Tensor:
    """Triangle wave in [0, 1] with period 2 (position of a point bouncing in [0, 1])."""
    q = torch.remainder(q, 2.0)
    return torch.where(q > 1.0, 2.0 - q, q)


def _params(batch: int, labels: torch.Tensor | None, num_classes: int, g: torch.Generator) -> dict:
    def u(*shape, lo=0.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(*shape, generator=g)

    K = MAX_SHAPES
    if labels is None:
        labels = torch.randint(0, num_classes, (batch,), generator=g)
    p = {
        "labels": labels.long().cpu(),
        # background: two colours and two gratings, panned by the camera
        "bg_c0": u(batch, 3, lo=-0.9, hi=0.1),
        "bg_c1": u(batch, 3, lo=-0.4, hi=0.6),
        "bg_f1": u(batch, 2, lo=-5.0, hi=5.0),
        "bg_f2": u(batch, 2, lo=-9.0, hi=9.0),
        "bg_ph": u(batch, 2, hi=2 * math.pi),
        "cam_v": u(batch, 2, lo=-0.35, hi=0.35),
        # shapes
        "n_shapes": torch.randint(1, K + 1, (batch,), generator=g),
        "center": u(batch, K, 2, lo=0.2, hi=0.8),
        "vel": u(batch, K, 2, lo=-0.5, hi=0.5),
        "radius": u(batch, K, lo=0.08, hi=0.17),
        "color": u(batch, K, 3, lo=-0.2, hi=1.0),
        "angle": u(batch, K, hi=2 * math.pi),
        "omega": u(batch, K, lo=-3.0, hi=3.0),
        "pulse_f": u(batch, K, lo=0.4, hi=1.2),
        "orbit_r": u(batch, K, lo=0.08, hi=0.22),
    }
    # make shapes bright enough to stand out from the darker background
    p["color"][..., torch.randint(0, 3, (1,), generator=g)] = 0.9
    return p


def generate_videos(
    batch: int,
    frames: int,
    height: int,
    width: int,
    *,
    seed: int = 0,
    labels: torch.Tensor | None = None,
    num_classes: int = len(CLASS_NAMES),
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render ``batch`` videos of shape (3, frames, height, width) with values in [-1, 1].

    Returns ``(videos, labels)``: videos (B, 3, T, H, W) and labels (B,) int64 on
    ``device``. ``labels`` fixes the classes (else they are drawn from the seed).
    """
    if min(batch, frames, height, width) <= 0:
        raise ValueError("batch, frames, height and width must be positive")
    if labels is not None:
        labels = torch.as_tensor(labels).reshape(-1)
        if labels.numel() != batch:
            raise ValueError(f"labels has {labels.numel()} entries, expected {batch}")
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"labels must be in [0, {num_classes})")
    g = torch.Generator().manual_seed(int(seed))
    P = {k: v.to(device) for k, v in _params(batch, labels, num_classes, g).items()}
    B, K = batch, MAX_SHAPES

    tau = torch.arange(frames, device=device, dtype=torch.float32) / FRAMES_PER_TIME_UNIT  # (T,)
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    # (1, T, H, W) coordinate grids; a pixel is square in x units, aspect-correct.
    aspect = width / height
    X = xs.view(1, 1, 1, width) * aspect
    Y = ys.view(1, 1, height, 1)

    # ---- background: camera pan over two gratings
    cam = P["cam_v"][:, None, :] * tau[None, :, None]  # (B, T, 2)
    cx = (X + cam[..., 0, None, None])  # (B, T, 1, W)
    cy = (Y + cam[..., 1, None, None])  # (B, T, H, 1)
    f1, f2, ph = P["bg_f1"], P["bg_f2"], P["bg_ph"]
    g1 = torch.sin(2 * math.pi * (f1[:, 0, None, None, None] * cx + f1[:, 1, None, None, None] * cy) + ph[:, 0, None, None, None])
    g2 = torch.sin(2 * math.pi * (f2[:, 0, None, None, None] * cx + f2[:, 1, None, None, None] * cy) + ph[:, 1, None, None, None])
    tex = (0.5 + 0.35 * g1 + 0.15 * g2).clamp(0, 1)  # (B, T, H, W)
    c0 = P["bg_c0"][:, :, None, None, None]
    c1 = P["bg_c1"][:, :, None, None, None]
    video = c0 + (c1 - c0) * tex[:, None]  # (B, 3, T, H, W)

    # ---- shapes
    lab = P["labels"][:, None].expand(B, K)  # (B, K)
    t = tau.view(1, 1, frames)  # (1, 1, T)
    r0 = P["radius"][..., None]  # (B, K, 1)
    # bouncing centre (classes 0, 1, 2), inside [r, extent - r]
    lo = r0
    hi_x = aspect - r0
    hi_y = 1.0 - r0
    px = lo + (hi_x - lo) * _tri((P["center"][..., 0, None] * aspect - lo) / (hi_x - lo) + P["vel"][..., 0, None] * t / (hi_x - lo))
    py = lo + (hi_y - lo) * _tri((P["center"][..., 1, None] - lo) / (hi_y - lo) + P["vel"][..., 1, None] * t / (hi_y - lo))
    speed_scale = torch.where(lab == 2, 0.3, 1.0)[..., None]  # rings drift slowly
    px = torch.where(lab[..., None] == 2, P["center"][..., 0, None] * aspect + speed_scale * P["vel"][..., 0, None] * t, px)
    py = torch.where(lab[..., None] == 2, P["center"][..., 1, None] + speed_scale * P["vel"][..., 1, None] * t, py)
    # orbit (class 3)
    ang = P["angle"][..., None] + P["omega"][..., None] * t  # (B, K, T)
    ox = P["center"][..., 0, None] * aspect + P["orbit_r"][..., None] * torch.cos(ang)
    oy = P["center"][..., 1, None] + P["orbit_r"][..., None] * torch.sin(ang)
    is3 = lab[..., None] == 3
    px = torch.where(is3, ox, px)
    py = torch.where(is3, oy, py)
    # radius over time: pulse (class 2), slow scaling (class 3)
    pulse = 1.0 + 0.45 * torch.sin(2 * math.pi * P["pulse_f"][..., None] * t + P["angle"][..., None])
    scale3 = 1.0 + 0.3 * torch.sin(math.pi * P["pulse_f"][..., None] * t)
    r = r0 * torch.where(lab[..., None] == 2, pulse, torch.where(is3, scale3, torch.ones_like(pulse)))

    sharp = 0.75 * max(height, width / aspect)  # edge width about one pixel
    for k in range(K):
        dx = X[0, 0][None, None] - px[:, k, :, None, None]  # (B, T, 1, W)
        dy = Y[0, 0][None, None] - py[:, k, :, None, None]  # (B, T, H, 1)
        rk = r[:, k, :, None, None]  # (B, T, 1, 1)
        disc = torch.sqrt(dx * dx + dy * dy + 1e-12) - rk
        th = P["angle"][:, k, None, None, None] + P["omega"][:, k, None, None, None] * tau.view(1, frames, 1, 1)
        rx = dx * torch.cos(th) + dy * torch.sin(th)
        ry = -dx * torch.sin(th) + dy * torch.cos(th)
        box = torch.maximum(rx.abs(), ry.abs()) - 0.85 * rk
        ring = (disc + 0.35 * rk).abs() - 0.3 * rk
        diamond = dx.abs() + dy.abs() - 1.25 * rk
        labk = P["labels"].view(B, 1, 1, 1)
        sdf = torch.where(labk == 0, disc, torch.where(labk == 1, box, torch.where(labk == 2, ring, diamond)))
        alpha = torch.sigmoid(-sdf * 2 * sharp)  # (B, T, H, W)
        alpha = alpha * (k < P["n_shapes"]).float().view(B, 1, 1, 1)
        shade = 1.0 - 0.25 * ((dx + dy) / (rk + 1e-6)).clamp(-1, 1)  # simple lighting
        col = P["color"][:, k, :, None, None, None] * shade[:, None]
        video = video * (1 - alpha[:, None]) + col * alpha[:, None]
    return video.clamp(-1, 1).to(dtype), P["labels"].to(device)
