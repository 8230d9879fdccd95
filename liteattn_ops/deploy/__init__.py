"""The export layer: torch.export programs, .pt2 files and AOTInductor packages with skip states."""
