"""The main job: `python -m liteattn_ops.demo` samples a video twice (dense vs LiteAttention) and
reports speed and quality. Needs the demo extra: pip install "liteattn_ops[demo]"."""
