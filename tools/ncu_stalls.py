"""Summarise an ncu source-page CSV: the warp-stall totals and the instructions with the most samples.

    ncu -i REPORT.ncu-rep --page source --csv --print-source sass | gzip > sass.csv.gz
    python3 tools/ncu_stalls.py sass.csv.gz [TOP]

Used to compare two kernels' profiles without the ncu GUI (NOTES.md, wave 12: where persistskip's time went)."""
from __future__ import annotations

import collections
import csv
import gzip
import sys


def load(path: str) -> tuple[dict[str, int], list[list[str]]]:
    with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
        rows = list(csv.reader(f))
    start = next(i for i, r in enumerate(rows) if r and r[0] == "Address")
    header = rows[start]
    return {h: i for i, h in enumerate(header)}, [r for r in rows[start + 1:] if len(r) == len(header)]


def main(path: str, top: int) -> None:
    col, data = load(path)
    stalls = [h for h in col if h.startswith("stall_") and "Not Issued" not in h]
    count = lambda r, h: int(r[col[h]] or 0)  # noqa: E731
    totals = collections.Counter({h: sum(count(r, h) for r in data) for h in stalls})
    samples = sum(totals.values()) or 1
    executed = sum(count(r, "Instructions Executed") for r in data)
    print(f"samples {samples}  instructions executed {executed}")
    print("  " + ", ".join(f"{h[6:]} {100 * v / samples:.1f}%" for h, v in totals.most_common() if v))
    print(f"top {top} instructions (index, share of samples, top stalls in %, sass):")
    ranked = sorted(range(len(data)), key=lambda i: -count(data[i], "# Samples"))
    for i in ranked[:top]:
        r = data[i]
        n = max(count(r, "# Samples"), 1)
        worst = sorted(((count(r, h), h[6:]) for h in stalls), reverse=True)[:3]
        why = " ".join(f"{name}:{100 * v / n:.0f}" for v, name in worst if v)
        print(f"  {i:5d} {100 * n / samples:5.2f}%  {why}  {r[col['Source']].strip()[:70]}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 25)
