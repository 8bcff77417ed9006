"""deepcrf.crf."""
