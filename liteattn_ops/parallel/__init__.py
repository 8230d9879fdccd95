"""Sequence parallelism: LiteAttention under Ulysses (an all-to-all to head shards, attention over
the whole sequence for the rank's heads, an all-to-all back; each rank owns the skip states of its
heads and no state is ever communicated).

    ulysses_attention(q, k, v, site, group=None)   functional form over a LiteAttention `site`
    UlyssesLiteAttention(threshold, group=None)     module form (per-head thresholds of the whole model)
    seq_to_heads / heads_to_seq                     the two exchanges
    check_model / check_module / ulysses_shard      diffusers context parallelism: what LiteAttention
    rank_threshold                                  can run, and this rank's per-head thresholds
"""

from ..routing.context_parallel import check_model, check_module, rank_threshold, ulysses_shard
from .ulysses import UlyssesLiteAttention, group_rank_and_size, heads_to_seq, seq_to_heads, ulysses_attention

__all__ = ["UlyssesLiteAttention", "check_model", "check_module", "group_rank_and_size", "heads_to_seq",
           "rank_threshold", "seq_to_heads", "ulysses_attention", "ulysses_shard"]
