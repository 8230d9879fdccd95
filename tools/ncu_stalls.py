"""Summarise an ncu source-page CSV (`ncu -i R --page source --csv --print-source sass`): the warp-stall totals and
the top instructions by samples. `python3 tools/ncu_stalls.py FILE.csv[.gz] [TOP]`."""
import csv, gzip, sys, collections
path = sys.argv[1]
top = int(sys.argv[2]) if len(sys.argv) > 2 else 25
f = gzip.open(path, "rt") if path.endswith(".gz") else open(path)
rows = list(csv.reader(f))
hdr_i = next(i for i, r in enumerate(rows) if r and r[0] == "Address")
hdr = rows[hdr_i]
data = [r for r in rows[hdr_i + 1:] if len(r) == len(hdr)]
col = {h: i for i, h in enumerate(hdr)}
stall_cols = [h for h in hdr if h.startswith("stall_") and "Not Issued" not in h]
tot = collections.Counter()
for r in data:
    for h in stall_cols:
        tot[h] += int(r[col[h]] or 0)
S = sum(tot.values())
print(f"samples {S}  instructions executed {sum(int(r[col['Instructions Executed']] or 0) for r in data)}")
print("  " + ", ".join(f"{h[6:]} {100*v/S:.1f}%" for h, v in tot.most_common() if v))
data2 = sorted(enumerate(data), key=lambda x: -int(x[1][col['# Samples']] or 0))
print(f"top {top} instructions (index, samples %, top stalls, sass):")
for i, r in data2[:top]:
    n = int(r[col['# Samples']] or 0)
    st = sorted(((int(r[col[h]] or 0), h[6:]) for h in stall_cols), reverse=True)[:3]
    print(f"  {i:5d} {100*n/S:5.2f}%  " + " ".join(f"{s}:{100*v/max(n,1):.0f}" for v, s in st if v) + "  " + r[col['Source']].strip()[:70])
