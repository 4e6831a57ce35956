"""The training loop, checkpoints, the run folder, training settings and metrics."""
