"""Fuzzing rankscope's readers: mutations of real checkpoints, and the one rule every outcome must follow."""
