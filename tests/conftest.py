"""Shared test settings."""

import torch

# the tests' matrices are small: one thread avoids the thread pool's overhead and contention on 2 cores
torch.set_num_threads(1)
