"""python -m liteattn_ops.demo and tools/sweep.py end to end (CPU reference op).

The end-to-end runs use 4 frames x 64x64 px = 1,024 tokens (8 x 8 key tiles per head), 3 steps,
threshold -2: there the shipped model really drops tiles (live about 0.8 after 3 steps, PSNR about
50 dB), so the live fractions, the threshold and the quality are checked against an independent
oracle (the same sampling done directly with liteattn_ops.enable), not only for ranges.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

import liteattn_ops
from liteattn_ops.demo import DemoRunner, cli, parse_args, validate
from liteattn_ops.demo.models import load_demo_model, sample
from liteattn_ops.demo.quality import psnr_db, ssim
from liteattn_ops.demo.timing import site_states

REPO = Path(__file__).resolve().parents[1]
SKIPPING = ["--preset", "demo-dit", "--device", "cpu", "--steps", "3", "--resolution", "64x64", "--frames", "4", "--quiet", "--no-warmup"]
TINY = ["--preset", "demo-dit", "--device", "cpu", "--steps", "1", "--resolution", "32x32", "--frames", "4", "--quiet", "--no-profile",
        "--no-warmup"]
THRESHOLD = -2.0


def _run(tmp_path, base, *extra, name="demo"):
    out = tmp_path / name
    rc = cli.main(base + ["--out", str(out), *extra])
    report = json.loads((out / "report.json").read_text()) if rc == 0 else None
    return rc, out, report


def _namespace(base, *extra, out="unused"):
    ns = parse_args(base + ["--out", str(out), *extra])
    validate(ns)
    return ns


@pytest.fixture(scope="module")
def oracle():
    """Per step live fraction per layer, and the video, of the same sampling done directly:
    the shipped model, enable(threshold), the demo's noise (seeded generator), 3 Euler steps."""
    model, _ = load_demo_model()
    noise = torch.randn(1, 3, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    labels = torch.zeros(1, dtype=torch.long)
    dense = sample(model, noise, labels, steps=3)
    liteattn_ops.enable(model, threshold=THRESHOLD)
    per_step = []

    def record(i, t):
        per_step.append({n: s["live_fraction"] for n, s in liteattn_ops.stats(model).items()
                         if s["live_fraction"] is not None})

    video = sample(model, noise, labels, steps=3, callback=record)
    to_frames = lambda v: ((v[0].clamp(-1, 1) + 1) / 2).permute(1, 2, 3, 0)  # noqa: E731
    return {"per_step": per_step, "dense": to_frames(dense), "lite": to_frames(video)}


@pytest.fixture(scope="module")
def skipping_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("skipping")
    rc, out, report = _run(tmp, SKIPPING, f"--threshold={THRESHOLD}")
    assert rc == 0
    return out, report


def test_demo_skips_tiles_and_matches_the_oracle(skipping_run, oracle):
    out, report = skipping_run
    lite = report["liteattention"]
    assert report["threshold"] == THRESHOLD and report["tokens"] == 4 * 16 * 16
    assert all(v == [THRESHOLD] for v in lite["thresholds_per_layer"].values())
    # the live fractions per step and layer are the ones of the direct sampling (the same live tiles; the
    # fractions may differ in the last float32 bit, one is a mean over the state, the other over its heads)
    got = [r["live_fraction_per_layer"] for r in lite["per_step"]]
    assert got == [pytest.approx(step, rel=0, abs=1e-6) for step in oracle["per_step"]]
    assert lite["final_per_layer"] == pytest.approx(oracle["per_step"][-1], rel=0, abs=1e-6)
    # tiles really were skipped, and fewer are live after each step
    assert lite["final_live_fraction"] < 0.95
    fractions = [r["live_fraction"] for r in lite["per_step"]]
    assert fractions == sorted(fractions, reverse=True) and fractions[0] < 1.0
    computed = [r["computed_fraction"] for r in lite["per_step"]]
    assert computed == [1.0] + fractions[:-1]
    # the quality is the oracle's: skipping changed the video (finite PSNR), not beyond recognition
    q = report["quality"]
    expected = psnr_db(oracle["dense"], oracle["lite"])
    assert q["psnr_db"] == pytest.approx(expected, abs=0.01)
    assert 30 < q["psnr_db"] < 100
    assert q["ssim"] == pytest.approx(sum(ssim(oracle["dense"][t], oracle["lite"][t]) for t in range(4)) / 4, abs=1e-4)


def test_demo_report_timing_and_files(skipping_run):
    out, report = skipping_run
    assert report["mode"] == "eager" and report["kernel"] == "CPU reference"
    assert report["cuda_graphs"]["recorded"] == 0
    for run in ("dense", "liteattention"):
        steps = report[run]["per_step"]
        assert [s["step"] for s in steps] == [0, 1, 2]
        assert all(s["step_time_s"] > 0 for s in steps)
        assert report[run]["total_time_s"] == pytest.approx(sum(s["step_time_s"] for s in steps))
        # attention time from the profiled pass: one step on CPU, a part of that step
        assert report[run]["profiled_steps"] == 1
        assert 0 < report[run]["attention_time_s"] < report[run]["profiled_time_s"]
    assert report["speedup"]["attention"] > 0
    assert len(report["liteattention"]["final_per_head"]["blocks.0.self_attn.liteattn"]) == 4
    assert set(report["outputs"]) == {"report", "plot", "gif"}
    for path in report["outputs"].values():
        assert Path(path).stat().st_size > 0
    # the difference panel is amplified (a few dB of PSNR difference needs a gain > 1)
    assert report["gif_difference_gain"] > 1
    assert sorted(p.name for p in out.parent.iterdir()) == ["demo"]  # no temporary folders left


def test_forced_fractions_set_the_states(tmp_path):
    rc, _, report = _run(tmp_path, TINY, "--forced", "0.5")
    assert rc == 0
    forced = report["forced_live_fractions"]
    assert [f["live_fraction"] for f in forced] == [1.0, 0.5]
    # 2 key tiles per row: "balanced" keeps exactly 1 of 2 in every row
    assert [f["measured_live_fraction"] for f in forced] == [1.0, 0.5]
    assert all(f["step_time_s"] > 0 for f in forced)


def test_threshold_reaches_the_model(tmp_path, skipping_run):
    """The demo must use --threshold: -inf keeps every tile and reproduces the dense video."""
    rc, _, report = _run(tmp_path, TINY, "--threshold=-inf", "--steps", "2")
    assert rc == 0
    lite = report["liteattention"]
    assert all(v == ["-inf"] for v in lite["thresholds_per_layer"].values())
    assert lite["final_live_fraction"] == 1.0
    assert report["quality"]["psnr_db"] == "inf" or report["quality"]["psnr_db"] > 100
    assert skipping_run[1]["liteattention"]["final_live_fraction"] < lite["final_live_fraction"]


def test_batch_samples_every_video_from_its_own_noise():
    base = load_demo_model()[0]
    one = _namespace(TINY)
    two = _namespace(TINY, "--batch", "2")
    with DemoRunner(one) as r1:
        v1 = r1.dense().video
    with DemoRunner(two) as r2:
        v2 = r2.dense().video
        lite = r2.lite()
        assert {tuple(t.shape)[0] for _, t in site_states(r2.model)} == {2}
    assert v1.shape[0] == 1 and v2.shape[0] == 2 and lite.video.shape[0] == 2
    # batch element 0 is the batch-1 video (same generator stream), element 1 another video
    assert torch.allclose(v2[:1], v1, atol=1e-4)
    assert not torch.allclose(v2[1], v2[0], atol=1e-2)
    del base


def test_guidance_runs_cond_and_uncond_in_one_batch():
    ns = _namespace(TINY, "--guidance", "3")
    with DemoRunner(ns) as runner:
        dense = runner.dense()
        runner.lite()
        assert {tuple(t.shape)[0] for _, t in site_states(runner.model)} == {2}  # cond + uncond rows
        model, noise, labels = runner.model, runner.pipe.noise, runner.pipe.labels
    expected = sample(model, noise, labels, steps=1, guidance=3.0)
    unguided = sample(model, noise, labels, steps=1, guidance=1.0)
    assert torch.allclose(dense.video, expected, atol=1e-5)
    assert not torch.allclose(dense.video, unguided, atol=1e-3)


def test_seed_picks_the_noise():
    videos = {}
    for seed in ("0", "0", "1"):
        with DemoRunner(_namespace(TINY, "--seed", seed)) as runner:
            videos.setdefault(seed, []).append(runner.dense().video)
    assert torch.equal(videos["0"][0], videos["0"][1])
    assert not torch.allclose(videos["0"][0], videos["1"][0], atol=1e-2)


def test_sdpa_backend_is_used_for_the_calls_that_stay_sdpa():
    from torch.profiler import ProfilerActivity, profile

    names = {}
    for backend in ("auto", "math"):
        ns = _namespace(TINY, "--sdpa-backend", backend)
        with DemoRunner(ns) as runner:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                runner.pipe.run(runner.model, 1, lambda i, t: None)
            names[backend] = {e.name for e in prof.events()}
            assert runner.sdpa_order == ("default" if backend == "auto" else "math only")
    assert any("_scaled_dot_product_attention_math" in n for n in names["math"])
    assert not any("_scaled_dot_product_attention_math" in n for n in names["auto"])


def test_output_folder_parents_are_created_at_the_end(tmp_path):
    out = tmp_path / "a" / "b" / "demo"
    rc = cli.main(TINY + ["--out", str(out)])
    assert rc == 0 and (out / "report.json").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["demo"]


def test_rerun_replaces_the_output_folder(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    rc, _, _ = _run(tmp_path, TINY)
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["plot.png", "report.json", "side_by_side.gif"]


@pytest.mark.parametrize("args, message", [
    (["--preset", "nope"], "invalid choice"),
    (["--resolution", "30x30"], "not divisible by the patch size"),
    (["--resolution", "big"], "HxW"),
    (["--threshold", "1"], "--threshold must be <= 0"),
    (["--threshold", "nan"], "--threshold must be <= 0"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--label", "9"], "--label"),
    (["--batch", "0"], "--batch must be >= 1"),
    (["--guidance", "nan"], "--guidance must be a finite number"),
    (["--guidance", "inf"], "--guidance must be a finite number"),
    (["--shift", "0"], "--shift must be a finite number > 0"),
    (["--shift", "-1"], "--shift must be a finite number > 0"),
    (["--shift", "nan"], "--shift must be a finite number > 0"),
    (["--forced", "0"], "--forced fractions must be in (0, 1]"),
    (["--forced", "abc"], "--forced must be comma-separated"),
    (["--compile-mode", "reduce-overhead"], "--compile-mode reduce-overhead needs --compile"),
    (["--compile"], "--no-warmup works with --eager only"),
    (["--thresholds", "/nonexistent/table.json"], "no such file"),
    (["--threshold", "-4", "--thresholds", "x.json"], "not both"),
])
def test_bad_input_exits_non_zero_and_writes_nothing(tmp_path, capsys, args, message):
    rc, out, _ = _run(tmp_path, TINY, *args)
    assert rc == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["parent is a file", "under /proc"])
def test_unwritable_out_is_refused_before_any_work(tmp_path, capsys, monkeypatch, where):
    if where == "parent is a file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "sub" / "demo"
    else:  # procfs refuses new folders even to root
        if not Path("/proc/self").is_dir():
            pytest.skip("no /proc")
        out = Path("/proc/liteattn-demo-test/demo")
    ran = []
    monkeypatch.setattr("liteattn_ops.demo.runner.DemoRunner.dense", lambda self: ran.append(1))
    rc = cli.main(TINY + ["--out", str(out)])
    assert rc == 2 and "--out" in capsys.readouterr().err and not ran
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["file"] if where == "parent is a file" else [])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_requested_without_gpu(tmp_path, capsys):
    rc = cli.main(["--device", "cuda", "--out", str(tmp_path / "d")])
    assert rc == 2 and "no CUDA GPU" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_wan_preset_needs_cuda(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU refusal")
    rc = cli.main(["--preset", "wan2.1-1.3b-480p", "--device", "cpu", "--out", str(tmp_path / "d")])
    assert rc == 2 and "needs --device cuda" in capsys.readouterr().err


def test_checkpoint_that_does_not_match_the_config(tmp_path, capsys):
    from safetensors.torch import save_file

    from liteattn_ops.demo.models import CONFIG, DiTConfig, VideoDiT

    bad = tmp_path / "ckpt" / "bad.safetensors"
    bad.parent.mkdir()
    save_file(VideoDiT(DiTConfig(dim=64, num_heads=1, depth=1)).state_dict(), str(bad))
    (bad.parent / "bad.json").write_text(CONFIG.read_text())
    rc, out, _ = _run(tmp_path, TINY, "--checkpoint", str(bad))
    assert rc == 2 and "does not match config" in capsys.readouterr().err
    assert not out.exists()


def test_quality_metrics():
    a = torch.rand(2, 16, 16, 3)
    assert psnr_db(a, a) == math.inf
    assert ssim(a[0], a[0]) == pytest.approx(1.0)
    noisy = (a + 0.1 * torch.randn_like(a)).clamp(0, 1)
    assert 15 < psnr_db(a, noisy) < 25
    assert ssim(a[0], noisy[0]) < 0.99


def test_difference_gain_is_written_and_amplifies():
    from liteattn_ops.demo.outputs import difference_gain

    a = torch.rand(2, 8, 8, 3)
    assert difference_gain(a, a) == 1.0
    base = torch.full((2, 8, 8, 3), 0.25)
    gain = difference_gain(base, base + 2.0**-10)   # exact in float32
    assert gain == 500   # the largest round gain that keeps 2^-10 at or below half scale
    b = base.clone()
    b[0, 0, 0, 0] += 0.125   # one differing value (98th percentile 0): its own size sets the gain
    assert difference_gain(base, b) == 2   # 5 x 0.125 would pass half scale


def _table(path: Path, thresholds: list) -> Path:
    calibration = pytest.importorskip("liteattn_ops.calibration")
    model, _ = load_demo_model()
    liteattn_ops.enable(model)
    sites = [name for name, _ in liteattn_ops.attention_sites(model)]
    data = {"format": "liteattn_ops.threshold_table", "version": 1,
            "model": f"{type(model).__module__}.{type(model).__qualname__}", "metric": "l1", "target_error": 0.05,
            "granularity": "head", "schedule": [[0, None]], "calibration": {},
            "sites": {name: {"heads": 4, "thresholds": [thresholds]} for name in sites}}
    path.write_text(json.dumps(data))
    calibration.ThresholdTable.load(path)  # a valid table
    return path


def test_thresholds_file_sets_per_head_thresholds(tmp_path):
    # threshold 0 drops any visited tile whose max is below the running max in every row: at 2 key
    # tiles per row that happens at once, so the tiny size shows which heads got which threshold
    table = _table(tmp_path / "table.json", [0.0, "-inf", 0.0, "-inf"])
    rc, _, report = _run(tmp_path, TINY, "--thresholds", str(table))
    assert rc == 0
    lite = report["liteattention"]
    assert report["threshold"] == "table" and report["thresholds_file"] == str(table)
    for name, per_head in lite["final_per_head"].items():
        assert lite["thresholds_per_layer"][name] == [0.0, "-inf", 0.0, "-inf"]
        assert per_head[1] == 1.0 and per_head[3] == 1.0   # -inf heads keep every tile
    assert min(h[0] for h in lite["final_per_head"].values()) < 1.0


def test_thresholds_file_with_a_schedule_is_applied_step_by_step(tmp_path):
    """A table with several step ranges (calibrate(..., schedule=...)): the demo sets each step's
    thresholds before it. Here step 0 removes nothing (-inf) and step 1 uses threshold 0 on heads 0
    and 2, so the live set is whole after step 0 and shrinks at step 1 only on those heads."""
    table = _table(tmp_path / "table.json", [0.0, "-inf", 0.0, "-inf"])
    data = json.loads(table.read_text())
    data["schedule"] = [[0, 1], [1, None]]
    for entry in data["sites"].values():
        entry["thresholds"] = [["-inf"] * 4, [0.0, "-inf", 0.0, "-inf"]]
    table.write_text(json.dumps(data))
    tiny = [a if a != "1" else "2" for a in TINY]   # 2 steps
    assert tiny[tiny.index("--steps") + 1] == "2"
    rc, _, report = _run(tmp_path, tiny, "--thresholds", str(table))
    assert rc == 0
    lite = report["liteattention"]
    first, last = lite["per_step"]
    assert first["live_fraction"] == 1.0 and last["live_fraction"] < 1.0
    for name, per_head in lite["final_per_head"].items():
        assert lite["thresholds_per_layer"][name] == [0.0, "-inf", 0.0, "-inf"]
        assert per_head[1] == 1.0 and per_head[3] == 1.0


def test_thresholds_file_of_another_model_is_refused(tmp_path, capsys):
    table = _table(tmp_path / "table.json", [THRESHOLD] * 4)
    data = json.loads(table.read_text())
    data["model"] = "somewhere.OtherModel"
    table.write_text(json.dumps(data))
    rc, out, _ = _run(tmp_path, TINY, "--thresholds", str(table))
    assert rc == 2 and "calibrated on somewhere.OtherModel" in capsys.readouterr().err
    assert not out.exists()


def test_sweep_tool_uses_the_runner_and_skips_tiles(tmp_path, oracle):
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import sweep
    finally:
        sys.path.pop(0)
    out = tmp_path / "sweep"
    rc = sweep.main(["--preset", "demo-dit", "--device", "cpu", f"--thresholds={THRESHOLD}", "--steps", "3", "--resolution", "64x64",
                     "--frames", "4", "--quiet", "--no-profile", "--no-warmup", "--out", str(out)])
    assert rc == 0
    result = json.loads((out / "sweep.json").read_text())
    assert [r["threshold"] for r in result["rows"]] == [THRESHOLD]
    (second,) = result["rows"]
    # the row is the oracle's run: same live fractions, same quality
    assert second["final_per_layer"] == pytest.approx(oracle["per_step"][-1], rel=0, abs=1e-6)
    assert second["final_live_fraction"] < 0.95
    assert second["psnr_db"] == pytest.approx(psnr_db(oracle["dense"], oracle["lite"]), abs=0.01)
    assert "| threshold |" in (out / "sweep.md").read_text()
    assert (out / "sweep.png").stat().st_size > 0


def test_wan_small_preset_runs_a_diffusers_model_with_the_flow_match_scheduler(tmp_path):
    """--preset wan-small: a diffusers WanTransformer3DModel (trained a few steps here by the
    training script), routed by enable(), sampled with diffusers' FlowMatchEulerDiscreteScheduler."""
    pytest.importorskip("diffusers")
    from diffusers import FlowMatchEulerDiscreteScheduler

    from liteattn_ops.demo.models.wan_small import load_wan_small

    sys.path.insert(0, str(REPO / "tools"))
    try:
        import train_demo_dit
    finally:
        sys.path.pop(0)
    ckpt = tmp_path / "ckpt"
    train_demo_dit.main(["--device", "cpu", "--arch", "wan", "--steps", "4", "--warmup", "1", "--dim", "64",
                         "--depth", "1", "--resolutions", "2x16x16", "--tokens-per-step", "64", "--no-samples",
                         "--no-sparsity", "--out", str(ckpt)])
    path = ckpt / "demo_wan.safetensors"
    ns = _namespace(["--device", "cpu", "--steps", "2", "--resolution", "32x32", "--frames", "2", "--quiet",
                     "--no-profile", "--no-warmup"], "--preset", "wan-small", "--checkpoint", str(path),
                    "--threshold=-inf")
    with DemoRunner(ns) as runner:
        dense = runner.dense()
        lite = runner.lite()
        routed = runner.sites
        report = runner.report(dense, lite)
    assert routed == ["transformer.blocks.0.attn1", "transformer.blocks.0.attn2"]
    assert report["preset"] == "wan-small" and report["model"]["sampler"] == "FlowMatchEulerDiscreteScheduler"
    assert list(report["liteattention"]["final_per_layer"]) == ["transformer.blocks.0.attn1.liteattn"]
    assert report["liteattention"]["final_live_fraction"] == 1.0
    # the dense video is the one a plain diffusers loop gives (oracle), and -inf reproduces it
    model, _ = load_wan_small(path)
    noise = torch.randn(1, 3, 2, 32, 32, generator=torch.Generator().manual_seed(0))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(2)
    x = noise
    with torch.no_grad():
        for timestep in scheduler.timesteps:
            v = model(x, torch.full((1,), float(timestep) / 1000), torch.zeros(1, dtype=torch.long))
            x = scheduler.step(v, timestep, x, return_dict=False)[0]
    assert torch.allclose(dense.video, x, atol=1e-5)
    assert torch.allclose(lite.video, dense.video, atol=1e-4)


def test_calibrated_thresholds_beside_the_checkpoint_are_the_default(tmp_path):
    import shutil

    from liteattn_ops.demo.models import CHECKPOINT, CONFIG

    ckpt = tmp_path / "model" / "m.safetensors"
    ckpt.parent.mkdir()
    shutil.copy(CHECKPOINT, ckpt)
    shutil.copy(CONFIG, ckpt.with_suffix(".json"))
    table = _table(ckpt.parent / "m_thresholds.json", [-3.0, "-inf", -3.0, "-inf"])
    rc, _, report = _run(tmp_path, TINY, "--checkpoint", str(ckpt))
    assert rc == 0 and report["thresholds_file"] == str(table) and report["threshold"] == "table"
    assert all(v == [-3.0, "-inf", -3.0, "-inf"] for v in report["liteattention"]["thresholds_per_layer"].values())
    # an explicit --threshold wins over the file
    rc, _, report = _run(tmp_path, TINY, "--checkpoint", str(ckpt), "--threshold", "-5", name="explicit")
    assert rc == 0 and report["thresholds_file"] is None and report["threshold"] == -5.0
