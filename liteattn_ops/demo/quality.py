"""Quality of the LiteAttention video against the dense one: PSNR and SSIM over frames."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


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
        "psnr_db": json_number(psnr_db(ref, test)),
        "psnr_db_per_frame": [json_number(v) for v in per_psnr],
        "ssim": sum(per_ssim) / len(per_ssim),
        "ssim_per_frame": per_ssim,
        "max_abs_diff": float((ref - test).abs().max()),
        "note": "LiteAttention video vs the dense video, pixels in [0, 1]; PSNR 'inf' = identical",
    }


def json_number(v: float):
    """JSON-safe number: inf/nan as strings."""
    return v if math.isfinite(v) else str(v)
