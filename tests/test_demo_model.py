"""The demo's video DiT, its procedural videos, its training script and the shipped checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from liteattn_ops.demo.models import CHECKPOINT, CLASS_NAMES, DiTConfig, VideoDiT, generate_videos, load_demo_model, sample
from liteattn_ops.demo.models import CheckpointError
from liteattn_ops.demo.models.dit import rope_freqs_3d

REPO = Path(__file__).resolve().parents[1]
TINY = DiTConfig(dim=64, num_heads=1, depth=2, mlp_ratio=2.0)


def test_model_shapes_at_several_resolutions():
    torch.manual_seed(0)
    model = VideoDiT(TINY).eval()
    assert model.cfg.head_dim == 64
    for frames, h, w in [(2, 16, 16), (3, 16, 24), (4, 32, 32)]:
        x = torch.randn(2, 3, frames, h, w)
        with torch.no_grad():
            out = model(x, torch.tensor([0.3, 0.9]), torch.tensor([0, TINY.num_classes]))
        assert out.shape == x.shape
        assert model.token_grid(frames, h, w) == (frames, h // 4, w // 4)


def test_patchify_roundtrip_and_token_order():
    model = VideoDiT(TINY)
    x = torch.randn(1, 3, 2, 8, 12)
    tokens = model.patchify(x)
    assert tokens.shape == (1, 2 * 2 * 3, 3 * 16)
    assert torch.equal(model.unpatchify(tokens, (2, 2, 3)), x)
    # token order is (t, h, w) row-major: token 1 is the patch right of token 0
    assert torch.equal(tokens[0, 1].view(3, 4, 4), x[0, :, 0, 0:4, 4:8])


def test_bad_resolution_is_a_clear_error():
    model = VideoDiT(TINY)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        model(torch.randn(1, 3, 2, 18, 16), torch.tensor([0.5]), torch.tensor([0]))


def test_rope_is_relative():
    """Rotated q.k depends only on the offset between positions (so any grid size works)."""
    cos, sin = rope_freqs_3d((4, 6, 6), 64)
    assert cos.shape == (4 * 6 * 6, 32)
    from liteattn_ops.demo.models.dit import apply_rope

    q = torch.randn(64).expand(1, 1, 144, 64)
    k = torch.randn(64).expand(1, 1, 144, 64)
    qr, kr = apply_rope(q, cos, sin)[0, 0], apply_rope(k, cos, sin)[0, 0]

    def idx(t, h, w):
        return (t * 6 + h) * 6 + w

    a = qr[idx(1, 2, 3)] @ kr[idx(0, 1, 1)]
    b = qr[idx(3, 4, 5)] @ kr[idx(2, 3, 3)]
    assert torch.allclose(a, b, atol=1e-4)


def test_videos_are_deterministic_and_in_range():
    a, la = generate_videos(3, 4, 32, 48, seed=7)
    b, lb = generate_videos(3, 4, 32, 48, seed=7)
    c, _ = generate_videos(3, 4, 32, 48, seed=8)
    assert a.shape == (3, 3, 4, 32, 48) and la.shape == (3,)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1
    v, labels = generate_videos(4, 2, 16, 16, labels=torch.arange(4))
    assert labels.tolist() == [0, 1, 2, 3] and len(CLASS_NAMES) == 4
    # things move: consecutive frames differ
    assert (a[:, :, 1:] - a[:, :, :-1]).abs().mean() > 1e-3


def test_a_few_training_steps_lower_the_loss():
    torch.manual_seed(0)
    model = VideoDiT(TINY)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    x0, y = generate_videos(4, 2, 16, 16, seed=1)
    noise = torch.randn_like(x0)
    t = torch.tensor([0.2, 0.4, 0.6, 0.8])
    xt = (1 - t.view(-1, 1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1, 1) * noise
    losses = []
    for _ in range(25):
        loss = F.mse_loss(model(xt, t, y), noise - x0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0]


def test_training_script_writes_checkpoint_and_config(tmp_path):
    out = tmp_path / "ckpt"
    cmd = [sys.executable, str(REPO / "tools" / "train_demo_dit.py"), "--device", "cpu", "--steps", "12",
           "--warmup", "2", "--dim", "64", "--depth", "1", "--resolutions", "2x16x16,4x16x16",
           "--tokens-per-step", "256", "--out", str(out), "--sample-steps", "2", "--log-every", "5"]
    cmd += ["--recipe", "sparse", "--locality-weight", "0.5", "--locality-radius", "0,1,1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "command: python tools/train_demo_dit.py" in proc.stdout and "time budget: 1200 s" in proc.stdout
    meta = json.loads((out / "demo_dit.json").read_text())
    assert meta["training"]["steps"] == 12 and meta["training"]["complete"]
    loc = meta["training"]["locality"]
    assert loc["weight"] == 0.5 and loc["radius"] == [0, 1, 1] and 0 < loc["final_far_mass"] < 1
    sparsity = meta["sparsity"]
    assert sparsity["size"] == [2, 16, 16] and len(sparsity["per_head"]) == 1
    assert 0 < sparsity["live_fraction"] <= 1
    assert meta["training"]["final_loss"] > 0
    assert "train_demo_dit.py" in meta["training"]["command"]
    for name in ("demo_dit.safetensors", "demo_dit_loss.png", "demo_dit_samples.png"):
        assert (out / name).stat().st_size > 0
    model, _ = load_demo_model(out / "demo_dit.safetensors")
    assert model.cfg.dim == 64 and model.cfg.depth == 1


def _neighbour_correlation(v: torch.Tensor) -> float:
    """Correlation of horizontally adjacent pixels (about 0 for white noise)."""
    a = v[..., :, :-1].flatten().double()
    b = v[..., :, 1:].flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_shipped_checkpoint_generates_videos_not_noise():
    assert CHECKPOINT.stat().st_size <= 25 * 2**20
    model, meta = load_demo_model()
    assert meta["training"]["complete"] and meta["training"]["steps"] > 1000
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 3, 4, 32, 32, generator=g)
    video = sample(model, noise, torch.tensor([0, 2]), steps=8)
    real, _ = generate_videos(2, 4, 32, 32, seed=0)
    # the video is smooth in space (like the training videos), the noise is not
    assert abs(_neighbour_correlation(noise)) < 0.05
    assert _neighbour_correlation(video) > 0.6
    assert _neighbour_correlation(real) > 0.6
    # pixel range like the training data: inside about [-1, 1], not the noise's spread
    assert video.abs().quantile(0.99) < 1.6 < noise.abs().quantile(0.99)
    # temporally coherent: consecutive frames much closer than independent noise frames
    dt = (video[:, :, 1:] - video[:, :, :-1]).pow(2).mean()
    assert dt < 0.1 * (noise[:, :, 1:] - noise[:, :, :-1]).pow(2).mean()


def test_checkpoint_that_does_not_match_its_config(tmp_path):
    from safetensors.torch import save_file

    model = VideoDiT(TINY)
    bad = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(bad))
    (tmp_path / "bad.json").write_text(CHECKPOINT.with_suffix(".json").read_text())
    with pytest.raises(CheckpointError, match="does not match config"):
        load_demo_model(bad)
    with pytest.raises(CheckpointError, match="not found"):
        load_demo_model(tmp_path / "missing.safetensors")


def test_locality_far_mass_is_the_attention_mass_outside_the_box():
    from liteattn_ops.demo.models.dit import Locality

    grid = (2, 4, 4)
    s = 2 * 4 * 4
    # uniform attention (q = 0): the far mass is the fraction of keys outside the box
    q = torch.zeros(1, 2, s, 64)
    k = torch.randn(1, 2, s, 64)
    loc = Locality(radius=(0, 1, 1), queries=s)
    torch.manual_seed(0)
    got = float(loc.far_mass(q, k, grid))
    torch.manual_seed(0)
    idx = torch.randint(0, s, (s,))
    pos = torch.stack(torch.meshgrid(*(torch.arange(g) for g in grid), indexing="ij"), -1).reshape(s, 3)
    near = [int(((pos[i] - pos).abs() <= torch.tensor([0, 1, 1])).all(-1).sum()) for i in idx.tolist()]
    assert got == pytest.approx(sum(1 - n / s for n in near) / s, abs=1e-6)
    # attention that only looks at the query itself has no far mass
    own = torch.nn.functional.one_hot(torch.arange(s), 64).float()[None, None].expand(1, 2, s, 64) * 30
    assert float(loc.far_mass(own, own, grid)) < 1e-6


def test_locality_term_is_off_in_eval_and_without_it():
    from liteattn_ops.demo.models.dit import Locality

    model = VideoDiT(TINY)
    x = torch.randn(1, 3, 2, 16, 16)
    t, y = torch.tensor([0.5]), torch.tensor([0])
    model.train()
    model(x, t, y)
    assert model.locality_loss() is None
    model.set_locality(Locality(radius=(0, 1, 1)))
    model(x, t, y)
    loss = model.locality_loss()
    assert loss is not None and loss.requires_grad and 0 < float(loss.detach()) < 1
    model.eval()
    model.set_locality(Locality())
    with torch.no_grad():
        model(x, t, y)
    assert model.locality_loss() is None
