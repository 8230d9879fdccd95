"""The main job: `python -m liteattn_ops.demo` samples a video twice (dense vs LiteAttention) and
reports speed and quality. Needs the demo extra: pip install "liteattn_ops[demo]".

Modules: cli (arguments, validation, main), pipelines (the models and their denoising loops),
timing (how the runs are timed), quality (PSNR/SSIM), outputs (report, plot, GIF, summary),
runner (DemoRunner and run_demo: the public entry points, also used by tools/sweep.py).
"""

from .cli import main, parse_args, validate
from .errors import DemoError
from .runner import DemoResult, DemoRunner, RunRecord, run_demo

__all__ = ["DemoError", "DemoResult", "DemoRunner", "RunRecord", "main", "parse_args", "run_demo", "validate"]
