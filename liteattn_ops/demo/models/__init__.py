"""The demo's video DiT, its procedural training videos and its shipped checkpoint.

``load_demo_model()`` returns the model trained by ``tools/train_demo_dit.py`` (the
checkpoint ``demo_dit.safetensors`` and its ``demo_dit.json`` beside this file).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .dit import DiTConfig, VideoDiT, sample
from .videos import CLASS_NAMES, generate_videos

__all__ = [
    "CheckpointError",
    "CHECKPOINT",
    "CLASS_NAMES",
    "CONFIG",
    "DiTConfig",
    "VideoDiT",
    "generate_videos",
    "load_demo_model",
    "sample",
]

_HERE = Path(__file__).resolve().parent
CHECKPOINT = _HERE / "demo_dit.safetensors"
CONFIG = _HERE / "demo_dit.json"


class CheckpointError(ValueError):
    """The checkpoint is missing or does not match its config."""


def load_demo_model(
    checkpoint: str | Path | None = None,
    config: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[VideoDiT, dict]:
    """Load the trained demo DiT; returns ``(model in eval mode, metadata dict)``.

    Raises :class:`CheckpointError` with a clear message when a file is missing or
    the tensors in the checkpoint do not match the model the config describes.
    """
    from safetensors.torch import load_file

    ckpt = Path(checkpoint) if checkpoint is not None else CHECKPOINT
    cfg_path = Path(config) if config is not None else ckpt.with_suffix(".json")
    if not ckpt.is_file():
        raise CheckpointError(f"checkpoint not found: {ckpt}")
    if not cfg_path.is_file():
        raise CheckpointError(f"checkpoint config not found: {cfg_path}")
    try:
        meta = json.loads(cfg_path.read_text())
        cfg = DiTConfig.from_dict(meta["model_config"])
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"bad checkpoint config {cfg_path}: {e}") from e
    model = VideoDiT(cfg)
    state = load_file(str(ckpt))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    bad_shape = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or bad_shape:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[:3]})")
        if bad_shape:
            k = bad_shape[0]
            parts.append(
                f"{len(bad_shape)} tensors of the wrong shape (e.g. {k}: "
                f"{tuple(state[k].shape)} in the file, {tuple(expected[k].shape)} in the config)"
            )
        raise CheckpointError(f"checkpoint {ckpt} does not match config {cfg_path}: " + "; ".join(parts))
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.to(device=device, dtype=dtype).eval(), meta
