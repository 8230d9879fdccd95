"""liteattn_ops: temporal sparse attention for video diffusion transformers on Hopper GPUs.

Public API (README.md has the details):
    the ops          torch.ops.liteattn.sparse_attention (stateful) / torch.ops.liteattn.attention (dense)
    tiles, state     tile_shape, supported_head_dims, new_state, reset_state, live_mask
    eager            LiteAttention, enable, disable, branch, reset, stats, set_threshold, report, format_report
    torch.compile    backend="liteattn" (entry point), backend(threshold=..., cross=..., fallback=...)
    export           export, load, check_program, exported_states, reset_program,
                     aoti_compile_and_package, aoti_load_package
    build            is_available() (was the CUDA kernel built)

Note: `backend`, `enable` and `export` name the functions; their modules stay importable as
`liteattn_ops.backend` etc. through `import liteattn_ops.backend` / `from liteattn_ops.enable import ...`.
"""

from . import ops  # registers torch.ops.liteattn.*
from ._extension import is_available, warn_if_gpu_without_kernel
from .backend import backend
from .enable import AttentionSite, branch, disable, enable, find_attention_modules, format_report, report
from .export import (ProgramMismatchError, aoti_compile_and_package, aoti_load_package, check_program, export,
                     exported_states, load, reset_program)
from .module import LiteAttention, attention_sites, reset, set_threshold, stats
from .state import live_mask, new_state, reset_state
from .tiling import supported_head_dims, tile_shape

__version__ = "0.1.0"

warn_if_gpu_without_kernel()

__all__ = [
    "AttentionSite", "LiteAttention", "ProgramMismatchError", "aoti_compile_and_package", "aoti_load_package",
    "attention_sites", "backend", "branch", "check_program", "disable", "enable", "export", "exported_states",
    "find_attention_modules", "format_report", "is_available", "live_mask", "load", "new_state", "ops", "report",
    "reset", "reset_program", "reset_state", "set_threshold", "stats", "supported_head_dims", "tile_shape",
]
