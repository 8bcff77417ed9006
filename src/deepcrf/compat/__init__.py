"""deepcrf.compat."""
