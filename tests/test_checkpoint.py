"""Checkpoint files: round trip, atomic commit, no overwriting, discovery, shape checks, output folders."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from flowseg.checkpoint import (
    CHECKPOINTS_DIR, EMA_FILE, META_FILE, ensure_writable_dir, fit_state_dict, latest_checkpoint,
    list_checkpoints, load_train_state, load_weights, prune_checkpoints, read_checkpoint, resolve_checkpoint,
    save_checkpoint, write_atomically,
)

PALETTE = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0]], dtype=np.uint8)
NAMES = ["bg", "cat", "dog"]


def _tiny(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))


def _save(run_dir, step, model, ema=None, state=None):
    return save_checkpoint(run_dir, step, model.state_dict(), (ema or model).state_dict(),
                           state or {"step": step, "rng": torch.get_rng_state()}, "train:\n  steps: 5\n",
                           NAMES, PALETTE)


def test_round_trip_restores_weights_metadata_and_state(tmp_path):
    model, ema = _tiny(0), _tiny(1)
    path = _save(tmp_path, 12, model, ema, {"step": 12, "elapsed": 3.5, "rng": torch.get_rng_state()})
    assert path == tmp_path / CHECKPOINTS_DIR / "step_00000012"
    info = read_checkpoint(path)
    assert info.step == 12 and info.class_names == NAMES and info.num_classes == 3
    np.testing.assert_array_equal(info.palette, PALETTE)
    assert info.config_yaml == "train:\n  steps: 5\n"
    for which, source in (("model", model), ("ema", ema)):
        restored = _tiny(7)
        fit_state_dict(restored, load_weights(path, which), "test")
        for key, value in source.state_dict().items():
            assert torch.equal(restored.state_dict()[key], value)
    state = load_train_state(path)
    assert state["step"] == 12 and state["elapsed"] == 3.5
    # the weight files are plain safetensors that any reader can open
    assert set(load_file(path / EMA_FILE)) == set(ema.state_dict())


def test_tied_weights_are_saved(tmp_path):
    model = _tiny()
    shared = {"a": model[0].weight, "b": model[0].weight}  # the same tensor twice
    path = save_checkpoint(tmp_path, 1, shared, shared, {}, "", NAMES, PALETTE)
    assert torch.equal(load_weights(path, "model")["b"], model[0].weight.detach())


def test_failed_save_leaves_nothing_behind_and_keeps_the_previous_checkpoint(tmp_path):
    model = _tiny()
    good = _save(tmp_path, 5, model)
    with pytest.raises(Exception):
        _save(tmp_path, 10, model, state={"unpicklable": lambda: None})
    assert list_checkpoints(tmp_path) == [good]
    assert sorted(os.listdir(tmp_path / CHECKPOINTS_DIR)) == ["step_00000005"]  # no temporary left over
    assert latest_checkpoint(tmp_path) == good


def test_an_existing_checkpoint_is_never_overwritten(tmp_path):
    first = _save(tmp_path, 5, _tiny(0))
    before = (first / EMA_FILE).read_bytes()
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        _save(tmp_path, 5, _tiny(1))
    assert (first / EMA_FILE).read_bytes() == before


def test_latest_is_the_highest_step_and_prune_keeps_the_newest(tmp_path):
    for step in (100, 20, 3):
        _save(tmp_path, step, _tiny())
    (tmp_path / CHECKPOINTS_DIR / ".tmp-step_00000200-1").mkdir()  # an interrupted save
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000020", "step_00000100"]
    assert resolve_checkpoint(tmp_path).name == "step_00000100"
    assert resolve_checkpoint(tmp_path / CHECKPOINTS_DIR).name == "step_00000100"
    prune_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000020", "step_00000100"]


def test_resolve_rejects_missing_and_foreign_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is not a flowseg checkpoint"):
        resolve_checkpoint(tmp_path / "empty")


def test_corrupt_files_give_clear_errors(tmp_path):
    path = _save(tmp_path, 1, _tiny())
    (path / EMA_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="cannot read weights"):
        load_weights(path, "ema")
    meta = json.loads((path / META_FILE).read_text())
    (path / META_FILE).write_text(json.dumps({**meta, "format": 99}))
    with pytest.raises(ValueError, match="format 99"):
        read_checkpoint(path)
    (path / META_FILE).write_text("{broken")
    with pytest.raises(ValueError, match="unreadable"):
        read_checkpoint(path)


def test_fit_state_dict_reports_every_mismatch():
    small, wide = nn.Linear(3, 4), nn.Linear(3, 5)
    with pytest.raises(ValueError, match=r"weight: checkpoint \(5, 3\) vs model \(4, 3\).*another model size"):
        fit_state_dict(small, wide.state_dict(), "checkpoint X")
    with pytest.raises(ValueError, match="1 weights missing"):
        fit_state_dict(small, {"weight": small.weight.detach()}, "checkpoint X")
    with pytest.raises(ValueError, match="1 checkpoint weights unknown"):
        fit_state_dict(small, {**small.state_dict(), "extra": torch.zeros(1)}, "checkpoint X")


def test_output_folder_checks(tmp_path):
    assert ensure_writable_dir(tmp_path / "a" / "b").is_dir()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="output folder .*file/sub is not writable"):
        ensure_writable_dir(blocker / "sub")


def test_write_atomically_replaces_whole_files_only(tmp_path):
    target = tmp_path / "result.json"
    write_atomically(target, "old")
    with pytest.raises(TypeError):
        write_atomically(target, 123)  # fails while writing: the old content stays, no temporary left
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["result.json"]
    write_atomically(target, b"new")
    assert target.read_text() == "new"
