"""One writer per run folder: a live holder refuses a second training run, a killed one does not."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

from flowseg.checkpoint import list_checkpoints
from flowseg.cli import EXIT_USAGE, main
from flowseg.config import load_config
from flowseg.distributed import DistContext
from flowseg.runlock import LOCK_FILE, Holder, RunFolderBusy, RunLock
from flowseg.train import train

TINY = ["data.image_size=16", "data.augment=null", "data.options.length=8", "model.size=T/8",
        "train.batch_size=4", "train.steps=2", "train.val_every=0", "train.val_samples=2", "train.progress=false",
        "train.tensorboard=false", "train.device=cpu", "eval.steps=1"]

HOLD = ("import sys; from flowseg.runlock import RunLock; RunLock(sys.argv[1]).__enter__(); "
        "print('held', flush=True); sys.stdin.read()")


@pytest.fixture
def holder(tmp_path):
    """A live process holding the lock of tmp_path/run until the test kills it."""
    run = tmp_path / "run"
    run.mkdir()
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    yield process
    process.kill()
    process.wait()


def test_a_second_training_run_is_refused_naming_the_holder_and_a_killed_holder_is_stale(tmp_path, holder, capsys):
    run = tmp_path / "run"
    with pytest.raises(RunFolderBusy, match=rf"run folder {run} is in use by another training run \(pid "
                                            rf"{holder.pid} on host {socket.gethostname()}, started 20"):
        train(load_config("shapes", [*TINY, f"train.out_dir={run}"]))
    assert main(["train", "shapes", *TINY, f"train.out_dir={run}", "--resume"]) == EXIT_USAGE
    assert f"pid {holder.pid}" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]  # the refused runs wrote nothing

    holder.send_signal(signal.SIGKILL)
    holder.wait()
    result = train(load_config("shapes", [*TINY, f"train.out_dir={run}"]))
    assert result.step == 2 and list_checkpoints(run)
    log = (run / "train.log").read_text()
    assert f"(pid {holder.pid} on host {socket.gethostname()}" in log and "ended without releasing it" in log
    assert (run / LOCK_FILE).read_text() == ""  # released cleanly: nothing stale for the next run


def test_a_lock_file_left_by_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = Holder(int(dead.stdout), "elsewhere", "2026-01-02T03:04:05+00:00")
    (tmp_path / LOCK_FILE).write_text(json.dumps(vars(left)))
    with RunLock(tmp_path) as lock:
        assert lock.stale == left
        record = json.loads((tmp_path / LOCK_FILE).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        with pytest.raises(RunFolderBusy, match=f"pid {os.getpid()} on host"):  # held: even this process is refused
            RunLock(tmp_path).__enter__()
    with RunLock(tmp_path) as lock:
        assert lock.stale is None


def test_only_rank_0_takes_the_lock(tmp_path):
    """Under torchrun rank 0 writes for every rank: another rank neither takes the lock nor writes."""
    run = tmp_path / "run"
    run.mkdir()
    with RunLock(run):
        rank_1 = DistContext(rank=1, world_size=1, local_rank=0, device=torch.device("cpu"))
        result = train(load_config("shapes", [*TINY, f"train.out_dir={run}"]), context=rank_1)
    assert result.step == 2 and list_checkpoints(run) == []
