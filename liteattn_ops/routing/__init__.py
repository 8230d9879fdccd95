"""The routing layer: liteattn_ops.enable / disable route the SDPA calls of a model (or of a
diffusers pipeline's transformers) to sites that own its skip states.

    router.py     enable / disable / branch / routed_sites / find_attention_modules
    sites.py      AttentionSite (a LiteAttention), role groups, the routing TorchFunctionMode
    pipelines.py  diffusers pipelines: the per-call fresh states, cache_context branches, new_video
    dispatch.py   diffusers' attention dispatcher: which sites another backend bypasses
    report.py     report / format_report
"""
