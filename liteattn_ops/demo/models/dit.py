"""A small Wan-style video diffusion transformer, trained in this project for the demo.

Plain PyTorch, no dependency on the rest of the package. The shape of it follows
Wan2.1's ``WanTransformer3DModel`` at a toy size:

* 3-D patchify of an RGB pixel video (B, 3, T, H, W) with patch (pt, ph, pw) into
  tokens ordered (t, h, w), row-major: the order the attention tiles see.
* 3-D rotary position embedding (RoPE) split over the head dimension into a
  temporal and two spatial bands, as in Wan. Positions are integer token indices,
  so the same weights run at any number of frames and any resolution.
* Each block: adaLN-modulated self-attention through
  ``torch.nn.functional.scaled_dot_product_attention(q, k, v)`` with q/k/v of
  shape (B, heads, S, head_dim); cross-attention to a few learned class tokens
  (also through SDPA, with S_k = number of class tokens); adaLN-modulated MLP.
  The modulation is Wan's: one time projection shared by all blocks plus a
  learned per-block table.
* Rectified flow: the network predicts the velocity ``noise - x0`` at time t in
  [0, 1] (t = 1 is pure noise).

Self-attention lives in :class:`SelfAttention` and cross-attention in
:class:`CrossAttention`, two separate modules, so that hooks which route only
self-attention (the package's ``enable()``) can tell them apart.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DiTConfig", "Locality", "VideoDiT", "flow_schedule", "rope_freqs_3d", "sample"]


class ConfigDict:
    """to_dict / from_dict of the demo models' config dataclasses (JSON beside each checkpoint):
    patch_size as a list in the file and a tuple in the config; unknown fields refused."""

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def to_dict(self) -> dict:
        d = asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d

    @classmethod
    def from_dict(cls, d: dict):
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
        d = dict(d)
        if "patch_size" in d:
            d["patch_size"] = tuple(int(p) for p in d["patch_size"])
        return cls(**d)


@dataclass
class DiTConfig(ConfigDict):
    """Hyper-parameters of :class:`VideoDiT` (stored next to the checkpoint as JSON)."""

    in_channels: int = 3
    patch_size: tuple[int, int, int] = (1, 4, 4)
    dim: int = 256
    num_heads: int = 4  # head_dim = dim // num_heads = 64
    depth: int = 5
    mlp_ratio: float = 2.5
    num_classes: int = 4
    class_tokens: int = 4
    freq_dim: int = 128
    rope_theta: float = 10000.0
    eps: float = 1e-6



# ----------------------------------------------------------------------------- RoPE


def _rope_split(head_dim: int) -> tuple[int, int, int]:
    """Wan's split of the head dimension over (t, h, w): h and w get 2*(d//6) each."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_freqs_3d(
    grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (S, head_dim // 2) for a (T, H, W) token grid."""
    f, h, w = grid
    parts = []
    for n, d in zip((f, h, w), _rope_split(head_dim)):
        inv = 1.0 / (theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float64) / d))
        pos = torch.arange(n, device=device, dtype=torch.float64)
        parts.append(torch.outer(pos, inv))  # (n, d/2)
    ft, fh, fw = parts
    ang = torch.cat(
        [
            ft[:, None, None, :].expand(f, h, w, -1),
            fh[None, :, None, :].expand(f, h, w, -1),
            fw[None, None, :, :].expand(f, h, w, -1),
        ],
        dim=-1,
    ).reshape(f * h * w, head_dim // 2)
    return ang.cos().float(), ang.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x (B, heads, S, D) by the angles in cos/sin (S, D/2)."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


# ----------------------------------------------------------------------------- blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight.to(x.dtype)


class SelfAttention(nn.Module):
    """Multi-head self-attention with QK RMSNorm and 3-D RoPE, computed by SDPA."""

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)
        self.out = nn.Linear(dim, dim)

    # Training only (tools/train_demo_dit.py --locality-weight): the attention mass that sampled
    # queries give to keys outside a (t, h, w) box around them, stored in `locality_loss`.
    locality: "Locality | None" = None
    locality_loss: "torch.Tensor | None" = None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], grid=None) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k = self.norm_q(q), self.norm_k(k)
        q, k, v = (t.view(b, s, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.locality is not None and self.training and grid is not None:
            self.locality_loss = self.locality.far_mass(q, k, grid)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.out(o.transpose(1, 2).reshape(b, s, -1))


@dataclass
class Locality:
    """What "local" means for the locality term of training: keys farther than `radius` (frames,
    token rows, token columns; Chebyshev per axis) from a query are far; `queries` random queries
    per (batch, head) are scored against every key (float32), and `far_mass` is the mean softmax
    mass they give to far keys. Small far mass means the far tiles' scores sit many log2 units
    below the row maximum: exactly what lets LiteAttention drop them."""

    radius: tuple[int, int, int] = (2, 6, 6)
    queries: int = 64

    def far_mass(self, q: torch.Tensor, k: torch.Tensor, grid) -> torch.Tensor:
        b, h, s, d = q.shape
        n = min(self.queries, s)
        idx = torch.randint(0, s, (n,), device=q.device)
        scores = (q[:, :, idx].float() @ k.float().transpose(-1, -2)) / math.sqrt(d)   # (B, H, n, S)
        probs = scores.softmax(-1)
        pos = torch.stack(torch.meshgrid(*(torch.arange(g, device=q.device) for g in grid), indexing="ij"),
                          -1).reshape(s, 3)
        radius = torch.tensor(self.radius, device=q.device)
        far = ((pos[idx, None, :] - pos[None, :, :]).abs() > radius).any(-1)       # (n, S)
        return (probs * far).sum(-1).mean()


class CrossAttention(nn.Module):
    """Attention from the video tokens to a few conditioning (class) tokens, by SDPA."""

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.norm_q(self.q(x)).view(b, s, self.num_heads, -1).transpose(1, 2)
        k, v = self.kv(ctx).chunk(2, dim=-1)
        k = self.norm_k(k).view(b, ctx.shape[1], self.num_heads, -1).transpose(1, 2)
        v = v.view(b, ctx.shape[1], self.num_heads, -1).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.out(o.transpose(1, 2).reshape(b, s, -1))


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        dim = cfg.dim
        self.norm1 = nn.LayerNorm(dim, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, cfg.num_heads, cfg.eps)
        self.norm_cross = nn.LayerNorm(dim, eps=cfg.eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(dim, cfg.num_heads, cfg.eps)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.eps, elementwise_affine=False)
        hidden = int(dim * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        # Wan: per-block learned offsets added to the shared time modulation.
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x, t_mod, ctx, rope, grid=None):
        # t_mod: (B, 6, dim) -> shift/scale/gate for attention and MLP
        sh1, sc1, g1, sh2, sc2, g2 = (self.modulation + t_mod).float().unbind(1)
        h = (self.norm1(x).float() * (1 + sc1[:, None]) + sh1[:, None]).type_as(x)
        x = x + (self.self_attn(h, rope, grid).float() * g1[:, None]).type_as(x)
        x = x + self.cross_attn(self.norm_cross(x), ctx)
        h = (self.norm2(x).float() * (1 + sc2[:, None]) + sh2[:, None]).type_as(x)
        x = x + (self.mlp(h).float() * g2[:, None]).type_as(x)
        return x


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of t in [0, 1] (scaled to [0, 1000] as in Wan)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


# ----------------------------------------------------------------------------- model


class VideoDiT(nn.Module):
    """Class-conditional video DiT predicting the rectified-flow velocity.

    ``forward(x, t, y)``: x (B, C, T, H, W) noisy video, t (B,) in [0, 1],
    y (B,) int64 class ids in [0, num_classes]; ``num_classes`` is the "null"
    class used for classifier-free guidance. Returns a tensor shaped like x.
    """

    def __init__(self, cfg: DiTConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or DiTConfig()
        if cfg.dim % cfg.num_heads:
            raise ValueError("dim must be divisible by num_heads")
        pt, ph, pw = cfg.patch_size
        patch_dim = cfg.in_channels * pt * ph * pw
        self.patch_embed = nn.Linear(patch_dim, cfg.dim)
        self.time_embed = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.time_proj = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim))
        self.class_embed = nn.Parameter(torch.randn(cfg.num_classes + 1, cfg.class_tokens, cfg.dim) * 0.02)
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.head_modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)
        self.head = nn.Linear(cfg.dim, patch_dim)
        self._rope_cache: dict = {}
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.time_proj[-1].weight)
        nn.init.zeros_(self.head.weight)

    # -- token layout ---------------------------------------------------------
    def token_grid(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """The (T, H, W) token grid of a video; raises ValueError if not divisible."""
        pt, ph, pw = self.cfg.patch_size
        if frames % pt or height % ph or width % pw:
            raise ValueError(
                f"video of {frames} frames x {height}x{width} px is not divisible by the patch size "
                f"{self.cfg.patch_size} (frames, height, width)"
            )
        return frames // pt, height // ph, width // pw

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        pt, ph, pw = self.cfg.patch_size
        gt, gh, gw = self.token_grid(t, h, w)
        x = x.reshape(b, c, gt, pt, gh, ph, gw, pw)
        x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # b, gt, gh, gw, c, pt, ph, pw
        return x.reshape(b, gt * gh * gw, c * pt * ph * pw)

    def unpatchify(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        b = tokens.shape[0]
        gt, gh, gw = grid
        pt, ph, pw = self.cfg.patch_size
        c = self.cfg.in_channels
        x = tokens.reshape(b, gt, gh, gw, c, pt, ph, pw).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return x.reshape(b, c, gt * pt, gh * ph, gw * pw)

    def rope(self, grid, device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (tuple(grid), str(device))
        if key not in self._rope_cache:
            self._rope_cache[key] = rope_freqs_3d(grid, self.cfg.head_dim, self.cfg.rope_theta, device)
        return self._rope_cache[key]

    # -- forward --------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"expected x of shape (B, {self.cfg.in_channels}, T, H, W), got {tuple(x.shape)}")
        grid = self.token_grid(*x.shape[2:])
        rope = self.rope(grid, x.device)
        h = self.patch_embed(self.patchify(x))
        temb = self.time_embed(timestep_embedding(t, self.cfg.freq_dim).to(h.dtype))
        t_mod = self.time_proj(temb).unflatten(1, (6, self.cfg.dim))
        ctx = self.class_embed[y].to(h.dtype)
        for blk in self.blocks:
            h = blk(h, t_mod, ctx, rope, grid if self.training else None)
        sh, sc = (self.head_modulation + temb[:, None]).float().unbind(1)
        h = (self.norm_out(h).float() * (1 + sc[:, None]) + sh[:, None]).type_as(h)
        return self.unpatchify(self.head(h), grid)

    def set_locality(self, locality: "Locality | None") -> None:
        """Turn the training-time locality term on (a Locality) or off (None)."""
        for blk in self.blocks:
            blk.self_attn.locality = locality
            blk.self_attn.locality_loss = None

    def locality_loss(self) -> torch.Tensor | None:
        """Mean far mass over the blocks, from the last training forward (None when off)."""
        losses = [blk.self_attn.locality_loss for blk in self.blocks if blk.self_attn.locality_loss is not None]
        return torch.stack(losses).mean() if losses else None

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def flow_schedule(steps: int, shift: float) -> list[float]:
    """steps + 1 times from 1 (noise) to 0, warped towards high noise by ``shift`` (Wan's flow
    schedule: t' = shift t / (1 + (shift - 1) t)); host floats."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be a positive finite number, got {shift}")
    ts = [1.0 - i / steps for i in range(steps + 1)]
    return [shift * t / (1 + (shift - 1) * t) for t in ts]


@torch.no_grad()
def sample(
    model: VideoDiT,
    noise: torch.Tensor,
    y: torch.Tensor,
    steps: int = 20,
    shift: float = 3.0,
    guidance: float = 1.0,
    callback=None,
    before_call=None,
) -> torch.Tensor:
    """Euler sampling of the rectified-flow ODE from t = 1 (noise) to t = 0.

    ``shift`` warps the schedule towards high noise as Wan's flow scheduler does.
    ``callback(step, t)`` is called after every step (for timing / statistics);
    ``before_call()`` before every model call (e.g. ``torch.compiler.cudagraph_mark_step_begin``).
    With ``guidance != 1`` classifier-free guidance runs the conditional and the
    null-class prediction in one batch.
    """
    # The schedule is host floats: reading it from a device tensor would synchronise every step.
    ts = flow_schedule(steps, shift)
    x = noise.float()
    null = torch.full_like(y, model.cfg.num_classes)
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        tt = torch.full((x.shape[0],), t, device=x.device)
        if before_call is not None:
            before_call()
        if guidance != 1.0:
            v_both = model(torch.cat([x, x]).to(noise.dtype), torch.cat([tt, tt]), torch.cat([y, null])).float()
            v_c, v_u = v_both.chunk(2)
            v = v_u + guidance * (v_c - v_u)
        else:
            v = model(x.to(noise.dtype), tt, y).float()
        x = x + (t_next - t) * v
        if callback is not None:
            callback(i, t)
    return x
