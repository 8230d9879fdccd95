"""The kernels one call of our op launches, and the GPU time of each (torch.profiler, CUPTI timestamps).

    python3 tools/kernel_times.py [--shape 16896,8,128] [--calls 5] [--modes dense,skip]

`skip` is the sparse op at f = 1 (fresh state, thr = -inf: every tile visited and voted on), or with --forced F:KIND on
a forced live set of bench.py's kinds. Per mode: each kernel's launches per call and mean time, and the span from
the first kernel's start to the last one's end per call -- so the skip path's per-call kernels (the LPT schedule,
the split tail's combine and vote) are told apart from the attention kernel itself, which the clock probe and
bench.py time together (NOTES.md "Wave 18": is the skip path's f = 1 excess in the loop, at the row boundaries, or
in the kernels around it?)."""
from __future__ import annotations

import argparse
import collections

import torch
from torch.profiler import ProfilerActivity, profile

import liteattn_ops  # noqa: F401
from liteattn_ops.testing import forced_state, kernel_calls


def kernel_table(fn, calls: int) -> tuple[list[tuple[str, float, float]], float]:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if not kernels:
        raise SystemExit("kernel_times: the profiler recorded no CUDA kernels (CUPTI unavailable?)")
    by_name: dict[str, list[float]] = collections.defaultdict(list)
    for e in kernels:
        by_name[e.name].append(e.time_range.elapsed_us())
    start = min(e.time_range.start for e in kernels)
    end = max(e.time_range.end for e in kernels)
    rows = [(name, len(t) / calls, sum(t) / len(t)) for name, t in by_name.items()]
    return sorted(rows, key=lambda r: -r[1] * r[2]), (end - start) / calls


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="16896,8,128", help="S,H,D (bf16, B = 1)")
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--modes", default="dense,skip", help="comma list of dense, skip")
    parser.add_argument("--forced", default="", metavar="F:KIND",
                        help="the skip mode on a forced live set (e.g. 0.5:heavy-last) instead of f = 1")
    args = parser.parse_args(argv)
    try:
        shape = tuple(int(x) for x in args.shape.split(","))
        if len(shape) != 3:
            raise ValueError
    except ValueError:
        parser.error(f"--shape: expected S,H,D (three integers), got {args.shape!r}")
    modes = args.modes.split(",")
    if unknown := sorted(set(modes) - {"dense", "skip"}):
        parser.error(f"--modes: unknown {', '.join(unknown)}; expected a comma list of dense, skip")
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    state = None
    if args.forced:
        try:
            state = forced_state(*shape, args.forced)
        except ValueError as err:
            parser.error(f"--forced: {err}")
    forced = f", skip on forced {args.forced}" if args.forced else ""
    print(f"kernel times {shape[0]}x{shape[1]}x{shape[2]} bf16{forced}, {args.calls} calls, "
          f"{torch.cuda.get_device_name()}")
    for mode in modes:
        rows, span = kernel_table(kernel_calls(*shape, state)[mode], args.calls)
        print(f"{mode}: {span:.1f} us per call, first kernel start to last kernel end")
        for name, per_call, us in rows:
            print(f"  {per_call:4.1f} x {us:10.1f} us  {name[:110]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
