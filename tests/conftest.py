"""Shared test settings."""

import torch

# the tests' matrices are small: one thread avoids the thread pool's overhead and contention on 2 cores
# (every test module relies on this; tests that change the count restore it)
torch.set_num_threads(1)
