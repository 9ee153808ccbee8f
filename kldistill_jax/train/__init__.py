"""Training infrastructure: checkpoints, metric writers and FLOP accounting."""
