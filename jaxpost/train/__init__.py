"""Training: the shared update step, checkpoints and the training loop."""
