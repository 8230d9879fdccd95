"""tools/soak.py runs and passes at a tiny size on CPU (the long runs are for the GPU)."""

import json

from tool_module import load_tool


def test_soak_tool_small_run(tmp_path):
    soak = load_tool("soak")
    out = tmp_path / "soak.json"
    assert soak.main(["--calls", "6", "--reset-every", "3", "--seq", "384", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["ok"] and len(report["op"]["videos"]) == 2 and len(report["model"]["videos"]) == 2
    assert report["model"]["videos"][0]["live_last"] < 1.0, "the soak model skips nothing"
    assert all(v["twins_identical"] and v["shrinks"] for v in report["model"]["videos"])
