"""Shared test set-up.

Every test process uses one intra-op thread: the tensors here are small, where a second OpenMP
thread costs more in synchronisation than it gains, and on a loaded 2-core machine two threads per
process stall (a 0.1 ms matmul measured at 16 ms). `make test` runs two pytest-xdist workers instead.
"""

import pytest
import torch

from flowseg.config import load_config
from flowseg.train import train

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def train_tiny_checkpoint():
    """train_tiny_checkpoint(run_dir, dataset, *overrides): a real checkpoint from two training steps
    of a 16 px run on `dataset` (for the eval/predict tests)."""
    return _train_tiny_checkpoint


def _train_tiny_checkpoint(run_dir, dataset: str, *overrides: str):
    config = load_config(dataset, ["data.image_size=16", "data.options.length=8", "train.batch_size=4",
                                   "train.steps=2", "train.val_every=0", "train.val_samples=2",
                                   "train.progress=false", "train.device=cpu", f"train.out_dir={run_dir}",
                                   *overrides])
    return train(config).checkpoint
