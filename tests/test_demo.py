"""python -m liteattn_ops.demo and tools/sweep.py end to end at tiny settings (CPU reference op)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from liteattn_ops.demo import app as demo

REPO = Path(__file__).resolve().parents[1]
TINY = ["--device", "cpu", "--steps", "3", "--resolution", "32x32", "--frames", "4", "--quiet", "--no-warmup"]


def _run(tmp_path, *extra, name="demo"):
    out = tmp_path / name
    rc = demo.main(TINY + ["--out", str(out), *extra])
    return rc, out


def test_demo_end_to_end_writes_a_well_formed_report(tmp_path, capsys):
    rc, out = _run(tmp_path, "--threshold", "-4")
    assert rc == 0
    printed = capsys.readouterr().out
    assert "speedup" in printed and "PSNR" in printed and str(out / "report.json") in printed
    report = json.loads((out / "report.json").read_text())
    assert report["preset"] == "demo-dit" and report["mode"] == "eager" and report["tokens"] == 4 * 8 * 8
    assert report["steps"] == 3 and report["threshold"] == -4.0
    for run in ("dense", "liteattention"):
        steps = report[run]["per_step"]
        assert [s["step"] for s in steps] == [0, 1, 2]
        assert all(s["step_time_s"] > 0 and s["attention_time_s"] > 0 for s in steps)
        assert report[run]["total_time_s"] > 0
    lite = report["liteattention"]
    layers = lite["per_step"][0]["live_fraction_per_layer"]
    assert len(layers) == report["model"]["self_attention_layers"]
    assert all(name.startswith("blocks.") and "self_attn" in name for name in layers)
    fractions = [s["live_fraction"] for s in lite["per_step"]]
    assert all(0 < f <= 1 for f in fractions) and fractions == sorted(fractions, reverse=True)
    assert lite["per_step"][0]["computed_fraction"] == 1.0
    assert len(lite["final_per_head"]["blocks.0.self_attn.liteattn"]) == report["model"]["heads"]
    assert report["speedup"]["total"] > 0 and report["speedup"]["attention"] > 0
    q = report["quality"]
    assert len(q["psnr_db_per_frame"]) == 4 and 0 < q["ssim"] <= 1
    assert set(report["outputs"]) == {"report", "plot", "gif"}
    for path in report["outputs"].values():
        assert Path(path).stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no temporary folders left


def test_threshold_minus_inf_reproduces_the_dense_video(tmp_path):
    rc, out = _run(tmp_path, "--threshold=-inf")
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    psnr = report["quality"]["psnr_db"]
    assert psnr == "inf" or psnr > 60, psnr
    assert report["liteattention"]["final_live_fraction"] == 1.0
    assert report["quality"]["max_abs_diff"] < 1e-4


def test_output_folder_parents_are_created_at_the_end(tmp_path):
    out = tmp_path / "a" / "b" / "demo"
    rc = demo.main(TINY + ["--steps", "1", "--out", str(out)])
    assert rc == 0 and (out / "report.json").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["demo"]


def test_rerun_replaces_the_output_folder(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    rc, _ = _run(tmp_path, "--steps", "1")
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["plot.png", "report.json", "side_by_side.gif"]


@pytest.mark.parametrize("args, message", [
    (["--preset", "nope"], "invalid choice"),
    (["--resolution", "30x30"], "not divisible by the patch size"),
    (["--resolution", "big"], "HxW"),
    (["--threshold", "1"], "--threshold must be <= 0"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--label", "9"], "--label"),
])
def test_bad_input_exits_non_zero_and_writes_nothing(tmp_path, capsys, args, message):
    rc, out = _run(tmp_path, *args)
    assert rc == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_requested_without_gpu(tmp_path, capsys):
    rc = demo.main(["--device", "cuda", "--out", str(tmp_path / "d")])
    assert rc == 2 and "no CUDA GPU" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_wan_preset_needs_cuda(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU refusal")
    rc = demo.main(["--preset", "wan2.1-1.3b-480p", "--device", "cpu", "--out", str(tmp_path / "d")])
    assert rc == 2 and "needs --device cuda" in capsys.readouterr().err


def test_checkpoint_that_does_not_match_the_config(tmp_path, capsys):
    from safetensors.torch import save_file

    from liteattn_ops.demo.models import CONFIG, DiTConfig, VideoDiT

    bad = tmp_path / "ckpt" / "bad.safetensors"
    bad.parent.mkdir()
    save_file(VideoDiT(DiTConfig(dim=64, num_heads=1, depth=1)).state_dict(), str(bad))
    (bad.parent / "bad.json").write_text(CONFIG.read_text())
    rc, out = _run(tmp_path, "--checkpoint", str(bad))
    assert rc == 2 and "does not match config" in capsys.readouterr().err
    assert not out.exists()


def test_quality_metrics():
    a = torch.rand(2, 16, 16, 3)
    assert demo.psnr_db(a, a) == math.inf
    assert demo.ssim(a[0], a[0]) == pytest.approx(1.0)
    noisy = (a + 0.1 * torch.randn_like(a)).clamp(0, 1)
    assert 15 < demo.psnr_db(a, noisy) < 25
    assert demo.ssim(a[0], noisy[0]) < 0.99


def test_sweep_tool(tmp_path):
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import sweep
    finally:
        sys.path.pop(0)
    out = tmp_path / "sweep"
    rc = sweep.main(["--device", "cpu", "--thresholds=-inf,-2", "--steps", "2", "--resolution", "32x32",
                     "--frames", "2", "--quiet", "--out", str(out)])
    assert rc == 0
    result = json.loads((out / "sweep.json").read_text())
    assert [r["threshold"] for r in result["rows"]] == ["-inf", -2.0]
    first, second = result["rows"]
    assert first["final_live_fraction"] == 1.0
    assert first["psnr_db"] == "inf" or first["psnr_db"] > 60
    assert second["final_live_fraction"] <= 1.0
    assert "| threshold |" in (out / "sweep.md").read_text()
    assert (out / "sweep.png").stat().st_size > 0
