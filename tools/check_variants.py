"""Correctness of the A/B kernel variants against float32 attention and the default variant's skip decisions.

    python3 tools/check_variants.py default,lazy,bn176      # an A/B build (cmake -DLITEATTN_AB_VARIANTS=...)

A variant the build does not have for a head dim ("not built") is reported and skipped there. Builds with the INT8
kernels also check each variant in the INT8 Q/K mode (against the INT8 emulation, and its skip decisions)."""
import math, os, sys, torch

import liteattn_ops  # noqa: F401  (registers torch.ops.liteattn)
from liteattn_ops.core.state import new_state
from liteattn_ops.testing import local_qkv

variants = sys.argv[1].split(",")
torch.manual_seed(1)
dev = "cuda"
fails = 0

def ref(q, k, v):
    qf, kf, vf = (t.float() for t in (q, k, v))
    s = qf @ kf.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return torch.softmax(s, -1) @ vf, torch.logsumexp(s, -1)

def relerr(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()

def structured_check(variant, d, seed, label, call):
    """Local (3-D grid) inputs, thr -10, 3 calls on one state: the variant's state words must equal the default's
    and its output be within 1e-2 of it. Returns 1 on failure."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (t.to(dev, torch.bfloat16) for t in local_qkv((16, 24, 24), 1, 4, d, generator=g))
    states = {}
    for var in ("default", variant):
        os.environ["LITEATTN_VARIANT"] = var
        st = new_state(1, 4, q.shape[2], k.shape[2], d, torch.bfloat16, dev)
        thr = torch.full((4,), -10.0, device=dev)
        for _ in range(3):
            out, _ = call(q, k, v, st, thr)
        states[var] = (st.clone(), out.float())
    diff = (states["default"][0] != states[variant][0]).sum().item()
    e = relerr(states[variant][1], states["default"][1])
    bad = diff != 0 or e > 1e-2
    print(f"{variant:>18} d{d} {label}: state words differing {diff}, out vs default {e:.2e} {'FAIL' if bad else 'ok'}",
          flush=True)
    return int(bad)

cases = []
for d in (128, 64):
    # (12000, 700): several query tiles per CTA of a persistent grid (564 tiles), a partial last key tile
    for (sq, sk) in ((1000, 1000), (4096, 4096), (333, 2900), (2500, 600), (12000, 700)):
        cases.append((d, sq, sk, "randn"))
    cases.append((d, 3000, 3000, "growing"))   # row max grows by many log2 units over the tiles
    cases.append((d, 3000, 3000, "big"))
for variant in variants:
    built = {}
    for d in (128, 64):
        os.environ["LITEATTN_VARIANT"] = variant
        x = torch.randn(1, 1, 64, d, device=dev, dtype=torch.bfloat16)
        try:
            torch.ops.liteattn.attention(x, x, x)
            built[d] = True
        except (RuntimeError, ValueError) as e:
            if "not built" not in str(e):
                raise
            built[d] = False
            print(f"{variant:>18} d{d}: not built, skipped", flush=True)
    for d, sq, sk, kind in cases:
        if ("bn" in variant and d == 64) or not built[d]:
            continue
        os.environ["LITEATTN_VARIANT"] = variant
        g = torch.Generator(device=dev).manual_seed(hash((variant, d, sq, sk, kind)) % 2**31)
        q = torch.randn(2, 3, sq, d, device=dev, generator=g)
        k = torch.randn(2, 3, sk, d, device=dev, generator=g)
        v = torch.randn(2, 3, sk, d, device=dev, generator=g)
        if kind == "growing":
            k = k * torch.linspace(0.2, 4.0, sk, device=dev)[:, None]
            q = q * 2
        if kind == "big":
            q, k = q * 3, k * 3
        q, k, v = (t.bfloat16() for t in (q, k, v))
        ro, rl = ref(q, k, v)
        out, lse = torch.ops.liteattn.attention(q, k, v)
        e, el = relerr(out, ro), (lse - rl).abs().max().item()
        bad = not (e <= 1e-2 and el <= 1e-2 + 1e-3 * rl.abs().max().item()) or torch.isnan(out).any().item()
        fails += bad
        print(f"{variant:>18} d{d} {sq}x{sk} {kind:>7} dense  out {e:.2e} lse {el:.2e} {'FAIL' if bad else 'ok'}", flush=True)
        if "bn" in variant:
            continue
        st = new_state(2, 3, sq, sk, d, torch.bfloat16, dev)
        thr = torch.full((3,), -8.0, device=dev)
        for _ in range(2):
            out, lse = torch.ops.liteattn.sparse_attention(q, k, v, st, thr)
        e = relerr(out, ro)
        bad = not e <= 1e-2 or torch.isnan(out).any().item()
        fails += bad
        print(f"{variant:>18} d{d} {sq}x{sk} {kind:>7} skip   out {e:.2e} {'FAIL' if bad else 'ok'}", flush=True)
    # structured: decisions identical to the default variant's
    for d in (128, 64):
        if "bn" in variant or not built[d]:
            continue
        fails += structured_check(variant, d, 5, "structured", torch.ops.liteattn.sparse_attention)

# INT8 Q/K mode (builds with the INT8 kernels): dense against the CPU-exact INT8 emulation (run on the GPU, float32
# matmuls without TF32: the int8 dot products stay exact) and against float32; the skip path's decisions on local
# inputs identical to the default variant's.
from liteattn_ops.core.extension import extension
if getattr(extension(), "HAS_INT8", False):
    from liteattn_ops.core import reference
    from liteattn_ops.core.int8_cuda import launch_int8

    torch.backends.cuda.matmul.allow_tf32 = False
    for variant in [v for v in variants if "bn" not in v]:
        for d in (128, 64):
            os.environ["LITEATTN_VARIANT"] = variant
            x = torch.randn(1, 1, 64, d, device=dev, dtype=torch.bfloat16)
            try:
                launch_int8(x, x, x, None, None, None, None, None)
            except (RuntimeError, ValueError) as e:
                if "not built" not in str(e):
                    raise
                print(f"{variant:>18} d{d} int8: not built, skipped", flush=True)
                continue
            for sq, sk in ((1000, 1000), (333, 2900), (12000, 700)):
                g = torch.Generator(device=dev).manual_seed(hash((variant, d, sq, sk, "int8")) % 2**31)
                q, k, v = (torch.randn(2, 3, s_, d, device=dev, generator=g).bfloat16() for s_ in (sq, sk, sk))
                out, lse = launch_int8(q, k, v, None, None, None, None, None)
                emu, _ = reference.attention_reference(q, k, v, use_int8=True)
                e, e32 = relerr(out, emu), relerr(out, ref(q, k, v)[0])
                bad = not (e <= 1e-2 and e32 <= 2e-2) or torch.isnan(out).any().item()
                fails += bad
                print(f"{variant:>18} d{d} {sq}x{sk} int8 dense  out vs emulation {e:.2e} vs float32 {e32:.2e} "
                      f"{'FAIL' if bad else 'ok'}", flush=True)
            fails += structured_check(variant, d, 6, "int8 structured",
                                      lambda q, k, v, st, thr: launch_int8(q, k, v, st, thr, None, None, None))
os.environ.pop("LITEATTN_VARIANT", None)
print("CHECK FAILURES:", fails)
