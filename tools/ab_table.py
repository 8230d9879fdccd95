"""A/B summary of bench.py --variants ... --repeats R JSON files: per shape and variant, the mean TFLOP/s of the
bf16 dense, bf16 skip f = 1, INT8 dense and INT8 skip f = 1 rows over the repeats (each repeat in brackets), and the
ratio of each to the default variant's mean; cuDNN (SDPA) of the same run last.

    python3 tools/ab_table.py ab.json [more.json ...]

`tools/gpu_suite.sh ab` prints it after its timing run. (Until wave 9 this file was
benchmarks/wave8/call1/table.py, the path the call scripts of waves 8-9 name.)"""
import json, sys
from collections import defaultdict

for path in sys.argv[1:]:
    data = json.load(open(path))
    rows = data["rows"] if isinstance(data, dict) else data
    by = defaultdict(list)
    sdpa = {}
    for r in rows:
        if "S" not in r:
            continue
        shape = (r["S"], r["H"], r["D"])
        if r["name"].startswith("sdpa") or "cudnn" in r["name"].lower():
            sdpa.setdefault(shape, []).append(f"{r['name']} {r['tflops']:.0f}")
        by[(shape, r.get("variant"), r["name"])].append(r["tflops"])
    names = ["ours dense", "ours state f=1.00", "ours_int8 dense", "ours_int8 state f=1.00"]
    for shape in dict.fromkeys(k[0] for k in by):
        print(f"{shape[0]}x{shape[1]}x{shape[2]}   " + "; ".join(sdpa.get(shape, [])))
        print(f"  {'variant':<12}" + "".join(f"{n:>30}" for n in names))
        variants = list(dict.fromkeys(k[1] for k in by if k[0] == shape))
        base = {n: by.get((shape, "default", n)) for n in names}
        for var in variants:
            if not any(by.get((shape, var, n)) for n in names):
                continue
            cells = []
            for n in names:
                vals = by.get((shape, var, n))
                if not vals:
                    cells.append(f"{'-':>30}")
                    continue
                mean = sum(vals) / len(vals)
                b = base[n]
                ratio = f" {mean / (sum(b) / len(b)):.3f}" if b else ""
                cells.append(f"{mean:7.1f} [{'/'.join(f'{x:.0f}' for x in vals)}]{ratio}".rjust(30))
            print(f"  {str(var):<12}" + "".join(cells))

    # Forced live fractions and the structured case (when the run has them): t / t_dense of the same variant and
    # mode, mean over the repeats.
    forced = sorted({k[2] for k in by if " forced " in k[2] or " structured " in k[2]})
    if forced:
        print("forced fractions, structured: t / t_dense (same variant and mode; mean TFLOP/s over the repeats)")
        for shape in dict.fromkeys(k[0] for k in by):
            for var in dict.fromkeys(k[1] for k in by if k[0] == shape):
                cells = []
                for n in forced:
                    vals = by.get((shape, var, n))
                    dense = by.get((shape, var, n.split(" ")[0] + " dense"))
                    if vals and dense:
                        cells.append(f"{n.replace('forced ', '').replace(' thr=-10', '')} {(sum(dense) / len(dense)) / (sum(vals) / len(vals)):.3f}")
                if cells:
                    print(f"  {shape[0]}x{shape[1]}x{shape[2]} {str(var):<12} " + "; ".join(cells))
