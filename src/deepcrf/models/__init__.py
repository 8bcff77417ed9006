"""deepcrf.models."""
