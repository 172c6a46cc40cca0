"""Faults while training: NaN/inf weights, a full disk, damaged or crafted files met by --resume or
model.pretrained, leftovers of killed runs, and kill -9 at random moments of saving and pruning.

The kill loop runs `flowseg train` in a child process (this file run as a script) that can carry a
trap: SIGKILL itself at the n-th call of one file-system operation (a file write of checkpoint.py,
os.replace, os.unlink, os.rmdir) on a path containing a given string; a write is cut in half first.
Trapping an operation rather than a moment puts every such kill inside a save or a prune; kills at
random moments are mixed in. After every kill each listed checkpoint must read back whole (its files
match their sha256) and everything else in checkpoints/ must be a leftover the next run removes; at
the end the resumed run's weights and optimizer state must equal, bit for bit, those of a run that
was never interrupted.
"""

import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from oracles import forge
from test_train import TINY, tiny_config, tiny_datasets
from torch import nn

import flowseg
import flowseg.checkpoint as checkpoint_module
from flowseg.build import build_network
from flowseg.checkpoint import (
    CHECKPOINTS_DIR, EMA_FILE, META_FILE, STATE_FILE, list_checkpoints, load_train_state, load_weights,
    read_checkpoint,
)
from flowseg.cli import main
from flowseg.config import load_config
from flowseg.train import TRAIN_STATE, TrainingDiverged, train

REPO = Path(flowseg.__file__).resolve().parents[1]


def run_args(run_dir, *extra):
    """`flowseg train` arguments of a tiny run (the TINY set-up of test_train.py), one thread."""
    return ["train", "shapes", *TINY, "train.threads=1", f"train.out_dir={run_dir}", *extra]


def train_cli(capsys, *args):
    """(exit code, stderr lines) of `flowseg train ARGS` run in this process."""
    code = main(list(args))
    return code, capsys.readouterr().err.strip().splitlines()


# ---- NaN/inf ----------------------------------------------------------------------------------

def test_an_update_that_overflows_the_weights_is_a_divergence_not_a_checkpoint(tmp_path, capsys):
    """The gradient of step 1 is finite, the update makes the weights inf: nothing may be saved."""
    run = tmp_path / "run"
    code, errors = train_cli(capsys, *run_args(run, "optim.lr=1e38", "optim.warmup_steps=0", "train.ckpt_every=1"))
    assert code == 3
    assert errors[-1].startswith("flowseg: training diverged at step 1: the weights became NaN/inf (model: ")
    assert "stopped without saving, no checkpoint had been written yet" in errors[-1]
    assert list_checkpoints(run) == [] and not (run / CHECKPOINTS_DIR).exists()


class SpareTurnsInf(nn.Module):
    """The real model plus a parameter the loss never sees, set to inf at the `calls`-th forward pass:
    the gradient stays finite, the weights (and so the EMA) do not."""

    def __init__(self, model, calls):
        super().__init__()
        self.model, self.size, self.calls = model, model.size, calls
        self.spare = nn.Parameter(torch.zeros(2))

    def forward(self, *args, **kwargs):
        self.calls -= 1
        if self.calls == 0:
            with torch.no_grad():
                self.spare.fill_(float("inf"))
        return self.model(*args, **kwargs)


def test_the_last_good_checkpoint_named_by_a_divergence_is_finite(tmp_path):
    config = tiny_config(tmp_path, "train.steps=6", "train.ckpt_every=2")
    model, encoding = build_network(config, 7)
    with pytest.raises(TrainingDiverged) as caught:  # the spare turns inf in step 3, the save of step 4 stops
        train(config, network=(SpareTurnsInf(model, 3), encoding), datasets=tiny_datasets())
    good = tmp_path / "run" / CHECKPOINTS_DIR / "step_00000002"
    assert caught.value.step == 4 and caught.value.last_checkpoint == good
    assert "the weights became NaN/inf (model: 2 values in 1 tensor, e.g. spare; EMA: 2 values in 1 tensor" \
        in str(caught.value)
    assert list_checkpoints(tmp_path / "run") == [good]
    assert os.listdir(good.parent) == [good.name]
    for which in ("model", "ema"):
        assert all(torch.isfinite(value).all() for value in load_weights(good, which).values())


# ---- a full disk, damaged files ----------------------------------------------------------------

def test_a_full_disk_while_checkpointing_exits_2_naming_the_checkpoint(tmp_path, capsys, monkeypatch):
    def disk_full_from_step_4(file, mode="r", *args, **kwargs):
        if "w" in mode and "step_00000004" in str(file):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return open(file, mode, *args, **kwargs)
    monkeypatch.setattr(checkpoint_module, "open", disk_full_from_step_4, raising=False)
    run = tmp_path / "run"
    code, errors = train_cli(capsys, *run_args(run))
    assert code == 2
    failed = run / CHECKPOINTS_DIR / "step_00000004"
    assert errors[-1] == (f"flowseg train: error: cannot write checkpoint {failed} (model.safetensors): No space "
                          "left on device; nothing was saved for step 4, earlier checkpoints are intact")
    monkeypatch.undo()
    assert os.listdir(run / CHECKPOINTS_DIR) == ["step_00000002"]
    assert load_train_state(run / CHECKPOINTS_DIR / "step_00000002", TRAIN_STATE)["step"] == 2


def _overwrite_inside(file):
    data = bytearray(file.read_bytes())
    data[-8:-4] = b"\x00\x00\xc0\x7f"  # a NaN in the last tensor: still a valid safetensors file
    file.write_bytes(bytes(data))


def _without_palette(file):
    meta = json.loads(file.read_text())
    del meta["palette"]
    file.write_text(json.dumps(meta))


def test_a_damaged_or_crafted_checkpoint_refuses_the_resume_by_name(tmp_path, capsys):
    run = tmp_path / "run"
    assert train_cli(capsys, *run_args(run, "train.steps=2"))[0] == 0
    checkpoint = run / CHECKPOINTS_DIR / "step_00000002"
    state = load_train_state(checkpoint)
    state_file = re.escape(str(checkpoint / STATE_FILE))
    damages = [
        (EMA_FILE, _overwrite_inside,
         re.escape(f"{checkpoint / EMA_FILE} is damaged: its content differs from what was saved")),
        (STATE_FILE, lambda file: file.write_bytes(b""), f"{state_file} is damaged"),
        (STATE_FILE, lambda file: forge(checkpoint, STATE_FILE, file.read_bytes()[:1000]),
         f"cannot read training state {state_file}: "),
        (STATE_FILE, lambda file: (torch.save({**state, "optimizer": None}, file),
                                   forge(checkpoint, STATE_FILE, file.read_bytes())),
         f"training state {state_file}: 'optimizer' must be of type dict, found NoneType"),
        (META_FILE, _without_palette, re.escape(f"{checkpoint / META_FILE} lacks the key(s) ['palette']")),
    ]
    for name, damage, message in damages:
        original = {file.name: file.read_bytes() for file in checkpoint.iterdir()}
        damage(checkpoint / name)
        code, errors = train_cli(capsys, *run_args(run, "train.steps=4"), "--resume")
        assert code == 2 and len(errors) == 1 and re.match("flowseg train: error: " + message, errors[0]), errors
        for file_name, data in original.items():
            (checkpoint / file_name).write_bytes(data)
    assert train_cli(capsys, *run_args(run, "train.steps=4"), "--resume")[0] == 0  # undamaged, it resumes


def test_a_corrupt_or_foreign_pretrained_file_exits_2_naming_it(tmp_path, capsys):
    garbage, foreign = tmp_path / "garbage.safetensors", tmp_path / "foreign.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    save_file({"encoder.weight": torch.zeros(2, 2)}, foreign)
    for file, cause in ((garbage, "as a safetensors file"), (foreign, "holds no PixNerd weight")):
        code, errors = train_cli(capsys, *run_args(tmp_path / file.stem, f"model.pretrained={file}"))
        assert code == 2 and len(errors) == 1 and f"'{file}'" in errors[0] and cause in errors[0]


# ---- leftovers --------------------------------------------------------------------------------

def test_a_starting_run_removes_what_killed_runs_left(tmp_path, capsys):
    run = tmp_path / "run"
    assert train_cli(capsys, *run_args(run, "train.steps=2"))[0] == 0
    leftovers = [run / CHECKPOINTS_DIR / ".tmp-step_00000004-999", run / CHECKPOINTS_DIR / ".trash-step_00000001",
                 run / ".tmp-config.yaml-999"]
    for folder in leftovers[:2]:
        folder.mkdir()
        (folder / EMA_FILE).write_bytes(b"x" * 1000)
    leftovers[2].write_text("half")
    assert train_cli(capsys, *run_args(run, "train.steps=4"), "--resume")[0] == 0
    assert not any(path.exists() for path in leftovers)
    assert sorted(os.listdir(run / CHECKPOINTS_DIR)) == ["step_00000002", "step_00000004"]
    log = (run / "train.log").read_text()
    assert all(f"removed {path}, left by an interrupted run" in log for path in leftovers)


# ---- kill -9 ----------------------------------------------------------------------------------

KILL_RUN = ["train.ckpt_every=1", "train.keep_checkpoints=1"]  # every step saves, and prunes the one before


def kill_run_config(run, steps):
    return load_config("shapes", run_args(run, *KILL_RUN, f"train.steps={steps}")[2:])


def _launch(run, steps, trap):
    """`flowseg train` in a child process, with --resume once the run has a checkpoint."""
    resume = ["--resume"] if list_checkpoints(run) else []
    command = [sys.executable, __file__, *trap, *run_args(run, *KILL_RUN, f"train.steps={steps}"), *resume]
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill_at_a_random_moment(child, run, rng, longest):
    """SIGKILL the child a random time (up to `longest` seconds) after it first changes checkpoints/."""
    folder = run / CHECKPOINTS_DIR
    before = set(os.listdir(folder)) if folder.is_dir() else set()
    while child.poll() is None and (set(os.listdir(folder)) if folder.is_dir() else set()) == before:
        time.sleep(0.002)
    time.sleep(rng.uniform(0, longest))
    child.send_signal(signal.SIGKILL)


def _check_consistent(run) -> set[str]:
    """Every listed checkpoint reads back whole, and everything else is a leftover; returns the
    kinds of leftovers (".tmp-": a save, ".trash-": a deletion)."""
    listed = list_checkpoints(run)
    assert len(listed) <= 2  # keep_checkpoints=1, and the next one when killed before pruning
    for checkpoint in listed:
        info = read_checkpoint(checkpoint)
        assert checkpoint.name == f"step_{info.step:08d}"
        assert load_weights(checkpoint, "model").keys() == load_weights(checkpoint, "ema").keys()
        assert load_train_state(checkpoint, TRAIN_STATE)["step"] == info.step
    folder = run / CHECKPOINTS_DIR
    others = set(os.listdir(folder)) - {p.name for p in listed} if folder.is_dir() else set()
    assert all(name.startswith((".tmp-step_", ".trash-step_")) for name in others), others
    return {name.split("step_")[0] for name in others}


def _kill_loop(tmp_path, steps, faults, rng):
    """Run the faults one after the other (each resumes the run), then resume to the end (in this
    process), and compare with an uninterrupted run. A fault is a trap (kind, where, n), or
    ("moment", longest) for a kill at a random moment. Returns, for each fault, whether it killed the
    run and the kinds of leftovers it left."""
    run = tmp_path / "run"
    seen = []
    for fault in faults:
        trap = fault if fault[0] != "moment" else ("none", "", "0")
        child = _launch(run, steps, [str(part) for part in trap])
        if fault[0] == "moment":
            _kill_at_a_random_moment(child, run, rng, fault[1])
        _, errors = child.communicate(timeout=300)
        assert child.returncode in (0, -signal.SIGKILL), errors[-3000:]
        seen.append((child.returncode == -signal.SIGKILL, _check_consistent(run)))
    final = train(kill_run_config(run, steps), resume=bool(list_checkpoints(run))).checkpoint
    assert os.listdir(run / CHECKPOINTS_DIR) == [final.name]  # the leftovers are gone
    assert not [path for path in run.iterdir() if path.name.startswith(".")]
    straight = train(kill_run_config(tmp_path / "straight", steps))
    for which in ("model", "ema"):
        expected, actual = load_weights(straight.checkpoint, which), load_weights(final, which)
        assert expected.keys() == actual.keys() and all(torch.equal(actual[k], expected[k]) for k in expected)
    expected, actual = load_train_state(straight.checkpoint), load_train_state(final)
    for key, moments in expected["optimizer"]["state"].items():
        assert all(torch.equal(actual["optimizer"]["state"][key][name], value) for name, value in moments.items())
    assert actual["ema_updates"] == expected["ema_updates"] == steps
    return seen


def test_kill_9_during_saves_and_prunes_then_resume(tmp_path):
    """Three kills at chosen operations: in the middle of writing a checkpoint, in the middle of deleting
    the one before, and between saving a new one and deleting the old one."""
    seen = _kill_loop(tmp_path, steps=4, rng=random.Random(0), faults=[
        ("write", "ema.safetensors", 2),   # step 1 saved; half of step 2's EMA file written
        ("unlink", "train_state.pt", 1),   # resumed at 1: step 2 saved, killed while deleting step 1
        ("replace", ".trash-", 1),         # resumed at 2: step 3 saved, killed before deleting step 2
    ])
    assert seen == [(True, {".tmp-"}), (True, {".trash-"}), (True, set())]


@pytest.mark.slow
def test_kill_9_at_random_operations_and_moments_then_resume(tmp_path):
    rng = random.Random(16)
    kinds = [("write", name) for name in ("model.safetensors", "ema.safetensors", "train_state.pt", "meta.json",
                                          ".tmp-config.yaml")]
    kinds += [("replace", ".tmp-step_"), ("replace", ".trash-"), ("unlink", ""), ("rmdir", ".trash-")]
    faults = [("moment", 0.6) if rng.random() < 0.3 else (*rng.choice(kinds), rng.randint(1, 3)) for _ in range(30)]
    seen = _kill_loop(tmp_path, steps=40, faults=faults, rng=rng)
    assert sum(killed for killed, _ in seen) >= 20  # most faults struck before the run ended
    leftovers = [kinds for _, kinds in seen]
    assert {".tmp-"} in leftovers and {".trash-"} in leftovers


# ---- the child process ------------------------------------------------------------------------

class _DiesMidWrite:
    """A file handle that writes half of what it is given, then SIGKILLs its process."""

    def __init__(self, handle):
        self.handle = handle

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()

    def write(self, data):
        self.handle.write(data[:len(data) // 2])
        self.handle.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def _arm(kind: str, where: str, nth: int) -> None:
    """SIGKILL this process at the nth `kind` operation whose path contains `where` (see the module
    docstring); kind "none" arms nothing."""
    calls = 0

    def hit(path) -> bool:
        nonlocal calls
        calls += where in str(path)
        return where in str(path) and calls == nth

    if kind == "write":
        def trapped_open(file, mode="r", *args, **kwargs):
            handle = open(file, mode, *args, **kwargs)
            return _DiesMidWrite(handle) if "w" in mode and hit(file) else handle
        checkpoint_module.open = trapped_open  # a module global shadows the builtin
    elif kind != "none":
        real = getattr(os, kind)

        def trapped(*args, **kwargs):
            if hit(" ".join(map(str, args[:2]))):
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        setattr(os, kind, trapped)


if __name__ == "__main__":
    _arm(sys.argv[1], sys.argv[2], int(sys.argv[3]))
    sys.exit(main(sys.argv[4:]))
