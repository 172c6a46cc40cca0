"""Process-group helpers, and a real 2-process gloo run (torchrun) against the single-process run."""

import json
import os
import subprocess
import sys

import pytest
import torch

from flowseg.checkpoint import latest_checkpoint, load_train_state, load_weights
from flowseg.distributed import autocast, broadcast_float, resolve_device, setup, shard_indices
from flowseg.train import REPA_STATE

RUN = ["data.name=shapes", "data.image_size=16", "data.augment={}", "data.options.length=12",
       "model.size=T/8", "train.batch_size=4", "train.steps=4", "train.log_every=1", "train.val_every=2",
       "train.ckpt_every=0", "train.val_samples=6", "train.progress=false", "train.tensorboard=false",
       "train.device=cpu", "optim.warmup_steps=2", "eval.steps=2"]


def test_shards_partition_the_split_without_padding():
    for length in (0, 1, 7, 10):
        for world in (1, 2, 3):
            shards = [shard_indices(length, rank, world) for rank in range(world)]
            assert sorted(i for shard in shards for i in shard) == list(range(length))


def test_single_process_without_torchrun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    context = setup("cpu")
    assert (context.rank, context.world_size, context.is_main, context.is_distributed) == (0, 1, True, False)
    assert context.device == torch.device("cpu")
    assert broadcast_float(2.5, context.device) == 2.5


def test_bad_device_settings(monkeypatch):
    with pytest.raises(ValueError, match="device must be one of"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        autocast(torch.device("cpu"), "bf16")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is not an integer"):
        setup("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA device"):
            resolve_device("cuda")


def _records(run_dir, kind):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record["kind"] == kind]


@pytest.mark.parametrize("ranks, extra", [(2, []), (1, []), (2, ["repa.teacher=efficientnet-lite0"])],
                         ids=["2-ranks", "1-rank", "2-ranks-repa"])
def test_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path, ranks, extra):
    """2 ranks x 1 micro-batch of 2 = 1 rank x 2 micro-batches of 2: same samples, same t, same update
    (with REPA, of the projector too). torchrun with one rank joins a process group and trains through
    DDP too, with the same result."""
    one, two = tmp_path / "one", tmp_path / "two"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    for launcher, run_dir, accumulation in (([sys.executable], one, 2), (torchrun, two, 2 // ranks)):
        launched = subprocess.run(
            [*launcher, "-m", "flowseg.cli", "train", "shapes", *RUN, f"train.grad_accum={accumulation}",
             f"train.out_dir={run_dir}", *extra],
            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
        assert launched.returncode == 0, launched.stderr[-3000:]
    assert "cpu x 1 rank(s) from" in (one / "train.log").read_text()
    assert f"cpu x {ranks} rank(s) (gloo process group, DDP) from" in (two / "train.log").read_text()

    for which in ("model", "ema"):
        expected, actual = load_weights(latest_checkpoint(one), which), load_weights(latest_checkpoint(two), which)
        assert expected.keys() == actual.keys()
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=1e-6)  # measured: 0.0
    if extra:
        expected, actual = (load_train_state(latest_checkpoint(run))[REPA_STATE] for run in (one, two))
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=1e-6)
    losses_one = [r["loss"] for r in _records(one, "train")]
    losses_two = [r["loss"] for r in _records(two, "train")]
    assert losses_two == pytest.approx(losses_one, rel=1e-6)
    # validation: each rank segments half of the split, the confusion matrices are summed
    val_one, val_two = _records(one, "val"), _records(two, "val")
    assert [r["step"] for r in val_two] == [2, 4]
    assert [r["miou"] for r in val_two] == pytest.approx([r["miou"] for r in val_one], abs=1e-6)
    assert [r["pixel_accuracy"] for r in val_two] == pytest.approx([r["pixel_accuracy"] for r in val_one], abs=1e-6)
