"""Test-session settings.

The models here are tiny: one intra-op thread is as fast as two, and it keeps OpenMP from spinning against other
processes on a small shared CI machine (two threads on a busy 2-core machine made steps 10-20x slower).
"""

import torch

torch.set_num_threads(1)
