"""Where a call's time goes, CTA by CTA: the kernel's %globaltimer marks (csrc/cta_timeline.cuh) of the dense and the
skip path at one shape, summarised side by side.

    python3 tools/cta_timeline.py [--shape 16896,8,128] [--modes dense,skip] [--forced 0.5:balanced] [--rows 64]
                                  [--csv PREFIX]

Needs an A/B build that compiles the timeline variant of the kernels it times, e.g. at head dim 128
`CMAKE_ARGS='-DLITEATTN_AB_VARIANTS=261123@128' pip install --no-build-isolation --no-deps -e .` (261123 = the d128
default 130051 + the timeline bit 131072, csrc/liteattn.h); the calls run with LITEATTN_VARIANT=timeline. For
NOTES.md wave 21's open terms: the skip kernel's ~8-9 tile-times per CTA and call, and its ~0.9 tile-times per row
once tiles are skipped, which no code region of ncu's stall samples holds. Per mode, in microseconds: when the CTAs
start after the first one, how long a CTA waits for its first row and that row's first K tile, the rows' own time,
the gap between a row's end and the next one's hand-over, the wait for each later row's first K tile, and when the
CTAs end (last row done; all warps done)."""
from __future__ import annotations

import argparse
import math
import os

import numpy as np

HEADER, MARKS = 4, 3  # csrc/liteattn.h kTimelineHeader, kTimelineMarks (checked against the extension at run time)
ENTRY, CONSUMERS_DONE, PRODUCER_DONE, ROW_COUNT = range(HEADER)  # the header slots (liteattn.h kTimelineEntry ...)
ROW_DONE = 2  # a row's marks: handed, first K, done (liteattn.h kTimelineRowHanded ...)


def summarize(marks: np.ndarray) -> dict:
    """The summary of one call's timeline: marks (CTAs, HEADER + MARKS * rows) int64 nanoseconds as the kernel wrote
    them (0 where nothing was written). CTAs that recorded no row are left out. Microseconds."""
    marks = np.asarray(marks, dtype=np.int64)
    if marks.ndim != 2 or marks.shape[1] <= HEADER or (marks.shape[1] - HEADER) % MARKS:
        raise ValueError(f"timeline: expected (CTAs, {HEADER} + {MARKS} * rows) marks, got {marks.shape}")
    rows_cap = (marks.shape[1] - HEADER) // MARKS
    used = marks[(marks[:, ROW_COUNT] > 0) & (marks[:, ENTRY] > 0)]
    if used.shape[0] == 0:
        raise ValueError("timeline: no CTA recorded a row (was the timeline variant running?)")
    t0 = used[:, ENTRY].min()
    us = lambda x: np.asarray(x, dtype=np.float64) / 1e3  # noqa: E731
    start, rows_per_cta = us(used[:, ENTRY] - t0), np.minimum(used[:, ROW_COUNT], rows_cap)
    first_handed, first_k, busy, gap, later_k = [], [], [], [], []
    for cta, n in zip(used, rows_per_cta):
        handed, k1, done = (cta[HEADER + j: HEADER + MARKS * n: MARKS] for j in range(MARKS))
        first_handed.append(handed[0] - cta[ENTRY])
        if k1[0] > 0:
            first_k.append(k1[0] - handed[0])
        busy.extend(done - handed)
        gap.extend(handed[1:] - done[:-1])
        later_k.extend(k1[1:][k1[1:] > 0] - handed[1:][k1[1:] > 0])
    mean = lambda x: float(np.mean(us(x))) if len(x) else math.nan  # noqa: E731
    last_row = us(np.array([cta[HEADER + MARKS * (n - 1) + ROW_DONE] for cta, n in zip(used, rows_per_cta)]) - t0)
    exits = us(np.maximum(used[:, CONSUMERS_DONE], used[:, PRODUCER_DONE]) - t0)
    return {"ctas": int(used.shape[0]), "rows": int(rows_per_cta.sum()), "start_mean": float(start.mean()),
            "start_max": float(start.max()), "first_row_wait": mean(first_handed), "first_k_wait": mean(first_k),
            "row_time": mean(busy), "row_gap": mean(gap), "later_k_wait": mean(later_k),
            "last_row_min": float(last_row.min()), "last_row_max": float(last_row.max()),
            "exit_max": float(exits.max()), "exit_after_last_row": float(np.mean(exits - last_row))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="16896,8,128", help="S,H,D (bf16, B = 1)")
    parser.add_argument("--modes", default="dense,skip", help="comma list of dense, skip")
    parser.add_argument("--forced", default="", metavar="F:KIND", help="the skip mode on a forced live set")
    parser.add_argument("--rows", type=int, default=64, help="rows recorded per CTA (the first ones)")
    parser.add_argument("--csv", default="", help="write each mode's raw marks to PREFIX_MODE.csv")
    args = parser.parse_args(argv)
    try:
        S, H, D = (int(x) for x in args.shape.split(","))
    except ValueError:
        parser.error(f"--shape: expected S,H,D (three integers), got {args.shape!r}")
    modes = args.modes.split(",")
    if unknown := sorted(set(modes) - {"dense", "skip"}):
        parser.error(f"--modes: unknown {', '.join(unknown)}; expected a comma list of dense, skip")
    if args.rows < 1:
        parser.error("--rows must be >= 1")

    import torch

    import liteattn_ops  # noqa: F401
    from liteattn_ops.core import ops
    from liteattn_ops.core.extension import extension
    from liteattn_ops.core.state import new_state
    from liteattn_ops.core.tiling import tile_shape
    from liteattn_ops.testing import forced_state

    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    ext = extension()
    if (ext.TIMELINE_HEADER, ext.TIMELINE_MARKS) != (HEADER, MARKS):
        raise SystemExit(f"cta_timeline: the extension's timeline layout {(ext.TIMELINE_HEADER, ext.TIMELINE_MARKS)} "
                         f"is not this tool's {(HEADER, MARKS)}")
    state0 = None
    if args.forced:
        try:
            state0 = forced_state(S, H, D, args.forced)
        except ValueError as err:
            parser.error(f"--forced: {err}")
    q, k, v = (torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
    bm = tile_shape(D, torch.bfloat16)[0]
    sms = ext.device_sm_count()
    ctas = H * -(-S // bm) + 16 * sms  # any grid of the call: one tile a CTA, plus a split tail's units
    threshold = torch.full((H,), -math.inf, device="cuda")
    os.environ["LITEATTN_VARIANT"] = (os.environ.get("LITEATTN_VARIANT", "default") + "+timeline").lstrip("+")
    print(f"CTA timeline {S}x{H}x{D} bf16{', skip on forced ' + args.forced if args.forced else ''}, "
          f"{torch.cuda.get_device_name()}, LITEATTN_VARIANT={os.environ['LITEATTN_VARIANT']}")
    results = {}
    for mode in modes:
        base = None if mode == "dense" else (state0 if state0 is not None else
                                             new_state(1, H, S, S, D, torch.bfloat16, "cuda"))

        def call(timeline=None):
            out = torch.empty(1, S, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
            lse = torch.empty(1, H, S, device="cuda", dtype=torch.float32)
            state = None if base is None else base.clone()
            ops.launch_forward(ext, q, k, v, out, lse, q.shape, state, None if base is None else threshold,
                               None, None, None, timeline=timeline)

        for _ in range(3):
            call()
        marks = torch.zeros(ctas, HEADER + MARKS * args.rows, device="cuda", dtype=torch.int64)
        torch.cuda.synchronize()
        call(marks)
        torch.cuda.synchronize()
        marks = marks.cpu().numpy()
        if args.csv:
            np.savetxt(f"{args.csv}_{mode}.csv", marks[marks[:, ROW_COUNT] > 0], fmt="%d", delimiter=",")
        results[mode] = summarize(marks)
    keys = list(next(iter(results.values())))
    print(f"{'us':24}" + "".join(f"{m:>12}" for m in results))
    for key in keys:
        print(f"{key:24}" + "".join(f"{r[key]:12.2f}" if isinstance(r[key], float) else f"{r[key]:12d}"
                                     for r in results.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
