"""liteattn_ops: temporal sparse attention for video diffusion transformers on Hopper GPUs.

The package is layered; a lower layer never imports a higher one:

    core/       tile table, skip state, exact CPU reference, the torch.library ops, the SDPA
                eligibility predicate, loading of the CUDA kernel (liteattn_ops._C)
    nn/         the eager LiteAttention module and the model-level helpers (reset, stats, ...)
    routing/    enable / disable: route a model's (or a diffusers pipeline's) SDPA calls to sites
    compile/    the graph pass and the "liteattn" torch.compile backend
    deploy/     torch.export programs, .pt2 files, AOTInductor packages
    demo/       the main job (python -m liteattn_ops.demo) and its small video DiT

Public API (README.md has the details):
    the ops          torch.ops.liteattn.sparse_attention (stateful) / torch.ops.liteattn.attention (dense)
    tiles, state     tile_shape, supported_head_dims, new_state, reset_state, live_mask
    eager            LiteAttention, FlashLiteAttention ((B, S, H, D) layout, the original's flat range lists)
    models           enable, disable (a model or a diffusers pipeline), new_video, branch, reset, stats,
                     set_threshold, attention_sites, report, format_report
    torch.compile    backend="liteattn" (entry point), backend(threshold=..., cross=..., fallback=...)
    export           export, load, check_program, exported_states, reset_program,
                     aoti_compile_and_package, aoti_load_package
    build            is_available() (was the CUDA kernel built)

No public function shares its name with a module: `liteattn_ops.export` is the function, its
module is `liteattn_ops.deploy.program`; `liteattn_ops.backend` is the function, its module is
`liteattn_ops.compile.dynamo_backend`; `liteattn_ops.enable` lives in `liteattn_ops.routing.router`
(pipelines: `liteattn_ops.routing.pipelines`).
"""

from .core import ops  # registers torch.ops.liteattn.*
from .core.extension import is_available, warn_if_gpu_without_kernel
from .core.state import live_mask, new_state, reset_state
from .core.tiling import supported_head_dims, tile_shape
from .nn.attention import FlashLiteAttention, LiteAttention
from .nn.model import attention_sites, reset, set_threshold, stats
from .routing.router import AttentionSite, branch, disable, enable, find_attention_modules
from .routing.pipelines import new_video
from .routing.report import format_report, report
from .compile.dynamo_backend import backend
from .deploy.program import (ProgramMismatchError, aoti_compile_and_package, aoti_load_package, check_program,
                             export, exported_states, load, reset_program)
from .calibration import ThresholdTable, calibrate

__version__ = "0.1.0"

warn_if_gpu_without_kernel()

__all__ = [
    "AttentionSite", "FlashLiteAttention", "ThresholdTable", "calibrate", "LiteAttention", "ProgramMismatchError", "aoti_compile_and_package", "aoti_load_package",
    "attention_sites", "backend", "branch", "check_program", "disable", "enable", "export", "exported_states",
    "find_attention_modules", "format_report", "is_available", "live_mask", "load", "new_state", "new_video", "ops", "report",
    "reset", "reset_program", "reset_state", "set_threshold", "stats", "supported_head_dims", "tile_shape",
]
