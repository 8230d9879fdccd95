"""The torch.compile layer: the liteattn graph pass and the "liteattn" Dynamo backend."""
