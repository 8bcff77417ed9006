"""deepcrf.engine."""
