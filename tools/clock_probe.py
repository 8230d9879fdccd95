"""Which part of a speed gap is the clock: each kernel runs back to back for a few seconds while nvidia-smi samples
the SM clock and the board power, and the table gives time per call, median clock and power, and the time scaled to
one common clock (time x MHz / 1000: proportional to cycles per call while the clock is steady).

    python3 tools/clock_probe.py [--shape 32760,12,128] [--seconds 4] [--kernels dense,skip,cudnn,int8]
                                 [--variants default,nosplittail]

`skip` is the sparse op at f = 1 (a fresh state and thr = -inf: every tile visited and voted on, the state kept),
or with --forced F:KIND on a forced live set of bench.py's kinds (fraction F, KIND balanced / heavy-first / heavy-last);
--variants (A/B builds) probes each of our bf16 kernels named in --kernels once per LITEATTN_VARIANT value.

Used for issue 10's dense gap (NOTES.md, wave 15): INT8's 1.1x was found to be the clock, not the loop (wave 8, ncu);
this asks the same of our bf16 kernel against cuDNN at boost clocks, where ncu cannot look (it locks the clock)."""
from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import time

import torch

import liteattn_ops  # noqa: F401
from liteattn_ops.testing import forced_state, kernel_calls


def number(text: str) -> float:
    try:
        return float(text)
    except ValueError:  # "[N/A]" where the board does not report it
        return math.nan


def probe(name: str, fn, seconds: float) -> dict:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    smi = subprocess.Popen(
        ["nvidia-smi", "--query-gpu=clocks.sm,power.draw,temperature.gpu", "--format=csv,noheader,nounits", "-lms", "50"],
        stdout=subprocess.PIPE, text=True)
    time.sleep(0.3)  # nvidia-smi's first sample comes before the kernel's own clock settles
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        for _ in range(8):
            fn()
        calls += 8
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    smi.terminate()
    samples = [line.split(",") for line in smi.communicate()[0].splitlines() if line.count(",") == 2]
    mhz = [number(s[0]) for s in samples[6:]] or [math.nan]
    watts = [number(s[1]) for s in samples[6:]] or [math.nan]
    ms = 1e3 * elapsed / calls
    return {"name": name, "ms": ms, "mhz": statistics.median(mhz), "mhz_min": min(mhz), "watts": statistics.median(watts),
            "temp": number(samples[-1][2]) if samples else math.nan, "mcycles": ms * statistics.median(mhz) / 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="32760,12,128", help="S,H,D (bf16, B = 1)")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--kernels", default="dense,cudnn,int8",
                        help="comma list of dense, skip (f = 1), cudnn, int8 (our INT8 Q/K dense kernel)")
    parser.add_argument("--forced", default="", metavar="F:KIND",
                        help="the skip kernel on a forced live set (e.g. 0.5:heavy-last) instead of f = 1")
    parser.add_argument("--variants", default="",
                        help="A/B builds: LITEATTN_VARIANT values to probe our bf16 kernels with, in turn (e.g. default,nosplittail)")
    args = parser.parse_args()
    S, H, D = (int(x) for x in args.shape.split(","))
    state = None  # f = 1
    if args.forced:  # checked before any GPU work
        try:
            state = forced_state(S, H, D, args.forced)
        except ValueError as err:
            parser.error(f"--forced: {err}")
    calls = kernel_calls(S, H, D, state)
    ours = {"dense": calls["dense"], "skip": calls["skip"]}

    def with_variant(name, fn):
        def run():
            os.environ["LITEATTN_VARIANT"] = name
            fn()
        return run

    kernels = []
    for kind in args.kernels.split(","):
        if kind in ours:
            kernels += ([(f"{kind} {name}"[:16], with_variant(name, ours[kind])) for name in args.variants.split(",")]
                        if args.variants else [(f"ours {kind}", ours[kind])])
        elif kind == "cudnn":
            kernels.append(("cuDNN", calls["cudnn"]))
        elif kind == "int8":
            kernels.append(("ours int8", calls["int8"]))
        else:
            parser.error(f"--kernels: unknown kernel {kind!r} (expected dense, skip, cudnn or int8)")
    order = kernels + kernels  # A B C A B C: drift shows
    rows = [probe(name, fn, args.seconds) for name, fn in order]
    os.environ.pop("LITEATTN_VARIANT", None)
    flops = 4 * S * S * H * D
    forced = f", skip on forced {args.forced}" if args.forced else ""
    print(f"clock probe {S}x{H}x{D} bf16{forced}, {args.seconds:g} s per kernel, {torch.cuda.get_device_name()}")
    print(f"{'kernel':16} {'ms':>8} {'TFLOP/s':>8} {'SM MHz':>7} {'min':>5} {'W':>5} {'degC':>4} {'Mcycles':>8}")
    for r in rows:
        print(f"{r['name']:16} {r['ms']:8.3f} {flops / r['ms'] / 1e9:8.0f} {r['mhz']:7.0f} {r['mhz_min']:5.0f} "
              f"{r['watts']:5.0f} {r['temp']:4.0f} {r['mcycles']:8.2f}")


if __name__ == "__main__":
    main()
