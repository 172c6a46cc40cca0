"""Checkpoint files: round trip, atomic commit, no overwriting, discovery, shape checks, output folders,
and the faults: NaN/inf states, a full disk, damaged or crafted files, interrupted deletions, leftovers."""

import errno
import hashlib
import io
import json
import os
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import flowseg.checkpoint as checkpoint_module
from flowseg.checkpoint import (
    CHECKPOINTS_DIR, CONFIG_FILE, EMA_FILE, HASHED_FILES, META_FILE, MODEL_FILE, STATE_FILE, ensure_writable_dir,
    fit_state_dict, latest_checkpoint, list_checkpoints, load_train_state, load_weights, prune_checkpoints,
    read_checkpoint, remove_leftovers, resolve_checkpoint, save_checkpoint, write_atomically,
)
from oracles import forge

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
    # meta.json records the sha256 of every other file
    digests = json.loads((path / META_FILE).read_text())["sha256"]
    assert digests == {name: hashlib.sha256((path / name).read_bytes()).hexdigest() for name in HASHED_FILES}
    assert info.sha256 == digests


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
    with pytest.raises(ValueError, match=f"{path / EMA_FILE} is damaged"):
        load_weights(path, "ema")
    forge(path, EMA_FILE, b"not safetensors")  # its hash recorded: the parser itself refuses it
    with pytest.raises(ValueError, match=f"cannot read weights {path / EMA_FILE}"):
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


def test_write_atomically_on_a_full_disk_names_the_file_and_keeps_the_old_content(tmp_path, monkeypatch):
    target = tmp_path / "result.json"
    write_atomically(target, "old")
    monkeypatch.setattr(checkpoint_module, "open", FullDisk(2), raising=False)
    with pytest.raises(OSError, match=f"^cannot write {target}: No space left on device$"):
        write_atomically(target, "new content")
    monkeypatch.undo()
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["result.json"]


# ---- faults ------------------------------------------------------------------------------------

def test_a_nonfinite_state_is_never_saved(tmp_path):
    model = _tiny()
    good = _save(tmp_path, 1, model)
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
        model[2].bias[1] = float("inf")
    with pytest.raises(ValueError, match=r"refusing to save .*step_00000002: its model.safetensors would hold "
                                         r"NaN/inf \(2 values in 2 tensors, e.g. 0.weight\)"):
        save_checkpoint(tmp_path, 2, model.state_dict(), _tiny().state_dict(), {}, "", NAMES, PALETTE)
    with pytest.raises(ValueError, match="its ema.safetensors would hold NaN/inf"):
        save_checkpoint(tmp_path, 2, _tiny().state_dict(), model.state_dict(), {}, "", NAMES, PALETTE)
    assert os.listdir(tmp_path / CHECKPOINTS_DIR) == [good.name]


class FullDisk:
    """open() for checkpoint.py on a disk that has room for `room` more bytes: a write beyond it stores
    what fits and fails with ENOSPC, as a real write(2) does."""

    def __init__(self, room):
        self.room = room

    def __call__(self, file, mode="r", *args, **kwargs):
        handle = open(file, mode, *args, **kwargs)
        if "w" in mode:
            write = handle.write

            def limited(data):
                written = write(data[:max(self.room, 0)])
                self.room -= len(data)
                if self.room < 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return written
            handle.write = limited
        return handle


@pytest.mark.parametrize("failing", [MODEL_FILE, EMA_FILE, STATE_FILE, CONFIG_FILE, META_FILE])
def test_a_full_disk_fails_the_save_clearly_and_keeps_the_earlier_checkpoints(tmp_path, monkeypatch, failing):
    model = _tiny()
    good = _save(tmp_path, 1, model)
    written = [MODEL_FILE, EMA_FILE, STATE_FILE, CONFIG_FILE, META_FILE]  # in this order
    room = sum((good / name).stat().st_size for name in written[:written.index(failing)]) + 1
    monkeypatch.setattr(checkpoint_module, "open", FullDisk(room), raising=False)
    with pytest.raises(OSError) as caught:
        _save(tmp_path, 2, model)
    assert str(caught.value) == (f"cannot write checkpoint {tmp_path / CHECKPOINTS_DIR / 'step_00000002'} "
                                 f"({failing}): No space left on device; nothing was saved for step 2, earlier "
                                 "checkpoints are intact")
    assert isinstance(caught.value.__cause__, OSError) and caught.value.__cause__.errno == errno.ENOSPC
    monkeypatch.undo()
    assert os.listdir(tmp_path / CHECKPOINTS_DIR) == [good.name]  # no temporary folder left
    assert list_checkpoints(tmp_path) == [good] and read_checkpoint(good).step == 1
    assert load_weights(good, "model").keys() == model.state_dict().keys()


def test_overwritten_bytes_inside_a_weight_file_are_detected(tmp_path):
    path = _save(tmp_path, 1, _tiny())
    data = bytearray((path / EMA_FILE).read_bytes())
    data[-8:-4] = b"\x00\x00\xc0\x7f"  # a NaN inside the last tensor: the file still parses
    (path / EMA_FILE).write_bytes(bytes(data))
    assert load_file(path / EMA_FILE)  # what a plain reader would have taken silently
    with pytest.raises(ValueError, match=f"{path / EMA_FILE} is damaged: its content differs from what was saved"):
        load_weights(path, "ema")
    assert load_weights(path, "model")  # the other files are fine


@pytest.mark.parametrize("name", [MODEL_FILE, STATE_FILE, CONFIG_FILE])
def test_every_hashed_file_is_verified(tmp_path, name):
    path = _save(tmp_path, 1, _tiny())
    (path / name).write_bytes((path / name).read_bytes()[:-1])  # truncated by one byte
    with pytest.raises(ValueError, match=f"{path / name} is damaged"):
        {MODEL_FILE: lambda: load_weights(path, "model"), STATE_FILE: lambda: load_train_state(path),
         CONFIG_FILE: lambda: read_checkpoint(path)}[name]()


def _pickled(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo crafted",))


@pytest.mark.parametrize(("data", "cause"), [
    (b"", "cannot read training state .*train_state.pt: EOFError"),
    (_pickled({"step": 1, "rng": torch.get_rng_state()})[:300], "cannot read training state .*train_state.pt: "),
    (pickle.dumps(RunsCode(), protocol=2), "cannot read training state .*train_state.pt: UnpicklingError"),
    (_pickled([1, 2]), "training state .*train_state.pt holds a list, not a dict"),
    (_pickled({"elapsed": 1.0}), r"training state .*train_state.pt: 'step' must be of type int, found nothing"),
    (_pickled({"step": "1", "elapsed": 1.0}), r"'step' must be of type int, found str"),
], ids=["empty", "truncated", "code", "list", "missing-key", "wrong-type"])
def test_a_crafted_training_state_is_refused_by_name(tmp_path, data, cause):
    path = _save(tmp_path, 1, _tiny())
    (path / STATE_FILE).write_bytes(data)
    with pytest.raises(ValueError, match=f"{path / STATE_FILE} is damaged"):  # its hash no longer matches
        load_train_state(path, {"step": int, "elapsed": float})
    forge(path, STATE_FILE, data)  # hash recorded too: the content itself must be refused
    with pytest.raises(ValueError, match=cause):
        load_train_state(path, {"step": int, "elapsed": float})


@pytest.mark.parametrize(("edit", "problem"), [
    (lambda meta: [meta], "holds a JSON list, not an object"),
    (lambda meta: {k: v for k, v in meta.items() if k != "palette"}, r"lacks the key\(s\) \['palette'\]"),
    (lambda meta: {k: v for k, v in meta.items() if k != "sha256"}, r"lacks the key\(s\) \['sha256'\]"),
    (lambda meta: {**meta, "step": "1"}, "step must be a whole number >= 0, got '1'"),
    (lambda meta: {**meta, "class_names": "bg"}, "class_names must be a non-empty list of strings"),
    (lambda meta: {**meta, "palette": meta["palette"][:2]}, r"palette must hold one \[r, g, b\] colour .* 3 in"),
    (lambda meta: {**meta, "palette": [[0, 0, 256]] * 3}, "palette must hold one"),
    (lambda meta: {**meta, "sha256": {EMA_FILE: "0" * 64}}, "sha256 must map each of"),
], ids=["list", "no-palette", "no-sha256", "step-str", "names-str", "palette-short", "palette-range", "sha256"])
def test_a_malformed_meta_json_is_refused_by_name(tmp_path, edit, problem):
    path = _save(tmp_path, 1, _tiny())
    (path / META_FILE).write_text(json.dumps(edit(json.loads((path / META_FILE).read_text()))))
    with pytest.raises(ValueError, match=problem) as caught:
        read_checkpoint(path)
    assert str(path / META_FILE) in str(caught.value)


class KilledMidDeletion(Exception):
    pass


def test_a_deletion_interrupted_midway_leaves_no_listed_half_checkpoint(tmp_path, monkeypatch):
    for step in (1, 2, 3):
        _save(tmp_path, step, _tiny())

    def dies_after_one_file(path):
        next(p for p in sorted(path.iterdir())).unlink()
        raise KilledMidDeletion()
    monkeypatch.setattr(checkpoint_module.shutil, "rmtree", dies_after_one_file)
    with pytest.raises(KilledMidDeletion):
        prune_checkpoints(tmp_path, keep_last=2)
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    assert sorted(os.listdir(tmp_path / CHECKPOINTS_DIR)) == [".trash-step_00000001", "step_00000002",
                                                              "step_00000003"]
    assert remove_leftovers(tmp_path) == [tmp_path / CHECKPOINTS_DIR / ".trash-step_00000001"]
    assert sorted(os.listdir(tmp_path / CHECKPOINTS_DIR)) == ["step_00000002", "step_00000003"]


def test_a_folder_without_meta_json_is_not_a_checkpoint(tmp_path):
    good = _save(tmp_path, 1, _tiny())
    half = _save(tmp_path, 2, _tiny())
    (half / META_FILE).unlink()  # e.g. half deleted by an older flowseg
    assert list_checkpoints(tmp_path) == [good] and latest_checkpoint(tmp_path) == good
    with pytest.raises(ValueError, match="is not a flowseg checkpoint"):
        resolve_checkpoint(half)


def test_remove_leftovers_takes_only_what_killed_processes_left(tmp_path):
    good = _save(tmp_path, 1, _tiny())
    checkpoints = tmp_path / CHECKPOINTS_DIR
    (checkpoints / ".tmp-step_00000002-4242").mkdir()
    (checkpoints / ".tmp-step_00000002-4242" / MODEL_FILE).write_bytes(b"half")
    (checkpoints / ".trash-step_00000000").mkdir()
    (tmp_path / ".tmp-config.yaml-4242").write_text("half")
    (tmp_path / ".write-test-4242").write_bytes(b"")
    for kept in ("config.yaml", "metrics.jsonl", ".hidden-by-the-user"):
        (tmp_path / kept).write_text("x")
    removed = remove_leftovers(tmp_path)
    assert sorted(p.name for p in removed) == [".tmp-config.yaml-4242", ".tmp-step_00000002-4242",
                                               ".trash-step_00000000", ".write-test-4242"]
    assert sorted(os.listdir(checkpoints)) == [good.name]
    assert sorted(os.listdir(tmp_path)) == [".hidden-by-the-user", CHECKPOINTS_DIR, "config.yaml", "metrics.jsonl"]
    assert load_weights(good, "ema") and remove_leftovers(tmp_path) == []
    assert remove_leftovers(tmp_path / "no-run-yet") == []
