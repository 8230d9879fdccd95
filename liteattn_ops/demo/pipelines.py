"""The demo's pipelines: a model plus a function that runs N denoising steps from fixed noise.

* `DemoDiTPipeline`: the small video DiT trained in this project (`liteattn_ops.demo.models`).
* `WanSmallPipeline`: a small diffusers `WanTransformer3DModel` trained here
  (`tools/train_demo_dit.py --arch wan`), sampled with diffusers' `FlowMatchEulerDiscreteScheduler`.
* `WanPipeline`: diffusers' `WanTransformer3DModel` at the Wan2.1-1.3B configuration with random
  weights (speed only).

Both expose the same interface to the runner: `model`, `tokens` (self-attention sequence length),
`head_dim`, `attention_dtype` (the dtype the attention runs in), `run(model, steps, callback,
before_call=None)`, `to_frames(video)` (None when there is no picture to compare) and
`describe()`. The step schedule is host floats, so a step never reads a device value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

from .errors import DemoError

WAN_SMALL_CHECKPOINT = Path(__file__).resolve().parent / "models" / "demo_wan.safetensors"
SPEED_ONLY_LABEL = "SPEED ONLY: random-initialised weights, skipping and quality are not meaningful"

WAN_1_3B_CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024,
)


class DemoDiTPipeline:
    preset = "demo-dit"
    speed_only = False

    def __init__(self, args):
        from .models import CLASS_NAMES, load_demo_model

        try:
            self.model, self.meta = load_demo_model(args.checkpoint, device=args.device)
        except ValueError as e:  # CheckpointError is a ValueError
            raise DemoError(str(e)) from None
        cuda = args.device.type == "cuda"
        self._setup(args, CLASS_NAMES, autocast=cuda, attention_dtype=torch.bfloat16 if cuda else torch.float32,
                    noise_dtype=torch.float32)
        self.model.rope(self.grid, self.noise.device)  # fill the RoPE cache outside any compiled graph

    def _setup(self, args, class_names, *, autocast: bool, attention_dtype: torch.dtype,
               noise_dtype: torch.dtype) -> None:
        """What every pipeline of a class-conditioned demo model holds: token grid, noise, labels."""
        try:
            self.grid = self.model.token_grid(args.frames, args.height, args.width)
        except ValueError as e:
            raise DemoError(f"--resolution/--frames: {e}") from None
        self.args = args
        self.device = args.device
        self.class_names = class_names
        g = torch.Generator().manual_seed(args.seed)
        self.noise = torch.randn(args.batch, 3, args.frames, args.height, args.width,
                                 generator=g).to(self.device, noise_dtype)
        self.labels = torch.full((args.batch,), args.label, dtype=torch.long, device=self.device)
        self.tokens = self.grid[0] * self.grid[1] * self.grid[2]
        self.autocast = autocast
        self.head_dim = self.model.cfg.head_dim
        self.attention_dtype = attention_dtype

    def describe(self) -> dict:
        cfg = self.model.cfg
        return {
            "name": "demo video DiT (trained in this project, liteattn_ops/demo/models)",
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

    def run(self, model, steps: int, callback: Callable[[int, float], None],
            before_call: Optional[Callable[[], None]] = None) -> torch.Tensor:
        from .models import sample

        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
            return sample(model, self.noise, self.labels, steps=steps, shift=self.args.shift,
                          guidance=self.args.guidance, callback=callback, before_call=before_call)

    def to_frames(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> float (T, H, W, 3) in [0, 1] of the first video."""
        return ((video[0].float().clamp(-1, 1) + 1) / 2).permute(1, 2, 3, 0).cpu()


class WanSmallPipeline(DemoDiTPipeline):
    """The small diffusers WanTransformer3DModel trained here (tools/train_demo_dit.py --arch wan),
    sampled with diffusers' FlowMatchEulerDiscreteScheduler: a diffusers user's code path."""

    preset = "wan-small"
    speed_only = False

    def __init__(self, args):
        from .models import CLASS_NAMES
        from .models.wan_small import load_wan_small

        path = args.checkpoint or str(WAN_SMALL_CHECKPOINT)
        try:
            self.model, self.meta = load_wan_small(path, device=args.device)
        except ValueError as e:
            raise DemoError(f"--preset wan-small: {e}") from None
        # On CUDA the weights are bf16 (no autocast): diffusers' RMSNorm with float32 weights would hand
        # float32 q/k next to a bf16 v to SDPA, a call the kernel cannot take (dtypes differ).
        dtype = torch.bfloat16 if args.device.type == "cuda" else torch.float32
        self.model = self.model.to(dtype)
        self._setup(args, CLASS_NAMES, autocast=False, attention_dtype=dtype, noise_dtype=dtype)

    def describe(self) -> dict:
        out = super().describe()
        out["name"] = ("diffusers WanTransformer3DModel (small config, trained in this project), "
                       "sampled with diffusers' FlowMatchEulerDiscreteScheduler")
        out["sampler"] = "FlowMatchEulerDiscreteScheduler"
        out["dtype"] = str(self.attention_dtype).removeprefix("torch.")
        return out

    def run(self, model, steps: int, callback: Callable[[int, float], None],
            before_call: Optional[Callable[[], None]] = None) -> torch.Tensor:
        from .models.wan_small import sample_flow_match

        with torch.no_grad():
            return sample_flow_match(model, self.noise, self.labels, steps=steps, shift=self.args.shift,
                                     guidance=self.args.guidance, callback=callback, before_call=before_call)


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
        self.head_dim = WAN_1_3B_CONFIG["attention_head_dim"]
        self.attention_dtype = torch.bfloat16
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
            "heads": WAN_1_3B_CONFIG["num_attention_heads"],
            "head_dim": self.head_dim,
            "token_grid": list(self.grid),
            "latent_shape": list(self.noise.shape),
            "dtype": "bfloat16",
        }

    @torch.no_grad()
    def run(self, model, steps: int, callback: Callable[[int, float], None],
            before_call: Optional[Callable[[], None]] = None) -> torch.Tensor:
        from .models.dit import flow_schedule

        ts = flow_schedule(steps, self.args.shift)
        x = self.noise.float()
        for i in range(steps):
            t = ts[i]
            tt = torch.full((x.shape[0],), t * 1000.0, device=self.device)
            if before_call is not None:
                before_call()
            v = model(hidden_states=x.to(torch.bfloat16), timestep=tt, encoder_hidden_states=self.text,
                      return_dict=False)[0]
            x = x + (ts[i + 1] - t) * v.float()
            callback(i, t)
        return x

    def to_frames(self, video):
        return None


def make_pipeline(args):
    kinds = {p.preset: p for p in (DemoDiTPipeline, WanSmallPipeline, WanPipeline)}
    return kinds[args.preset](args)
