"""Training: the loop, its backends, checkpoints, evaluation, progress and plots, runtime settings."""
