"""Checkpoints: one directory per saved step, committed by a single atomic rename.

    RUN/checkpoints/step_00001000/
        model.safetensors   raw weights
        ema.safetensors     EMA weights (what eval/predict use)
        train_state.pt      optimizer, step, elapsed time, RNG states (only --resume reads it)
        config.yaml         the resolved run config
        meta.json           step, class names, palette and the sha256 of each file above; written last

Saving refuses a state holding NaN/inf (a diverged state is not a checkpoint). The files are written
into a hidden temporary directory beside the checkpoint, flushed to disk, and the directory is then
renamed into place with os.replace, so a reader (or a resumed run) sees either the whole checkpoint
or none of it; a write that fails (a full disk) removes the temporary directory and raises an
OSError naming the checkpoint and the cause. Pruning first renames a checkpoint to a hidden
`.trash-` name, so a process killed while deleting leaves no half checkpoint under a checkpoint's
name; remove_leftovers clears what killed processes left. Only a directory holding meta.json counts
as a checkpoint, and every file is checked against its recorded sha256 before it is parsed, so a
file changed or damaged after saving is refused, by name. The newest checkpoint is the one with the
highest step, so there is no pointer file that could disagree with the directories. An existing
checkpoint is never overwritten.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save as safetensors_bytes
from torch import Tensor, nn

FORMAT_VERSION = 2
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
STATE_FILE = "train_state.pt"
CONFIG_FILE = "config.yaml"
META_FILE = "meta.json"
ENCODING_FILE = "encoding.safetensors"  # a flow model's centroids mu_k
HASHED_FILES = (MODEL_FILE, EMA_FILE, STATE_FILE, CONFIG_FILE)  # meta.json records their sha256 (and ENCODING_FILE's)
CHECKPOINTS_DIR = "checkpoints"
_PREFIX = "step_"
_TEMPORARY, _TRASH = ".tmp-", ".trash-"  # a save in progress; a checkpoint being deleted
_WRITE_TEST = ".write-test-"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class CheckpointInfo:
    """What eval/predict need from a checkpoint besides the weights."""
    path: Path
    step: int
    config_yaml: str
    class_names: list[str]
    palette: np.ndarray  # (N, 3) uint8
    sha256: dict[str, str]  # file name -> hex digest, for HASHED_FILES

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def step_dir_name(step: int) -> str:
    return f"{_PREFIX}{step:08d}"


def nonfinite_counts(state: Mapping[str, Tensor]) -> dict[str, int]:
    """Number of NaN/inf values of each floating-point tensor that holds any."""
    floats = {key: value for key, value in state.items() if value.is_floating_point()}
    if not floats:
        return {}
    # one device synchronisation for the whole state, not one per tensor
    counts = torch.stack([(~torch.isfinite(value)).sum() for value in floats.values()]).tolist()
    return {key: count for key, count in zip(floats, counts) if count}


def describe_nonfinite(counts: Mapping[str, int]) -> str:
    """nonfinite_counts in words: "1,234 values in 3 tensors, e.g. trunk.0.attn.qkv.weight"."""
    tensors = f"{len(counts)} tensor" + ("s" if len(counts) > 1 else "")
    return f"{sum(counts.values()):,} values in {tensors}, e.g. {next(iter(counts))}"


def _tensors_for_saving(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    # safetensors refuses tensors that share storage (tied weights, views): give each its own copy.
    return {key: value.detach().to("cpu", copy=True).contiguous() for key, value in state.items()}


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    # makes a rename inside `path` durable: without it a power cut can undo the rename
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _file_contents(weights: Mapping[str, dict[str, Tensor]], step: int, train_state: dict,
                   config_yaml: str) -> Iterator[tuple[str, bytes]]:
    """(file name, bytes) of the checkpoint's files but meta.json, one file at a time (bounded memory)."""
    metadata = {"format": str(FORMAT_VERSION), "step": str(step)}
    for name, state in weights.items():
        yield name, safetensors_bytes(state, metadata=metadata)
    buffer = io.BytesIO()
    torch.save(train_state, buffer)
    yield STATE_FILE, buffer.getvalue()
    yield CONFIG_FILE, config_yaml.encode()


def save_checkpoint(run_dir: str | Path, step: int, model_state: dict[str, Tensor],
                    ema_state: dict[str, Tensor], train_state: dict, config_yaml: str,
                    class_names: list[str], palette: np.ndarray, centroids: Tensor | None = None) -> Path:
    """Write RUN/checkpoints/step_<step>/ atomically and return its path; centroids: a flow model's mu_k.

    Raises ValueError if a weight is NaN/inf, OSError (naming the checkpoint) if the disk refuses a write.
    """
    checkpoints = Path(run_dir) / CHECKPOINTS_DIR
    final = checkpoints / step_dir_name(step)
    if final.exists():
        raise FileExistsError(f"checkpoint {final} already exists; refusing to overwrite it")
    weights = {MODEL_FILE: _tensors_for_saving(model_state), EMA_FILE: _tensors_for_saving(ema_state)}
    if centroids is not None:
        weights[ENCODING_FILE] = {"centroids": centroids.detach().to("cpu", torch.float32).contiguous()}
    for name, state in weights.items():
        if bad := nonfinite_counts(state):
            raise ValueError(f"refusing to save {final}: its {name} would hold NaN/inf ({describe_nonfinite(bad)})")
    temporary = checkpoints / f"{_TEMPORARY}{step_dir_name(step)}-{os.getpid()}"
    writing = "the folder"
    try:
        checkpoints.mkdir(parents=True, exist_ok=True)
        if temporary.exists():
            shutil.rmtree(temporary)
        temporary.mkdir()
        digests = {}
        for writing, data in _file_contents(weights, step, train_state, config_yaml):
            _write_file(temporary / writing, data)
            digests[writing] = hashlib.sha256(data).hexdigest()
        writing = META_FILE
        meta = {"format": FORMAT_VERSION, "step": step, "class_names": list(class_names),
                "palette": np.asarray(palette, dtype=np.uint8).tolist(), "sha256": digests}
        _write_file(temporary / META_FILE, json.dumps(meta, indent=1).encode())
        writing = "the folder"
        os.replace(temporary, final)
    except OSError as error:
        shutil.rmtree(temporary, ignore_errors=True)
        raise OSError(f"cannot write checkpoint {final} ({writing}): {error.strerror or error}; nothing was "
                      f"saved for step {step}, earlier checkpoints are intact") from error
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    _fsync_dir(checkpoints)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first: step_* directories holding meta.json (temporary,
    trash and incomplete directories are not listed)."""
    checkpoints = Path(run_dir) / CHECKPOINTS_DIR
    if not checkpoints.is_dir():
        return []
    found = [p for p in checkpoints.iterdir() if p.name.startswith(_PREFIX)
             and p.name[len(_PREFIX):].isdigit() and (p / META_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints (keep_last <= 0 keeps everything)."""
    if keep_last <= 0:
        return
    for old in list_checkpoints(run_dir)[:-keep_last]:
        trash = old.with_name(_TRASH + old.name)
        if trash.exists():
            shutil.rmtree(trash)
        os.replace(old, trash)  # atomic: from here on `old` is not listed, however far the deletion gets
        shutil.rmtree(trash)


def remove_leftovers(run_dir: str | Path) -> list[Path]:
    """Delete what killed processes left in a run folder: unfinished saves and deletions in
    checkpoints/, temporary files of write_atomically and ensure_writable_dir; returns their paths.
    Only the process that owns the run folder may call this (another one's save may be in progress)."""
    run_dir = Path(run_dir)
    found = [p for p in (run_dir / CHECKPOINTS_DIR).glob(".*") if p.name.startswith((_TEMPORARY, _TRASH))]
    found += [p for p in run_dir.glob(".*") if p.name.startswith((_TEMPORARY, _WRITE_TEST))]
    for path in found:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return found


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


def _check_meta(meta: object, file: Path) -> None:
    """Raise a ValueError naming `file` and the first thing in it that is not as save_checkpoint wrote it."""
    if not isinstance(meta, dict):
        raise ValueError(f"{file} holds a JSON {type(meta).__name__}, not an object")
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"checkpoint {file.parent} has format {meta.get('format')!r}; this flowseg reads "
                         f"format {FORMAT_VERSION}")
    missing = [key for key in ("step", "class_names", "palette", "sha256") if key not in meta]
    if missing:
        raise ValueError(f"{file} lacks the key(s) {missing}")
    step, names, palette, digests = meta["step"], meta["class_names"], meta["palette"], meta["sha256"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"{file}: step must be a whole number >= 0, got {step!r}")
    if not isinstance(names, list) or not names or not all(isinstance(name, str) for name in names):
        raise ValueError(f"{file}: class_names must be a non-empty list of strings")
    if not (isinstance(palette, list) and len(palette) == len(names) and all(
            isinstance(colour, list) and len(colour) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in colour)
            for colour in palette)):
        raise ValueError(f"{file}: palette must hold one [r, g, b] colour (0..255) per class, "
                         f"{len(names)} in all")
    if not (isinstance(digests, dict) and set(digests) - {ENCODING_FILE} == set(HASHED_FILES)
            and all(isinstance(v, str) and _SHA256.match(v) for v in digests.values())):
        raise ValueError(f"{file}: sha256 must map each of {list(HASHED_FILES)} to a hex sha256 digest")


def _sha256_of(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _verified(checkpoint: Path, digests: Mapping[str, str], name: str) -> Path:
    """The path of a checkpoint file whose content is the one recorded at saving, else a ValueError."""
    file = checkpoint / name
    try:
        digest = _sha256_of(file)
    except OSError as error:
        raise ValueError(f"cannot read {file}: {error.strerror or error}") from None
    if digest != digests[name]:
        raise ValueError(f"{file} is damaged: its content differs from what was saved (its sha256 does not "
                         f"match the one in {META_FILE})")
    return file


def read_checkpoint(path: str | Path) -> CheckpointInfo:
    """Step, resolved config, class names and palette of a checkpoint (weights are not loaded)."""
    path = resolve_checkpoint(path)
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"checkpoint {path} is unreadable: {error}") from None
    _check_meta(meta, path / META_FILE)
    config_yaml = _verified(path, meta["sha256"], CONFIG_FILE).read_text()
    return CheckpointInfo(path=path, step=meta["step"], config_yaml=config_yaml,
                          class_names=list(meta["class_names"]), sha256=dict(meta["sha256"]),
                          palette=np.asarray(meta["palette"], dtype=np.uint8))


def load_weights(path: str | Path, which: str = "ema") -> dict[str, Tensor]:
    """The "ema" or "model" state dict of a checkpoint, on CPU, once its sha256 is verified."""
    files = {"ema": EMA_FILE, "model": MODEL_FILE}
    if which not in files:
        raise ValueError(f"which must be one of {tuple(files)}, got {which!r}")
    info = read_checkpoint(path)
    file = _verified(info.path, info.sha256, files[which])
    try:
        return load_file(file, device="cpu")
    except (OSError, SafetensorError) as error:
        raise ValueError(f"cannot read weights {file}: {error}") from None


def load_centroids(path: str | Path) -> Tensor | None:
    """The centroids mu_k (N, d) a checkpoint was trained with, once their sha256 is verified; None for
    the discriminative twin, which has none."""
    info = read_checkpoint(path)
    if ENCODING_FILE not in info.sha256:
        return None
    file = _verified(info.path, info.sha256, ENCODING_FILE)
    try:
        tensors = load_file(file, device="cpu")
    except (OSError, SafetensorError) as error:
        raise ValueError(f"cannot read the encoding {file}: {error}") from None
    if "centroids" not in tensors:
        raise ValueError(f"encoding {file} holds no 'centroids' tensor")
    return tensors["centroids"]


def load_train_state(path: str | Path, expected: Mapping[str, type] | None = None) -> dict:
    """The training state of a checkpoint, once its sha256 is verified; `expected` maps keys the state
    must hold to their types."""
    info = read_checkpoint(path)
    file = _verified(info.path, info.sha256, STATE_FILE)
    try:
        # weights_only: the state holds tensors, numbers, strings and numpy RNG arrays only
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load fails in many ways (EOFError, UnpicklingError, RuntimeError, ...)
        raise ValueError(f"cannot read training state {file}: {type(error).__name__}: {error}") from None
    if not isinstance(state, dict):
        raise ValueError(f"training state {file} holds a {type(state).__name__}, not a dict")
    for key, kind in (expected or {}).items():
        if not isinstance(state.get(key), kind):
            found = type(state[key]).__name__ if key in state else "nothing"
            raise ValueError(f"training state {file}: {key!r} must be of type {kind.__name__}, found {found}")
    return state


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
                         "another model size, encoding dimension or class count, or by another version of flowseg")
    module.load_state_dict(state)


def ensure_writable_dir(path: str | Path) -> Path:
    """Create `path` if needed and check that files can be written there (before any work is done)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f"{_WRITE_TEST}{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"output folder {path} is not writable: {error.strerror or error}") from None
    return path


def write_atomically(path: str | Path, data: str | bytes) -> None:
    """Write a whole file or nothing: a temporary file beside it, then os.replace. A failed write (a
    full disk) raises an OSError naming `path`; its previous content stays."""
    path = Path(path)
    temporary = path.with_name(f"{_TEMPORARY}{path.name}-{os.getpid()}")
    try:
        _write_file(temporary, data.encode() if isinstance(data, str) else data)
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise OSError(f"cannot write {path}: {error.strerror or error}") from error
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
