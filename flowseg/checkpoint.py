"""Checkpoints: one directory per saved step, committed by a single atomic rename.

    RUN/checkpoints/step_00001000/
        model.safetensors   raw weights
        ema.safetensors     EMA weights (what eval/predict use)
        encoding.safetensors  a flow model's centroids mu_k (N, d), so eval never re-derives them
        train_state.pt      optimizer, step, elapsed time, RNG states (only --resume reads it)
        config.yaml         the resolved run config
        meta.json           step, class names and palette

The files are written into a hidden temporary directory beside it, flushed to disk, and the directory
is then renamed into place with os.replace, so a reader (or a resumed run) sees either the whole
checkpoint or none of it. The newest checkpoint is the one with the highest step, so there is no
pointer file that could disagree with the directories. An existing checkpoint is never overwritten.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
STATE_FILE = "train_state.pt"
CONFIG_FILE = "config.yaml"
META_FILE = "meta.json"
ENCODING_FILE = "encoding.safetensors"
CHECKPOINTS_DIR = "checkpoints"
_PREFIX = "step_"


@dataclass
class CheckpointInfo:
    """What eval/predict need from a checkpoint besides the weights."""
    path: Path
    step: int
    config_yaml: str
    class_names: list[str]
    palette: np.ndarray  # (N, 3) uint8

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def step_dir_name(step: int) -> str:
    return f"{_PREFIX}{step:08d}"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _tensors_for_saving(state: dict[str, Tensor]) -> dict[str, Tensor]:
    # safetensors refuses tensors that share storage (tied weights, views): give each its own copy.
    return {key: value.detach().to("cpu", copy=True).contiguous() for key, value in state.items()}


def save_checkpoint(run_dir: str | Path, step: int, model_state: dict[str, Tensor],
                    ema_state: dict[str, Tensor], train_state: dict, config_yaml: str,
                    class_names: list[str], palette: np.ndarray, centroids: Tensor | None = None) -> Path:
    """Write RUN/checkpoints/step_<step>/ atomically and return its path; centroids: a flow model's mu_k."""
    checkpoints = Path(run_dir) / CHECKPOINTS_DIR
    checkpoints.mkdir(parents=True, exist_ok=True)
    final = checkpoints / step_dir_name(step)
    if final.exists():
        raise FileExistsError(f"checkpoint {final} already exists; refusing to overwrite it")
    temporary = checkpoints / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir()
    try:
        metadata = {"format": str(FORMAT_VERSION), "step": str(step)}
        save_file(_tensors_for_saving(model_state), temporary / MODEL_FILE, metadata=metadata)
        save_file(_tensors_for_saving(ema_state), temporary / EMA_FILE, metadata=metadata)
        torch.save(train_state, temporary / STATE_FILE)
        if centroids is not None:
            save_file({"centroids": centroids.detach().to("cpu", torch.float32).contiguous()},
                      temporary / ENCODING_FILE)
        (temporary / CONFIG_FILE).write_text(config_yaml)
        meta = {"format": FORMAT_VERSION, "step": step, "class_names": list(class_names),
                "palette": np.asarray(palette, dtype=np.uint8).tolist()}
        (temporary / META_FILE).write_text(json.dumps(meta, indent=1))
        for file in temporary.iterdir():
            _fsync_file(file)
        os.replace(temporary, final)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary directories are not listed)."""
    checkpoints = Path(run_dir) / CHECKPOINTS_DIR
    if not checkpoints.is_dir():
        return []
    found = [p for p in checkpoints.iterdir() if p.is_dir() and p.name.startswith(_PREFIX)
             and p.name[len(_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints (keep_last <= 0 keeps everything)."""
    if keep_last <= 0:
        return
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old)


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint directory, a run's checkpoints/ directory or a run directory."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return path
    newest = latest_checkpoint(path.parent if path.name == CHECKPOINTS_DIR else path)
    if newest is not None:
        return newest
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    raise ValueError(f"{path} is not a flowseg checkpoint: expected a directory holding {META_FILE}, "
                     f"{EMA_FILE}, ... or a run directory with {CHECKPOINTS_DIR}/{_PREFIX}*")


def read_checkpoint(path: str | Path) -> CheckpointInfo:
    """Step, resolved config, class names and palette of a checkpoint (weights are not loaded)."""
    path = resolve_checkpoint(path)
    try:
        meta = json.loads((path / META_FILE).read_text())
        config_yaml = (path / CONFIG_FILE).read_text()
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"checkpoint {path} is unreadable: {error}") from None
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"checkpoint {path} has format {meta.get('format')!r}; this flowseg reads "
                         f"format {FORMAT_VERSION}")
    return CheckpointInfo(path=path, step=int(meta["step"]), config_yaml=config_yaml,
                          class_names=list(meta["class_names"]),
                          palette=np.asarray(meta["palette"], dtype=np.uint8))


def load_weights(path: str | Path, which: str = "ema") -> dict[str, Tensor]:
    """The "ema" or "model" state dict of a checkpoint, on CPU."""
    files = {"ema": EMA_FILE, "model": MODEL_FILE}
    if which not in files:
        raise ValueError(f"which must be one of {tuple(files)}, got {which!r}")
    file = resolve_checkpoint(path) / files[which]
    try:
        return load_file(file, device="cpu")
    except (OSError, SafetensorError) as error:
        raise ValueError(f"cannot read weights {file}: {error}") from None


def load_centroids(path: str | Path) -> Tensor | None:
    """The centroids mu_k (N, d) a checkpoint was trained with; None for the twin (and for checkpoints
    saved before they were stored)."""
    file = resolve_checkpoint(path) / ENCODING_FILE
    if not file.exists():
        return None
    try:
        tensors = load_file(file, device="cpu")
    except (OSError, SafetensorError) as error:
        raise ValueError(f"cannot read the encoding {file}: {error}") from None
    if "centroids" not in tensors:
        raise ValueError(f"encoding {file} holds no 'centroids' tensor")
    return tensors["centroids"]


def load_train_state(path: str | Path) -> dict:
    file = resolve_checkpoint(path) / STATE_FILE
    try:
        # weights_only: the state holds tensors, numbers, strings and numpy RNG arrays only
        return torch.load(file, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as error:
        raise ValueError(f"cannot read training state {file}: {error}") from None


def fit_state_dict(module: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load `state` into `module`, or raise a ValueError listing every key or shape that differs."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    reshaped = [f"{key}: checkpoint {tuple(state[key].shape)} vs model {tuple(expected[key].shape)}"
                for key in sorted(set(state) & set(expected)) if state[key].shape != expected[key].shape]
    if missing or unexpected or reshaped:
        problems = []
        if reshaped:
            problems.append("shape mismatches: " + "; ".join(reshaped[:5])
                            + (f" (+{len(reshaped) - 5} more)" if len(reshaped) > 5 else ""))
        if missing:
            problems.append(f"{len(missing)} weights missing from the checkpoint, e.g. {missing[:3]}")
        if unexpected:
            problems.append(f"{len(unexpected)} checkpoint weights unknown to the model, e.g. {unexpected[:3]}")
        raise ValueError(f"{source} does not fit this model ({'; '.join(problems)}); it was saved for "
                         "another model size, encoding dimension or class count")
    module.load_state_dict(state)


def ensure_writable_dir(path: str | Path) -> Path:
    """Create `path` if needed and check that files can be written there (before any work is done)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"output folder {path} is not writable: {error.strerror or error}") from None
    return path


def write_atomically(path: str | Path, data: str | bytes) -> None:
    """Write a whole file or nothing: a temporary file beside it, then os.replace."""
    path = Path(path)
    temporary = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
