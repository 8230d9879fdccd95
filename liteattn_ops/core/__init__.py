"""The core layer: tile table, skip state, the exact CPU reference, the torch.library ops and
the SDPA eligibility predicate. Imports nothing from the layers above."""
