"""The routing layer: liteattn_ops.enable / disable route the SDPA calls of a model to sites
that own its skip states."""
