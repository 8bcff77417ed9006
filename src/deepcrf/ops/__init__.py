"""deepcrf.ops."""
