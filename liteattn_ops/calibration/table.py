"""ThresholdTable: calibrated thresholds per attention site, per head and per step range, with what
they were calibrated on and what was measured; saved as human-readable JSON or TOML.

File format (version 1), JSON shown (TOML holds the same keys; -inf is the string "-inf" in JSON
and the TOML float -inf):

    {
      "format": "liteattn_ops.threshold_table",
      "version": 1,
      "model": "liteattn_ops.demo.models.dit.VideoDiT",      # class of the calibrated model
      "metric": "l1", "target_error": 0.05, "granularity": "head",
      "schedule": [[0, 5], [5, null]],      # step ranges [start, end); null: to the last step
      "calibration": {...},                 # passes, wall time, steps, safety factor, grid
      "sites": {
        "blocks.0.self_attn.liteattn": {
          "heads": 4,
          "thresholds": [[-7.5, "-inf", -12.25, -9.0], [...]],   # per range, per head (log2 units)
          "shapes": [[1, 4, 2048, 2048, 64, "float32"]],
          "calls": [20, ...],               # calibrated calls per range
          "error": [0.041, ...],            # largest per-call error of the site per range (last pass)
          "error_per_head": [[...], ...],   # the same per head
          "error_mean": [0.012, ...],       # mean per-call error of the site per range (last pass)
          "live_fraction": 0.31,            # live tiles after the last calibrated call
          "live_fraction_per_head": [...]
        },
        "blocks.0.cross_attn.liteattn": {"heads": null, "thresholds": null, ...}   # never calibrated
      }
    }

With granularity "layer" each range holds one value, applied to every head. A site with
`thresholds: null` had no call the calibration could use (e.g. cross-attention left to SDPA);
applying the table leaves its threshold as it is. A threshold is <= 0 in log2 units: a visited KV
tile is removed when every row's max is at least |threshold| log2 units below the running max.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

from torch import nn

FORMAT = "liteattn_ops.threshold_table"
VERSION = 1
_COMPILED_PREFIX = "_orig_mod."


class ThresholdTableError(ValueError):
    """A threshold table that is malformed or does not fit the model it is applied to."""


@dataclass
class SiteEntry:
    heads: Optional[int]
    thresholds: Optional[list[list[float]]]        # [range][head] (granularity "layer": one value per range)
    shapes: list[list] = field(default_factory=list)
    calls: list[int] = field(default_factory=list)
    error: Optional[list[float]] = None
    error_per_head: Optional[list[list[float]]] = None
    live_fraction: Optional[float] = None
    live_fraction_per_head: Optional[list[float]] = None
    error_mean: Optional[list[float]] = None       # per range: mean per-call error of the site (last pass)


def _model_name(model) -> str:
    model = getattr(model, "_orig_mod", model)
    cls = type(model)
    return f"{cls.__module__}.{cls.__qualname__}"


def _plain_name(name: str) -> str:
    """Site name without the torch.compile wrapper's prefix."""
    while name.startswith(_COMPILED_PREFIX):
        name = name[len(_COMPILED_PREFIX):]
    return name


@dataclass
class ThresholdTable:
    """Calibrated thresholds (see the module docstring for the file format).

    `liteattn_ops.set_threshold(model, table)` applies it in place (no recompile under
    torch.compile); with a schedule of several step ranges use `table.apply(model, step=i)` at
    the start of each step (or `set_threshold(model, table.for_step(i))`).
    """

    sites: dict[str, SiteEntry]
    model: str
    metric: str
    target_error: float
    granularity: str
    schedule: list[list[Optional[int]]]
    calibration: dict = field(default_factory=dict)
    version: int = VERSION

    # -- lookup -------------------------------------------------------------------------------
    def range_index(self, step: int) -> int:
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        for i, (start, end) in enumerate(self.schedule):
            if start <= step and (end is None or step < end):
                return i
        raise ValueError(f"step {step} is in no range of the table's schedule {self.schedule}")

    def for_step(self, step: int = 0) -> dict[str, Union[float, list[float]]]:
        """{site name: threshold (a float, or one value per head)} for `step`, for every calibrated
        site; a mapping that `liteattn_ops.set_threshold(model, mapping)` accepts."""
        r = self.range_index(step)
        out = {}
        for name, entry in self.sites.items():
            if entry.thresholds is not None:
                values = entry.thresholds[r]
                out[name] = values[0] if self.granularity == "layer" else list(values)
        return out

    # -- validation ---------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ThresholdTableError (naming the site) when the table is malformed."""
        if self.version != VERSION:
            raise ThresholdTableError(f"threshold table version {self.version!r} is not supported (this liteattn_ops "
                                      f"reads version {VERSION}); recalibrate with liteattn_ops.calibrate")
        if self.granularity not in ("head", "layer"):
            raise ThresholdTableError(f"granularity must be 'head' or 'layer', got {self.granularity!r}")
        if not self.schedule:
            raise ThresholdTableError("schedule must hold at least one step range")
        expect = 0
        for i, rng in enumerate(self.schedule):
            if not (isinstance(rng, (list, tuple)) and len(rng) == 2):
                raise ThresholdTableError(f"schedule[{i}] must be [start, end], got {rng!r}")
            start, end = rng
            last = i == len(self.schedule) - 1
            if start != expect or (end is None) != last or (end is not None and end <= start):
                raise ThresholdTableError(f"schedule must be consecutive step ranges [0, a], [a, b], ..., [z, null]; "
                                          f"got {self.schedule}")
            expect = end
        for name, entry in self.sites.items():
            if entry.thresholds is None:
                continue
            where = f"site {name!r}"
            if len(entry.thresholds) != len(self.schedule):
                raise ThresholdTableError(f"{where}: {len(entry.thresholds)} threshold ranges but the schedule has "
                                          f"{len(self.schedule)}")
            width = 1 if self.granularity == "layer" else entry.heads
            if not isinstance(width, int) or width < 1:
                raise ThresholdTableError(f"{where}: heads must be a positive int, got {entry.heads!r}")
            for r, values in enumerate(entry.thresholds):
                if len(values) != width:
                    raise ThresholdTableError(f"{where}, range {r}: {len(values)} thresholds, expected {width} "
                                              f"({'one per layer' if width == 1 else f'one per head, {width} heads'})")
                for h, x in enumerate(values):
                    if not isinstance(x, (int, float)) or math.isnan(x) or x > 0:
                        raise ThresholdTableError(f"{where}, range {r}, head {h}: threshold must be a number <= 0 "
                                                  f"(log2 units, -inf never skips), got {x!r}")

    def _site_heads(self, module) -> Optional[int]:
        buffer = getattr(module, "threshold_per_head", None)
        return None if buffer is None else int(buffer.shape[0])

    def stepwise(self, model, steps: int,
                 callback: Optional[Callable[[int, float], None]] = None) -> Callable[[int, float], None]:
        """A per-step callback(i, t) for a denoising loop of `steps` steps and a table with a schedule:
        calls `callback` (if any), then applies the thresholds of step i + 1 (none after the last
        step). Apply step 0's before the loop
        (`table.apply(model, step=0)`). Each application writes the sites' threshold buffers in place (no
        recompile; CUDA-graph replays read them) from host memory, which synchronises with the device."""

        def after_step(i: int, t: float) -> None:
            if callback is not None:
                callback(i, t)
            if i + 1 < steps:
                self.apply(model, step=i + 1)

        return after_step

    def apply(self, model, step: Optional[int] = None) -> None:
        """Set the thresholds of every site of `model` from this table (in place; no recompile).
        `step` picks the step range; it may be left out only for a table with one range. Checks
        everything first: on an error nothing changes."""
        from ..nn.model import attention_sites

        self.validate()
        if self.calibration.get("criterion", "max") != "max":
            raise ThresholdTableError(f"this table was calibrated for the {self.calibration['criterion']!r} criterion, a "
                                      "prototype the op does not implement (it applies only max-test tables)")
        if step is None:
            if len(self.schedule) > 1:
                raise ThresholdTableError(
                    f"this table has per-step thresholds (schedule {self.schedule}): call table.apply(model, step=i) "
                    "or liteattn_ops.set_threshold(model, table.for_step(i)) at the start of each step")
            step = 0
        if _model_name(model) != self.model:
            raise ThresholdTableError(f"this threshold table was calibrated on {self.model}, not on {_model_name(model)}; "
                                      "calibrate this model with liteattn_ops.calibrate")
        sites = {_plain_name(name): module for name, module in attention_sites(model)}
        for name in self.sites:
            if name not in sites:
                raise ThresholdTableError(f"site {name!r} of the table is not an attention site of this "
                                          f"{type(getattr(model, '_orig_mod', model)).__name__} (its sites: "
                                          f"{sorted(sites)[:6]}{' ...' if len(sites) > 6 else ''})")
        for name in sites:
            if name not in self.sites:
                raise ThresholdTableError(f"attention site {name!r} of the model has no entry in the table "
                                          "(a table of another model, or the model was routed differently)")
        values = self.for_step(step)
        for name, value in values.items():
            heads = self._site_heads(sites[name])
            entry = self.sites[name]
            if heads is not None and self.granularity == "head" and heads != entry.heads:
                raise ThresholdTableError(f"site {name!r}: the table has {entry.heads} heads but the model's site "
                                          f"runs {heads} heads")
        previous = {name: sites[name].threshold for name in values}
        try:
            for name, value in values.items():
                sites[name].threshold = value
        except ValueError as e:
            for name, old in previous.items():
                sites[name].threshold = old
            raise ThresholdTableError(f"site {name!r}: {e}") from None

    # liteattn_ops.set_threshold(model, table) calls this (nn/ cannot import calibration/).
    def _liteattn_apply(self, model) -> None:
        self.apply(model)

    # -- files --------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        sites = {}
        for name, e in self.sites.items():
            sites[name] = {
                "heads": e.heads,
                "thresholds": None if e.thresholds is None else [[_enc(x) for x in r] for r in e.thresholds],
                "shapes": [list(s) for s in e.shapes], "calls": list(e.calls),
                "error": e.error, "error_per_head": e.error_per_head,
                "live_fraction": e.live_fraction, "live_fraction_per_head": e.live_fraction_per_head,
                "error_mean": e.error_mean,
            }
        return {"format": FORMAT, "version": self.version, "model": self.model, "metric": self.metric,
                "target_error": self.target_error, "granularity": self.granularity,
                "schedule": [list(r) for r in self.schedule], "calibration": dict(self.calibration), "sites": sites}

    @classmethod
    def from_dict(cls, data: dict) -> "ThresholdTable":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ThresholdTableError(f"not a liteattn_ops threshold table (expected \"format\": \"{FORMAT}\")")
        version = data.get("version")
        if version != VERSION:
            raise ThresholdTableError(f"threshold table version {version!r} is not supported (this liteattn_ops reads "
                                      f"version {VERSION}); recalibrate with liteattn_ops.calibrate")
        try:
            sites = {}
            for name, e in data["sites"].items():
                thr = e.get("thresholds")
                try:
                    thr = None if thr is None else [[_dec(x) for x in r] for r in thr]
                except (TypeError, ValueError) as err:
                    raise ThresholdTableError(f"site {name!r}: thresholds must be numbers or \"-inf\" ({err})") from None
                sites[name] = SiteEntry(
                    heads=e.get("heads"), thresholds=thr, shapes=[list(s) for s in e.get("shapes", [])],
                    calls=list(e.get("calls", [])), error=e.get("error"), error_per_head=e.get("error_per_head"),
                    live_fraction=e.get("live_fraction"), live_fraction_per_head=e.get("live_fraction_per_head"),
                    error_mean=e.get("error_mean"))
            schedule = [[r[0], r[1]] for r in data["schedule"]]
            table = cls(sites=sites, model=data["model"], metric=data["metric"],
                        target_error=float(data["target_error"]), granularity=data["granularity"],
                        schedule=schedule, calibration=dict(data.get("calibration", {})), version=version)
        except (KeyError, TypeError, IndexError, AttributeError) as err:
            raise ThresholdTableError(f"malformed threshold table: {type(err).__name__}: {err}") from None
        table.validate()
        return table

    def save(self, path) -> Path:
        """Write the table as JSON (or TOML when the name ends in .toml); returns the path."""
        path = Path(path)
        self.validate()
        text = _to_toml(self.to_dict()) if path.suffix == ".toml" else json.dumps(self.to_dict(), indent=1) + "\n"
        path.write_text(text)
        return path

    @classmethod
    def load(cls, path) -> "ThresholdTable":
        """Read a table written by `save` (JSON, or TOML for a .toml file); checks it."""
        path = Path(path)
        text = path.read_text()
        if path.suffix == ".toml":
            import tomllib

            try:
                data = _from_toml(tomllib.loads(text))
            except tomllib.TOMLDecodeError as e:
                raise ThresholdTableError(f"{path}: not valid TOML: {e}") from None
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise ThresholdTableError(f"{path}: not valid JSON: {e}") from None
        return cls.from_dict(data)


def _enc(x: float):
    return "-inf" if x == -math.inf else x


def _dec(x) -> float:
    if isinstance(x, str):
        if x.strip() != "-inf":
            raise ValueError(f"got the string {x!r}")
        return -math.inf
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"got {type(x).__name__}")
    return float(x)


# -- TOML (the subset this table needs: TOML has no null, so None values are left out) -----------

def _toml_value(x) -> str:
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, str):
        return "-inf" if x == "-inf" else json.dumps(x)
    if isinstance(x, float):
        return "-inf" if x == -math.inf else "inf" if x == math.inf else repr(x)
    if isinstance(x, int):
        return str(x)
    if isinstance(x, (list, tuple)):
        return "[" + ", ".join("nan" if v is None else _toml_value(v) for v in x) + "]"
    raise TypeError(f"cannot write {type(x).__name__} to TOML")


def _to_toml(data: dict) -> str:
    lines = []
    head = {k: v for k, v in data.items() if k not in ("calibration", "sites") and v is not None}
    for k, v in head.items():
        if k == "schedule":   # a null end becomes -1 in TOML
            v = [[s, -1 if e is None else e] for s, e in v]
        lines.append(f"{k} = {_toml_value(v)}")
    lines.append("\n[calibration]")
    for k, v in data["calibration"].items():
        if v is not None and not isinstance(v, dict):
            lines.append(f"{k} = {_toml_value(v)}")
    for name, entry in data["sites"].items():
        lines.append(f"\n[sites.{json.dumps(name)}]")
        for k, v in entry.items():
            if v is not None:
                lines.append(f"{k} = {_toml_value(v)}")
    return "\n".join(lines) + "\n"


def _from_toml(data: dict) -> dict:
    data = dict(data)
    if "schedule" in data:
        data["schedule"] = [[s, None if e == -1 else e] for s, e in data["schedule"]]
    sites = {}
    for name, entry in data.get("sites", {}).items():
        entry = dict(entry)
        for key in ("heads", "thresholds", "error", "error_per_head", "live_fraction", "live_fraction_per_head",
                    "error_mean"):
            entry.setdefault(key, None)
        sites[name] = entry
    data["sites"] = sites
    return data
