"""Shared test settings."""

import os
import tempfile

import torch

# the tests' matrices are small: one thread avoids the thread pool's overhead and contention on 2 cores
# (every test module relies on this; tests that change the count restore it)
torch.set_num_threads(1)

# --base analyses cache the base's SVDs on disk: never in the user's own cache (subprocesses inherit this too);
# tests of the cache itself point RANKSCOPE_CACHE at their own folder
os.environ["RANKSCOPE_CACHE"] = tempfile.mkdtemp(prefix="rankscope-test-cache-")
