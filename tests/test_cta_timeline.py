"""tools/cta_timeline.py's summary of the kernel's per-CTA %globaltimer marks (CPU only; the marks come from a
timeline build on the GPU). The layout is csrc/liteattn.h's: [entry, consumers done, producer done, rows], then per
row (handed, first K, done)."""

import numpy as np
import pytest

from tool_module import load_tool


BASE = 10**12  # %globaltimer is never 0; 0 is "not written"


def cta(entry, consumers_done, producer_done, rows, cap=3):
    at = lambda t: BASE + t if t else 0  # noqa: E731  (a first-K mark of 0: not written)
    out = [BASE + entry, BASE + consumers_done, BASE + producer_done, len(rows)]
    for handed, first_k, done in rows:
        out += [at(handed), at(first_k), at(done)]
    return out + [0] * (3 * (cap - len(rows)))


def test_summary_of_two_ctas():
    tool = load_tool("cta_timeline")
    ns = 1000  # marks in ns, the summary in us
    marks = np.array([
        # CTA 0: starts at 0, first row handed at 2 us, its K at 3, done at 10; second row handed at 11 (gap 1), K at
        # 13 (wait 2), done at 20; warps done at 21 / 20.
        cta(0, 21 * ns, 20 * ns, [(2 * ns, 3 * ns, 10 * ns), (11 * ns, 13 * ns, 20 * ns)]),
        # CTA 1: starts at 4 us, one row handed at 8 (wait 4), no K mark (no visited tile), done at 9; exits at 12.
        cta(4 * ns, 12 * ns, 11 * ns, [(8 * ns, 0, 9 * ns)]),
        # A CTA of the grid that never ran a row (a larger buffer than the grid): left out.
        [0] * (4 + 9),
    ])
    s = tool.summarize(marks)
    assert s["ctas"] == 2 and s["rows"] == 3
    assert s["start_mean"] == pytest.approx(2.0) and s["start_max"] == pytest.approx(4.0)
    assert s["first_row_wait"] == pytest.approx((2 + 4) / 2)
    assert s["first_k_wait"] == pytest.approx(1.0)      # CTA 1's row has no K mark
    assert s["row_time"] == pytest.approx((8 + 9 + 1) / 3)
    assert s["row_gap"] == pytest.approx(1.0)
    assert s["later_k_wait"] == pytest.approx(2.0)
    assert s["last_row_min"] == pytest.approx(9.0) and s["last_row_max"] == pytest.approx(20.0)
    assert s["exit_max"] == pytest.approx(21.0)
    assert s["exit_after_last_row"] == pytest.approx((1 + 3) / 2)


def test_summary_rejects_a_wrong_layout_and_an_empty_timeline():
    tool = load_tool("cta_timeline")
    with pytest.raises(ValueError, match="expected"):
        tool.summarize(np.zeros((2, 4 + 4), dtype=np.int64))
    with pytest.raises(ValueError, match="no CTA recorded a row"):
        tool.summarize(np.zeros((2, 4 + 3), dtype=np.int64))


def test_launch_forward_rejects_a_timeline_of_the_wrong_layout():
    # The op layer's check, before anything reaches the extension (a stand-in that fails if called).
    import torch
    from types import SimpleNamespace

    from liteattn_ops.core import ops

    ext = SimpleNamespace(TIMELINE_HEADER=4, TIMELINE_MARKS=3, forward=lambda **_: pytest.fail("launched"))
    q = torch.zeros(1, 1, 8, 64)
    out, lse = torch.zeros(1, 1, 8, 64), torch.zeros(1, 1, 8)
    for bad in (torch.zeros(2, 4 + 4, dtype=torch.int64), torch.zeros(2, 4 + 3, dtype=torch.int32),
                torch.zeros(2, 4, dtype=torch.int64), torch.zeros(4 + 3, 2, dtype=torch.int64).t()):
        with pytest.raises(ValueError, match="timeline: expected a contiguous int64"):
            ops.launch_forward(ext, q, q, q, out, lse, q.shape, None, None, None, None, None, timeline=bad)
