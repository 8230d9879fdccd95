"""Calibration: per-site, per-head (optionally per step range) thresholds to an error budget.

    table = liteattn_ops.calibrate(model, run, target_error=0.05)      # two generations
    table.save("thresholds.json"); table = ThresholdTable.load("thresholds.json")
    liteattn_ops.set_threshold(model, table)                           # in place, no recompile

margins.py: the calibration-mode attention (per-tile margins and the error of every candidate
threshold from one pass); calibrate.py: the hooks and the algorithm; table.py: the table and its
file format; criteria.py: the error-aware (softmax mass) criterion, a prototype for comparison;
`python -m liteattn_ops.calibration`: the demo model's table and report.
"""

from .calibrate import CalibrationError, Profile, calibrate, profile
from .margins import CallAnalysis, analyse_call
from .table import ThresholdTable, ThresholdTableError

__all__ = ["CallAnalysis", "CalibrationError", "Profile", "ThresholdTable", "ThresholdTableError", "analyse_call",
           "calibrate", "profile"]
