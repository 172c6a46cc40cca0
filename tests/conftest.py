"""Shared test set-up.

Every test process uses one intra-op thread: the tensors here are small, where a second OpenMP
thread costs more in synchronisation than it gains, and on a loaded 2-core machine two threads per
process stall (a 0.1 ms matmul measured at 16 ms). `make test` runs two pytest-xdist workers instead.
"""

import torch

torch.set_num_threads(1)
