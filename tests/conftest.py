"""Test-wide settings: one intra-op thread per process.

The tests run many tiny layers; with torch's default thread pool on a small shared machine the
threads mostly wait on each other (tiny U-Net steps ran up to ~100x slower). Subprocesses inherit
OMP_NUM_THREADS.
"""
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

torch.set_num_threads(1)
