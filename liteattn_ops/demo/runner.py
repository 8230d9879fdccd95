"""The demo's runner: one pipeline, a timed dense run, timed LiteAttention runs, the report.

Public entry points (also used by tools/sweep.py):

    args = liteattn_ops.demo.cli.parse_args([...]); liteattn_ops.demo.cli.validate(args)
    result = run_demo(args)                 # both runs, the report and the frames (DemoResult)

    with DemoRunner(args) as runner:        # or step by step (a threshold sweep):
        dense = runner.dense()              # RunRecord
        lite = runner.lite(threshold=-8.0)  # enables / compiles once; set_threshold + reset after
        ...

What is timed, and how: liteattn_ops.demo.timing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import platform
import sys
from typing import Callable, Optional

import torch

from .errors import DemoError
from .pipelines import SPEED_ONLY_LABEL, make_pipeline
from .quality import json_number, video_quality
from .timing import LiveRecorder, StepTimer, cuda_graphs_info, profile_steps, site_states, synchronize

CPU_NOTE = ("CPU: the LiteAttention op runs its exact reference implementation, which computes every score "
            "(it skips no work), so CPU times do not measure LiteAttention's speed (the GPU kernel skips the "
            "tiles); the live fractions and the quality numbers are the real ones.")


@dataclasses.dataclass
class RunRecord:
    """One timed denoising run."""

    per_step: list[dict]          # {"step", "t", "step_time_s"} (+ live fractions for LiteAttention)
    total_time_s: float           # sum of the step times (device time on CUDA)
    wall_time_s: float            # host wall clock from the loop's start to the end of its device work
    video: torch.Tensor
    profile: Optional[list[dict]] = None  # per profiled step {"kernel_time_s", "attention_time_s"}
    threshold: Optional[object] = None
    final_stats: dict = dataclasses.field(default_factory=dict)  # liteattn_ops.stats after the run

    @property
    def attention_time_s(self) -> Optional[float]:
        return None if not self.profile else sum(r["attention_time_s"] for r in self.profile)

    @property
    def kernel_time_s(self) -> Optional[float]:
        return None if not self.profile else sum(r["kernel_time_s"] for r in self.profile)

    def to_json(self) -> dict:
        out = {"total_time_s": self.total_time_s, "wall_time_s": self.wall_time_s, "per_step": self.per_step,
               "attention_time_s": self.attention_time_s, "profiled_time_s": self.kernel_time_s,
               "profiled_steps": len(self.profile) if self.profile else 0, "profile": self.profile}
        if self.threshold is not None:
            out["threshold"] = self.threshold
        return out


@dataclasses.dataclass
class DemoResult:
    report: dict
    frames_dense: Optional[torch.Tensor]
    frames_lite: Optional[torch.Tensor]


def sdpa_priority(name: str, device: torch.device):
    """Context that makes SDPA try `name` first (falling back to the others when unsupported)."""
    if name == "auto" and device.type != "cuda":
        return contextlib.nullcontext(), "default"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    first = "cudnn" if name == "auto" else name
    if device.type != "cuda":
        # the CPU ignores the priority order: allow only the backend asked for (and math, which
        # runs everything)
        backends = [order[first]] + ([order["math"]] if first != "math" else [])
        return sdpa_kernel(backends), f"{first} only" if first == "math" else f"{first}, else math"
    backends = [order[first]] + [b for k, b in order.items() if k != first]
    try:
        return sdpa_kernel(backends, set_priority=True), f"{first} first"
    except TypeError:  # older torch: no priority order
        return sdpa_kernel(backends), "any"


def _progress(total: int, desc: str, quiet: bool):
    if quiet:
        return contextlib.nullcontext(None)
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, leave=True, file=sys.stderr)


def computed_fractions(per_step: list) -> list:
    """Fraction of tiles each step computed: the live fraction after the previous step (all at step 0)."""
    out, prev = [], 1.0
    for rec in per_step:
        out.append(prev)
        prev = rec["live_fraction"] if rec.get("live_fraction") is not None else prev
    return out


class DemoRunner:
    """Runs the demo's pipeline densely and with LiteAttention, timed alike (see module docstring).

    `args` is a validated namespace (liteattn_ops.demo.cli.validate). Use as a context manager: it
    sets the SDPA backend priority and, on exit, disables LiteAttention on the model."""

    def __init__(self, args):
        self.args = args
        self.device = args.device
        self.notes: list[str] = []
        self.mode = args.mode
        self.compile_mode = getattr(args, "compile_mode", None) or "default"
        self._ctx, self.sdpa_order = sdpa_priority(args.sdpa_backend, args.device)
        self._lite_model = None
        self._dense_model = None
        self.sites: list[str] = []
        self.pipe = None

    # -- lifetime ---------------------------------------------------------------------------
    def __enter__(self) -> "DemoRunner":
        import liteattn_ops

        self._ctx.__enter__()
        try:
            if self.device.type == "cuda" and not liteattn_ops.is_available():
                raise DemoError("--device cuda: liteattn_ops was installed without its CUDA kernel "
                                "(liteattn_ops._C); reinstall with nvcc on PATH, or use --device cpu")
            self.pipe = make_pipeline(self.args)
        except BaseException:
            self._ctx.__exit__(*sys.exc_info())
            raise
        table = getattr(self.args, "threshold_table", None)
        if table is not None:
            self._check_table(table)
        if self.pipe.speed_only:
            self.notes.append(SPEED_ONLY_LABEL)
        if self.device.type == "cpu":
            self.notes.append(CPU_NOTE)
        return self

    def _check_table(self, table) -> None:
        """A calibrated table must fit this model's sites: checked before any run (enable, apply,
        disable; no forward runs)."""
        import liteattn_ops

        try:
            liteattn_ops.enable(self.model, threshold=self.args.threshold)
            try:
                table.apply(self.model, step=0)
            finally:
                liteattn_ops.disable(self.model)
        except ValueError as e:
            self._ctx.__exit__(None, None, None)
            raise DemoError(f"--thresholds {self.args.thresholds}: {e}") from None

    def __exit__(self, *exc):
        import liteattn_ops

        try:
            if self.sites:
                liteattn_ops.disable(self.pipe.model)
                self.sites = []
        finally:
            self._ctx.__exit__(*exc)
        return False

    @property
    def model(self):
        return self.pipe.model

    @property
    def warm_steps(self) -> int:
        if self.mode == "compile":
            return 2 if self.device.type == "cuda" else 1  # compilation is never timed
        return 0 if self.args.no_warmup else 1

    @property
    def cuda_graphs(self) -> bool:
        return self.mode == "compile" and self.device.type == "cuda" and \
            self.compile_mode in ("reduce-overhead", "max-autotune")

    def _before_call(self) -> Optional[Callable[[], None]]:
        # CUDA-graph trees: each model call is a new step (its outputs are consumed before the next)
        return torch.compiler.cudagraph_mark_step_begin if self.cuda_graphs else None

    def _compile(self, backend=None):
        kwargs = {} if self.compile_mode == "default" else {"mode": self.compile_mode}
        if backend is not None:
            kwargs["backend"] = backend
        return torch.compile(self.model, **kwargs)

    def _warm_up(self, run_model, what: str):
        """Untimed warm-up steps (compilation happens here). If compiling fails, fall back to the
        eager model and say so in the notes. Returns the model to time."""
        if not self.warm_steps:
            return run_model
        try:
            with torch.no_grad():
                self.pipe.run(run_model, self.warm_steps, lambda i, t: None, self._before_call())
            return run_model
        except Exception as e:  # noqa: BLE001
            if self.mode != "compile":
                raise
            self.notes.append(f"{what} failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                              "fell back to eager for both runs")
            torch._dynamo.reset()
            self.mode = "eager"
            self.pipe.run(self.model, 1, lambda i, t: None)
            return self.model

    # -- state shapes the dense run mirrors ----------------------------------------------------
    def _state_like(self) -> list[tuple[str, torch.Tensor]]:
        from ..core.state import state_shape

        desc = self.pipe.describe()
        rows = self.args.batch * (2 if getattr(self.args, "guidance", 1.0) != 1.0 and not self.pipe.speed_only else 1)
        shape = state_shape(rows, desc["heads"], self.pipe.tokens, self.pipe.tokens, self.pipe.head_dim,
                            self.pipe.attention_dtype)
        return [(f"layer{i}", torch.empty(shape, dtype=torch.int32, device=self.device))
                for i in range(desc["self_attention_layers"])]

    # -- one timed loop --------------------------------------------------------------------------
    def _timed(self, run_model, recorder: LiveRecorder, desc: str,
               table=None) -> tuple[list[dict], float, float, torch.Tensor]:
        """One timed loop; a `table` with several step ranges is applied step by step (ThresholdTable.stepwise:
        in-place writes, no recompile, read by CUDA-graph replays too)."""
        steps = self.args.steps
        timer = StepTimer(self.device, steps)
        ts: list[float] = []
        with _progress(steps, desc, self.args.quiet) as bar, torch.no_grad():
            def callback(i, t):
                timer.mark()          # an event on the stream (host clock on CPU); no sync
                recorder.record(i)    # device-to-device copies into preallocated rows; no sync
                ts.append(t)
                if bar is not None:
                    bar.update(1)

            before = self._before_call()
            if table is not None:
                callback = table.stepwise(self.model, steps, callback)
            timer.start()
            video = self.pipe.run(run_model, steps, callback, before)
            per_step_s, wall = timer.finish()
        records = [{"step": i, "t": t, "step_time_s": s} for i, (t, s) in enumerate(zip(ts, per_step_s))]
        return records, sum(per_step_s), wall, video

    def _profile(self, run_model, steps: int, table=None):
        if getattr(self.args, "no_profile", False):
            return None
        before = self._before_call()

        def run(cb):
            callback = cb if table is None else table.stepwise(self.model, steps, cb)
            return self.pipe.run(run_model, steps, callback, before)

        with torch.no_grad():
            return profile_steps(run, self.device, steps)

    @property
    def profile_steps(self) -> int:
        # CUDA: every step (the live set, and so the attention time, changes from step to step).
        # CPU: one step (the reference computes every score, so each step costs the same).
        return self.args.steps if self.device.type == "cuda" else 1

    # -- the runs ----------------------------------------------------------------------------
    def dense(self) -> RunRecord:
        """The timed dense run (plain SDPA), then its untimed profiled pass."""
        if self.sites:
            raise RuntimeError("DemoRunner.dense() must run before the first lite() run")
        if self._dense_model is None:
            model = self._compile() if self.mode == "compile" else self.model
            self._dense_model = self._warm_up(model, "torch.compile")
        recorder = LiveRecorder.mirror(self._state_like(), self.args.steps)
        per_step, total, wall, video = self._timed(self._dense_model, recorder, "dense SDPA")
        record = RunRecord(per_step, total, wall, video)
        record.profile = self._profile(self._dense_model, self.profile_steps)
        self._attach_profile(record)
        return record

    def _enable(self, threshold: float, table) -> None:
        import liteattn_ops

        use_int8 = bool(getattr(self.args, "int8", False))
        self.sites = liteattn_ops.enable(self.model, threshold=threshold, use_int8=use_int8)
        if table is not None:
            table.apply(self.model, step=0)
        model = self.model
        if self.mode == "compile":
            from ..compile.dynamo_backend import backend

            model = self._compile(backend(use_int8=use_int8))
        self._lite_model = self._warm_up(model, "torch.compile(backend='liteattn')")

    def lite(self, threshold: Optional[float] = None, table=None) -> RunRecord:
        """A timed LiteAttention run from fresh skip states at `threshold` (or a calibrated
        ThresholdTable), then its untimed profiled pass. The first call routes (and compiles) the
        model; later calls only set the threshold and reset the states (no recompile)."""
        import liteattn_ops

        if threshold is None:
            threshold = self.args.threshold
        if table is None:
            table = getattr(self.args, "threshold_table", None)
        if self._lite_model is None:
            self._enable(threshold, table)
        scheduled = table if table is not None and len(table.schedule) > 1 else None
        if table is not None:
            table.apply(self.model, step=0)
        else:
            liteattn_ops.set_threshold(self.model, threshold)
        liteattn_ops.reset(self.model)
        states = site_states(self.model) or (lambda: site_states(self.model))  # (no warm-up: after step 0)
        recorder = LiveRecorder(states, self.args.steps, seqlen_k=self.pipe.tokens, head_dim=self.pipe.head_dim,
                                dtype=self.pipe.attention_dtype)
        label = "calibrated" if table is not None else f"thr={threshold:g}"
        per_step, total, wall, video = self._timed(self._lite_model, recorder, f"LiteAttention {label}", scheduled)
        # decoded after the run (synchronises; outside the timed region)
        for rec, live in zip(per_step, recorder.decode()):
            rec.update(live)
        for rec, computed in zip(per_step, computed_fractions(per_step)):
            rec["computed_fraction"] = computed
        record = RunRecord(per_step, total, wall, video, threshold=json_number(threshold) if table is None else "table")
        record.final_stats = {name: s for name, s in liteattn_ops.stats(self.model).items()
                              if s["live_fraction"] is not None}
        liteattn_ops.reset(self.model)   # the profiled pass sees the same evolution of the live set
        if scheduled is not None:
            scheduled.apply(self.model, step=0)
        record.profile = self._profile(self._lite_model, self.profile_steps, scheduled)
        self._attach_profile(record)
        return record

    def _attach_profile(self, record: RunRecord) -> None:
        if not record.profile:
            for rec in record.per_step:
                rec["attention_time_s"] = None
            return
        for rec, prof in zip(record.per_step, record.profile):
            rec["attention_time_s"] = prof["attention_time_s"]
            rec["profiled_time_s"] = prof["kernel_time_s"]
        for rec in record.per_step[len(record.profile):]:
            rec["attention_time_s"] = None

    def forced(self, fractions) -> list[dict]:
        """Step time at fixed live fractions: every state set to a random mask with that fraction
        of live tiles in every query-tile row (at least one), threshold -inf so nothing changes.
        Timed with the same StepTimer (no sync inside the loop)."""
        import liteattn_ops
        from ..core.state import pack_bits
        from ..core.tiling import num_tiles, tile_shape
        from ..nn.model import attention_sites
        from ..testing import forced_live

        if self._lite_model is None:
            raise RuntimeError("DemoRunner.forced() needs a lite() run first")
        results = []
        g = torch.Generator().manual_seed(0)
        steps = min(self.args.steps, 3)
        n_tiles = num_tiles(self.pipe.tokens, tile_shape(self.pipe.head_dim, self.pipe.attention_dtype)[1])
        saved = {name: site.threshold for name, site in attention_sites(self.model)}
        liteattn_ops.set_threshold(self.model, -math.inf)
        try:
            for frac in [1.0] + [f for f in fractions if f != 1.0]:
                for _, state in site_states(self.model):
                    mask = forced_live(*state.shape[:3], n_tiles, frac, "balanced", g)
                    state.copy_(pack_bits(mask.to(state.device), fill=False))
                measured = self._live_now()
                timer = StepTimer(self.device, steps)
                with torch.no_grad():
                    timer.start()
                    self.pipe.run(self._lite_model, steps, lambda i, t: timer.mark(), self._before_call())
                    per_step, _ = timer.finish()
                results.append({"live_fraction": frac, "measured_live_fraction": measured,
                                "step_time_s": sum(per_step) / len(per_step), "steps": steps})
        finally:
            liteattn_ops.set_threshold(self.model, saved)
        return results

    def _live_now(self) -> float:
        import liteattn_ops

        values = [s["live_fraction"] for s in liteattn_ops.stats(self.model).values() if s["live_fraction"] is not None]
        return sum(values) / len(values) if values else float("nan")

    # -- the report ----------------------------------------------------------------------------
    def report(self, dense: RunRecord, lite: RunRecord, forced: Optional[list] = None) -> dict:
        import liteattn_ops

        args, pipe, device = self.args, self.pipe, self.device
        lite_json = lite.to_json()
        lite_json["final_live_fraction"] = lite.per_step[-1]["live_fraction"]
        lite_json["mean_computed_fraction"] = sum(r["computed_fraction"] for r in lite.per_step) / len(lite.per_step)
        lite_json["final_per_layer"] = {n: s["live_fraction"] for n, s in lite.final_stats.items()}
        lite_json["final_per_head"] = {n: s["live_fraction_per_head"] for n, s in lite.final_stats.items()}
        lite_json["thresholds_per_layer"] = {n: [json_number(v) for v in s["threshold"]]
                                             for n, s in lite.final_stats.items()}
        lite_json["routed_sites"] = liteattn_ops.format_report(self.model).splitlines()
        graphs = cuda_graphs_info(device, self.compile_mode if self.mode == "compile" else "none")
        cuda = device.type == "cuda"
        report = {
            "preset": pipe.preset,
            "speed_only": pipe.speed_only,
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
            "torch": torch.__version__,
            "liteattn_ops": liteattn_ops.__version__,
            "kernel": "CUDA (liteattn_ops._C)" if cuda else "CPU reference",
            "mode": self.mode,
            "compile_mode": self.compile_mode if self.mode == "compile" else None,
            "mode_requested": args.mode_requested or "default",
            "cuda_graphs": graphs,
            "sdpa_backend": self.sdpa_order,
            "threshold": json_number(args.threshold) if getattr(args, "threshold_table", None) is None else "table",
            "thresholds_file": getattr(args, "thresholds", None),
            "use_int8": bool(getattr(args, "int8", False)),
            "steps": args.steps,
            "warmup_steps": self.warm_steps,
            "frames": args.frames,
            "height": args.height,
            "width": args.width,
            "batch": args.batch,
            "tokens": pipe.tokens,
            "seed": args.seed,
            "guidance": args.guidance,
            "shift": args.shift,
            "model": pipe.describe(),
            "routed_sites": len(self.sites),
            "timing": {
                "step_time": ("CUDA events recorded at step boundaries, no host sync inside the loop"
                              if cuda else "host clock at step boundaries (CPU ops are synchronous)"),
                "live_fractions": "skip states copied on the device after every step into preallocated "
                                  "buffers, decoded after the run (the dense run makes the same copies)",
                "attention_time": ("torch.profiler, separate untimed pass: device time of the kernels launched "
                                   "by attention ops (SDPA and liteattn, self- and cross-attention) vs all "
                                   "kernels of the step" if cuda else
                                   "torch.profiler, separate untimed pass: host time of the attention ops "
                                   "(SDPA and liteattn, self- and cross-attention)"),
                "profiled_steps": len(dense.profile) if dense.profile else 0,
            },
            "dense": dense.to_json(),
            "liteattention": lite_json,
            "speedup": {
                "total": dense.total_time_s / lite.total_time_s,
                "attention": (dense.attention_time_s / lite.attention_time_s)
                if dense.attention_time_s and lite.attention_time_s else None,
                "note": "dense time / LiteAttention time over the timed denoising steps (warm-up excluded); "
                        "attention: over the profiled steps",
            },
            "notes": list(self.notes),
        }
        if dense.attention_time_s and dense.kernel_time_s:
            report["attention_share_dense"] = dense.attention_time_s / dense.kernel_time_s
        if forced:
            report["forced_live_fractions"] = forced
        return report


def run_demo(args) -> DemoResult:
    """The main job: dense run, LiteAttention run (and forced fractions if asked), the report."""
    with DemoRunner(args) as runner:
        dense = runner.dense()
        lite = runner.lite()
        forced = runner.forced(args.forced) if args.forced else None
        report = runner.report(dense, lite, forced)
        frames_dense = runner.pipe.to_frames(dense.video)
        frames_lite = runner.pipe.to_frames(lite.video)
    report["quality"] = video_quality(frames_dense, frames_lite) if frames_dense is not None else None
    return DemoResult(report, frames_dense, frames_lite)
