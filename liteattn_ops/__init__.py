"""liteattn_ops: temporal sparse attention for video diffusion transformers on Hopper GPUs.

Public API:
    tile_shape(head_dim, dtype) -> (BM, BN)
    LiteAttention                       eager drop-in for F.scaled_dot_product_attention with a skip state
    reset(model), stats(model), set_threshold(model, value)
    new_state, reset_state, live_mask   the skip-state format (liteattn_ops.state)
    is_available()                      whether the CUDA kernel was built
    torch.ops.liteattn.sparse_attention / torch.ops.liteattn.attention   the custom ops
"""

from . import ops  # registers torch.ops.liteattn.*
from ._extension import is_available, warn_if_gpu_without_kernel
from .module import LiteAttention, attention_sites, reset, set_threshold, stats
from .state import live_mask, new_state, reset_state
from .tiling import supported_head_dims, tile_shape
from .export import (ProgramMismatchError, aoti_compile_and_package, aoti_load_package, check_program, export,
                     exported_states, load, reset_program)

__version__ = "0.1.0"

warn_if_gpu_without_kernel()

__all__ = [
    "LiteAttention", "attention_sites", "is_available", "live_mask", "new_state", "ops", "reset",
    "reset_state", "set_threshold", "stats", "supported_head_dims", "tile_shape",
]
__all__ += [
    "ProgramMismatchError", "aoti_compile_and_package", "aoti_load_package", "check_program", "export",
    "exported_states", "load", "reset_program",
]

# torch.compile backend and eager routing (issue 4)
from . import backend as _backend_module  # noqa: E402  (keeps liteattn_ops.backend:liteattn loadable)
from .backend import backend  # noqa: E402  liteattn_ops.backend(cross=..., fallback=...)
from .enable import AttentionSite, branch, disable, enable, find_attention_modules, format_report, report  # noqa: E402

__all__ += ["AttentionSite", "backend", "branch", "disable", "enable", "find_attention_modules",
            "format_report", "report"]
