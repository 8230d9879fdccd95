"""The eager layer: the LiteAttention module and the helpers over every site of a model."""
