"""Trajectories: spectra of a training run's checkpoints against step, and how far each moved from the last."""
