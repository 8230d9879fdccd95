"""Does the test suite catch the bugs it is meant to catch? Apply each deliberate bug (a mutation)
to a temporary copy of the repository, one at a time, run the tests that should catch it, report.

    python tools/mutate.py                 # every mutation (CPU; several minutes on 2 cores)
    python tools/mutate.py --list          # what each mutation does and which tests run
    python tools/mutate.py --only bit-layout-reversed --only load-imports-diffusers
    python tools/mutate.py --no-baseline   # skip the unmutated run of each mutation's tests
    python tools/mutate.py --source DIR    # mutate a copy of another checkout (default: this one)

The working tree is never modified: the package, tests and tools are copied into a temporary
directory, the mutation is a text replacement there (it must match exactly once, so a mutation
that no longer applies is reported, not silently skipped), and pytest runs in a subprocess whose
imports resolve to that copy (an editable install's import hook is bypassed). For each mutation
the same tests first run unmutated (baseline: they must pass, else "caught" would mean nothing).
Exit code 0 only when every mutation is caught.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("liteattn_ops", "tests", "tools", "pyproject.toml", "README.md")


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str          # the bug, in words
    path: str          # file to change, relative to the repository root
    old: str           # exact text (must occur once)
    new: str
    tests: tuple[str, ...]   # pytest arguments (node ids / -k expressions)


MUTATIONS = [
    Mutation("must-skip-wins", "must-skip wins over must-do (a tile in both is not visited)",
             "liteattn_ops/core/reference.py",
             "skip_tiles = range_tiles(must_skip, seqlen_k, block_n, inside=True).to(device) & ~do_tiles",
             "skip_tiles = range_tiles(must_skip, seqlen_k, block_n, inside=True).to(device)",
             ("tests/test_reference.py::test_must_do_wins_over_must_skip",)),
    Mutation("bit-layout-reversed", "the state's bit layout reversed in both pack and unpack (bit 31 - n % 32)",
             "liteattn_ops/core/state.py",
             "    shifts = torch.arange(_BITS, dtype=torch.int32, device=words.device)\n",
             "    shifts = torch.arange(_BITS - 1, -1, -1, dtype=torch.int32, device=words.device)\n",
             ("tests/test_state.py::test_documented_bit_layout",)),
    Mutation("load-imports-diffusers", "liteattn_ops.load() imports diffusers",
             "liteattn_ops/deploy/program.py",
             "    ep = torch.export.load(f, **kwargs)\n",
             "    import diffusers  # noqa: F401\n    ep = torch.export.load(f, **kwargs)\n",
             ("tests/test_export.py::test_save_load_in_fresh_process",)),
    Mutation("threshold-too-loose", "tiles up to twice the threshold dropped (thr / 2 compared)",
             "liteattn_ops/core/reference.py",
             "((in_order - before) <= thr)",
             "((in_order - before) <= thr / 2)",
             ("tests/test_op.py::test_denoising_loop_on_structured_inputs",)),
    Mutation("lse-missing-tile", "the LSE of every row is off by log(32/31), one of 32 equal key tiles missing",
             "liteattn_ops/core/reference.py",
             "lse[:, :, row0:row1] = (row_max + torch.log(row_sum))",
             "lse[:, :, row0:row1] = (row_max + torch.log(row_sum * 31 / 32))",
             ("tests/test_reference.py::test_dense_equals_sdpa", "tests/test_op.py::test_thr_minus_inf_equals_sdpa")),
    Mutation("lse-check-loose", "the LSE comparison's tolerance loosened to 5e-2 (what lets a missing tile pass)",
             "liteattn_ops/testing.py",
             "def assert_lse_close(lse: torch.Tensor, expected: torch.Tensor, atol: float = 5e-3) -> None:",
             "def assert_lse_close(lse: torch.Tensor, expected: torch.Tensor, atol: float = 5e-2) -> None:",
             ("tests/test_reference.py::test_lse_check_catches_one_missing_tile_of_32",)),
    Mutation("literal-cases-remove-nothing", "the literal cases use threshold -inf only (they could never see a removal bug)",
             "tests/test_reference.py",
             "threshold = torch.tensor([-1.0, -4.0]) if case % 4 else torch.tensor([-math.inf, -2.0])",
             "threshold = torch.full((2,), -math.inf)",
             ("tests/test_reference.py::test_literal_cases_remove_tiles",)),   # run alone: it must not skip
    Mutation("non-finite-rule-missing", "an inf score makes every later tile negligible (no non-finite rule)",
             "liteattn_ops/core/reference.py",
             "torch.isfinite(in_order) & torch.isfinite(before) & ((in_order - before) <= thr)",
             "((in_order - before) <= thr)",
             ("tests/test_op.py::test_infinite_key_removes_no_tiles_for_good",
              "tests/test_reference.py::test_non_finite_scores_never_make_a_tile_negligible")),
    Mutation("load-keeps-evolved-states", "liteattn_ops.load keeps the skip states saved after a run",
             "liteattn_ops/deploy/program.py",
             "    for state in states.values():\n        reset_state(state)\n    return ep\n",
             "    return ep\n",
             ("tests/test_export.py::test_load_gives_fresh_states",)),
    Mutation("export-drops-must-skip", "export(..., must_skip=...) silently drops must_skip",
             "liteattn_ops/deploy/program.py",
             "        enable(model, **enable_options)\n",
             "        enable(model, **{k: v for k, v in enable_options.items() if k != 'must_skip'})\n",
             ("tests/test_export.py::test_export_must_do_must_skip_threshold_reach_the_sites",)),
    Mutation("export-ignores-strict", "export(..., strict=True) exports non-strict",
             "liteattn_ops/deploy/program.py",
             "dynamic_shapes=dynamic_shapes, strict=strict, **options)",
             "dynamic_shapes=dynamic_shapes, strict=False, **options)",
             ("tests/test_export.py::test_export_strict_mode",)),
    Mutation("aoti-runner-unchecked", "the AOTInductor runner does not check its inputs",
             "liteattn_ops/deploy/program.py",
             "        self._check_inputs(args, kwargs)\n        return self.compiled(*args, **kwargs)",
             "        return self.compiled(*args, **kwargs)",
             ("tests/test_export.py::test_aoti_package_runs_op_and_keeps_state",)),
    Mutation("ranges-truncate-fractions", "must_do=[(0.5, 10)] silently truncated to (0, 10)",
             "liteattn_ops/core/params.py",
             "        if not bool(torch.isfinite(t).all()) or bool((t != t.round()).any()):",
             "        if not bool(torch.isfinite(t).all()):",
             ("tests/test_params.py",)),
    Mutation("threshold-accepts-2d", "a 2-D threshold tensor silently flattened",
             "liteattn_ops/core/params.py",
             "        if tensor.dim() > 1:",
             "        if False:",
             ("tests/test_params.py",)),
    Mutation("op-argument-types-unchecked", "liteattn_ops.ops.sparse_attention passes non-tensors to the dispatcher",
             "liteattn_ops/core/ops.py",
             "    _check_argument_types(dict(q=q, k=k, v=v, state=state, threshold=threshold, must_do=must_do,",
             "    (dict(q=q, k=k, v=v, state=state, threshold=threshold, must_do=must_do,",
             ("tests/test_op.py::test_non_tensor_arguments_raise_type_error",)),
    Mutation("live-mask-unchecked", "live_mask decodes a state for any seqlen_k",
             "liteattn_ops/core/state.py",
             "        ValueError, seqlen_k >= 1 and words == state.shape[-1],",
             "        ValueError, True,",
             ("tests/test_state.py::test_live_mask_checks_its_arguments_against_the_state",)),
    Mutation("visit-order-from-zero", "every query tile visits its KV tiles from tile 0 (not the diagonal)",
             "liteattn_ops/core/reference.py",
             "    order = (first_tile(block_m, block_n, seqlen_q, seqlen_k, device)[:, None]",
             "    order = (0 * first_tile(block_m, block_n, seqlen_q, seqlen_k, device)[:, None]",
             ("tests/test_fuzz.py::test_op_matches_the_literal_semantics_over_calls",)),
    Mutation("bits-past-end-cleared", "the op clears the don't-care bits >= Nt of each state word",
             "liteattn_ops/core/reference.py",
             "    cleared = pack_bits(negligible | skip_tiles, fill=False)",
             "    cleared = pack_bits(negligible | skip_tiles, fill=True)",
             ("tests/test_fuzz.py::test_op_matches_the_literal_semantics_over_calls",)),
    Mutation("calibration-no-resync", "the calibration keeps its own prediction of a site's live set after each call "
             "instead of the op's state (a 16-bit kernel's different decision then derails it)",
             "liteattn_ops/calibration/calibrate.py",
             "        site.shadows[pending.key] = self._resync(site, pending)",
             "        site.shadows[pending.key] = pending.new_live",
             ("tests/test_calibration.py::test_shadow_state_follows_the_op_where_its_decisions_differ",)),
]

_SITE = '''import sys
# Resolve liteattn_ops to this copy: drop import hooks (e.g. an editable install's redirect) that
# would find it elsewhere.
_here = {here!r}
def _elsewhere(finder):
    try:
        spec = finder.find_spec("liteattn_ops", None)
    except Exception:
        return False
    return spec is not None and spec.origin is not None and not spec.origin.startswith(_here)
sys.meta_path[:] = [f for f in sys.meta_path if not (hasattr(f, "find_spec") and _elsewhere(f))]
'''


def make_copy(source: Path, dest: Path) -> None:
    for name in COPIED:
        src = source / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.so", "out"))
        elif src.exists():
            shutil.copy2(src, dest / name)
    site = dest / "_mutate_site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_SITE.format(here=str(dest)))


def run_tests(copy: Path, tests, timeout: int) -> tuple[int, float, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(copy / "_mutate_site"), str(copy)] +
                                        ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("LITEATTN_FUZZ_EXAMPLES", "25")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "not cuda", *tests]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, time.perf_counter() - start, "timeout"
    tail = (proc.stdout + proc.stderr).strip().splitlines()
    return proc.returncode, time.perf_counter() - start, tail[-1] if tail else ""


def check_imports_resolve_to(copy: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(copy / "_mutate_site"), str(copy)]))
    out = subprocess.run([sys.executable, "-c", "import liteattn_ops; print(liteattn_ops.__file__)"], cwd=copy,
                         env=env, capture_output=True, text=True)
    if not out.stdout.strip().startswith(str(copy)):
        raise SystemExit(f"mutate: the copy's liteattn_ops is not the one imported ({out.stdout.strip()!r} "
                         f"{out.stderr.strip()[-500:]})")


def apply(copy: Path, m: Mutation) -> None:
    path = copy / m.path
    text = path.read_text()
    count = text.count(m.old)
    if count != 1:
        raise ValueError(f"the text to mutate occurs {count} times in {m.path} (the source changed?)")
    path.write_text(text.replace(m.old, m.new))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", default=[], help="run only this mutation (repeatable)")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per pytest run")
    parser.add_argument("--source", type=Path, default=ROOT, help="the tree to copy (default: this checkout)")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    unknown = set(args.only) - {m.name for m in MUTATIONS}
    if unknown:
        parser.error(f"unknown mutations {sorted(unknown)}; see --list")
    if args.list:
        for m in chosen:
            print(f"{m.name}: {m.what}\n    {m.path}; tests: {' '.join(m.tests)}")
        return 0

    rows = []
    with tempfile.TemporaryDirectory(prefix="liteattn_mutate_") as tmp:
        base = Path(tmp) / "base"
        base.mkdir()
        make_copy(args.source.resolve(), base)
        check_imports_resolve_to(base)
        for m in chosen:
            work = Path(tmp) / m.name
            shutil.copytree(base, work)
            # The site hook names the directory it lives in.
            (work / "_mutate_site" / "sitecustomize.py").write_text(_SITE.format(here=str(work)))
            baseline = "skipped"
            if not args.no_baseline:
                rc, _, tail = run_tests(work, m.tests, args.timeout)
                baseline = "pass" if rc == 0 else f"FAIL ({tail})"
            try:
                apply(work, m)
            except ValueError as e:
                rows.append((m.name, baseline, f"NOT APPLIED: {e}", 0.0))
                print(f"{m.name}: not applied: {e}", flush=True)
                continue
            rc, seconds, tail = run_tests(work, m.tests, args.timeout)
            if rc == 0:
                result = "NOT CAUGHT"
            elif rc == 1:
                result = "caught"
            else:
                result = f"error (pytest exit {rc}: {tail})"
            rows.append((m.name, baseline, result, seconds))
            print(f"{m.name}: baseline {baseline}; mutated: {result} ({seconds:.0f} s; {tail})", flush=True)
            shutil.rmtree(work, ignore_errors=True)

    width = max(len(r[0]) for r in rows)
    print(f"\n| {'mutation':<{width}} | baseline | result |")
    print(f"|{'-' * (width + 2)}|----------|--------|")
    for name, baseline, result, _ in rows:
        print(f"| {name:<{width}} | {baseline} | {result} |")
    caught = sum(r[2] == "caught" for r in rows)
    clean = all(r[1] in ("pass", "skipped") for r in rows)
    print(f"\n{caught} of {len(rows)} mutations caught" + ("" if clean else "; some baselines failed"))
    return 0 if caught == len(rows) and clean else 1


if __name__ == "__main__":
    sys.exit(main())
