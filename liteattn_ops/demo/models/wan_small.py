"""A small diffusers `WanTransformer3DModel` for the demo, class-conditioned, sampled with diffusers'
`FlowMatchEulerDiscreteScheduler`: the code path a diffusers user runs, at a size trained here.

`WanClassModel(cfg)` holds the transformer (pixel video in, patch (1, 4, 4), 3-D RoPE of Wan) and a
table of learned "text" tokens per class (the cross-attention context), so the training loop of
tools/train_demo_dit.py and `liteattn_ops.demo.models.sample` drive it like the demo DiT:
`model(x, t, y)` with t in [0, 1] (t = 1 is noise) returning the rectified-flow velocity.
Train it with `python tools/train_demo_dit.py --arch wan ...`; load it with `load_wan_small`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from .dit import ConfigDict

ARCH = "wan"


@dataclass
class WanSmallConfig(ConfigDict):
    in_channels: int = 3
    patch_size: tuple[int, int, int] = (1, 4, 4)
    dim: int = 256
    num_heads: int = 4
    depth: int = 5
    mlp_ratio: float = 2.5
    num_classes: int = 4
    class_tokens: int = 4
    freq_dim: int = 128

    def diffusers_config(self) -> dict:
        """The WanTransformer3DModel arguments of this config."""
        return dict(patch_size=self.patch_size, num_attention_heads=self.num_heads, attention_head_dim=self.head_dim,
                    in_channels=self.in_channels, out_channels=self.in_channels, text_dim=self.dim,
                    freq_dim=self.freq_dim, ffn_dim=int(self.dim * self.mlp_ratio), num_layers=self.depth,
                    cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)


class WanClassModel(nn.Module):
    """A diffusers WanTransformer3DModel plus learned class tokens as its cross-attention context."""

    def __init__(self, cfg: Optional[WanSmallConfig] = None):
        super().__init__()
        from diffusers import WanTransformer3DModel

        self.cfg = cfg = cfg or WanSmallConfig()
        if cfg.dim % cfg.num_heads:
            raise ValueError("dim must be divisible by num_heads")
        self.transformer = WanTransformer3DModel(**cfg.diffusers_config())
        self.class_embed = nn.Parameter(torch.randn(cfg.num_classes + 1, cfg.class_tokens, cfg.dim) * 0.02)

    def token_grid(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        pt, ph, pw = self.cfg.patch_size
        if frames % pt or height % ph or width % pw:
            raise ValueError(f"video of {frames} frames x {height}x{width} px is not divisible by the patch size "
                             f"{self.cfg.patch_size} (frames, height, width)")
        return frames // pt, height // ph, width // pw

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.token_grid(*x.shape[2:])
        ctx = self.class_embed[y].to(x.dtype)
        return self.transformer(hidden_states=x, timestep=t * 1000.0, encoder_hidden_states=ctx, return_dict=False)[0]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def load_wan_small(checkpoint, device="cpu") -> tuple[WanClassModel, dict]:
    """(model in eval mode, metadata) of a checkpoint written by train_demo_dit.py --arch wan;
    raises ValueError with a clear message when a file is missing or does not match."""
    from safetensors.torch import load_file

    ckpt = Path(checkpoint)
    cfg_path = ckpt.with_suffix(".json")
    if not ckpt.is_file():
        raise ValueError(f"checkpoint not found: {ckpt} (train one: python tools/train_demo_dit.py --arch wan "
                         "--recipe sparse --device cuda --name demo_wan)")
    if not cfg_path.is_file():
        raise ValueError(f"checkpoint config not found: {cfg_path}")
    meta = json.loads(cfg_path.read_text())
    if meta.get("arch") != ARCH:
        raise ValueError(f"{ckpt} is not a wan-small checkpoint (arch {meta.get('arch', 'dit')!r})")
    model = WanClassModel(WanSmallConfig.from_dict(meta["model_config"]))
    state = load_file(str(ckpt))
    expected = model.state_dict()
    if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in expected):
        raise ValueError(f"checkpoint {ckpt} does not match its config {cfg_path}")
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.to(device).eval(), meta


@torch.no_grad()
def sample_flow_match(model: WanClassModel, noise: torch.Tensor, y: torch.Tensor, steps: int = 20,
                      shift: float = 3.0, guidance: float = 1.0, callback: Optional[Callable] = None,
                      before_call: Optional[Callable] = None) -> torch.Tensor:
    """Sampling with diffusers' FlowMatchEulerDiscreteScheduler (shift as Wan's), classifier-free
    guidance in one batch when guidance != 1. The scheduler lives on the CPU, so no step reads a
    device value; the latent is kept in float32."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(steps, device="cpu")
    x = noise.float()
    null = torch.full_like(y, model.cfg.num_classes)
    for i, timestep in enumerate(scheduler.timesteps):
        t = float(timestep) / 1000.0
        tt = torch.full((x.shape[0],), t, device=x.device)
        if before_call is not None:
            before_call()
        if guidance != 1.0:
            v_c, v_u = model(torch.cat([x, x]).to(noise.dtype), torch.cat([tt, tt]), torch.cat([y, null])).float().chunk(2)
            v = v_u + guidance * (v_c - v_u)
        else:
            v = model(x.to(noise.dtype), tt, y).float()
        x = scheduler.step(v, timestep, x, return_dict=False)[0]
        if callback is not None:
            callback(i, t)
    return x


class SDPALocalityProbe(torch.overrides.TorchFunctionMode):
    """Training only: inside this mode, every self-attention SDPA call whose sequence is the token
    grid `grid` adds its far mass (`Locality.far_mass`) to `losses`. Works for any model that calls
    torch.nn.functional.scaled_dot_product_attention with (B, H, S, D) tensors (diffusers' native
    attention backend does)."""

    def __init__(self, locality, grid):
        super().__init__()
        self.locality, self.grid, self.losses = locality, grid, []
        self.tokens = grid[0] * grid[1] * grid[2]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            q = args[0] if len(args) > 0 else kwargs.get("query")
            k = args[1] if len(args) > 1 else kwargs.get("key")   # (diffusers passes them by name)
            if isinstance(q, torch.Tensor) and q.dim() == 4 and q.shape[-2] == k.shape[-2] == self.tokens:
                # (the mode is not active while this runs, so far_mass's own ops are not intercepted)
                self.losses.append(self.locality.far_mass(q, k, self.grid))
        return func(*args, **kwargs)
