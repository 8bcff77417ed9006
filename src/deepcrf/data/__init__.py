"""deepcrf.data."""
