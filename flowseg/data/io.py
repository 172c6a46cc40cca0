"""Reading dataset files: RGB images and single-channel label PNGs, with errors that name the file.

A label PNG holds one class id per pixel: greyscale ("L"), 16/32-bit ("I;16", "I") or palette-indexed
("P", as in VOC, whose pixel values are the ids and whose palette only colours them). A colour
rendering of a label (RGB) cannot be read as ids and is refused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from flowseg.encoding import IGNORE_INDEX

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
LABEL_MODES = ("L", "P", "I;16", "I", "1")


def _open(path: Path, what: str) -> Image.Image:
    """Open and fully decode (so truncated files fail here, not later)."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    try:
        with Image.open(path) as handle:
            handle.load()
            return handle.copy()
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"cannot read {what} file {path}: {error}") from None


def read_image(path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB from any image file PIL reads (greyscale, palette and RGBA become RGB)."""
    return np.array(_open(Path(path), "image").convert("RGB"))  # a writable copy, as torch wants


def read_label(path: str | Path) -> np.ndarray:
    """(H, W) int64 class ids from a single-channel or palette-indexed label PNG."""
    picture = _open(Path(path), "label")
    if picture.mode not in LABEL_MODES:
        raise ValueError(f"label file {path} has image mode {picture.mode}; a label map holds one class id per "
                         f"pixel (modes {', '.join(LABEL_MODES)}), not a colour rendering")
    return np.asarray(picture).astype(np.int64)


def image_to_tensor(rgb: np.ndarray) -> Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [-1, 1]: x_0 of the flow."""
    return torch.from_numpy(rgb).permute(2, 0, 1).float() / 127.5 - 1.0


def check_label_values(label: np.ndarray, path: str | Path, num_classes: int, zero_is_ignore: bool = False) -> None:
    """Every value must be a class id or IGNORE_INDEX. With zero_is_ignore (ADE20K's reduce_zero_label)
    file values run 0..N, 0 meaning ignore and k meaning class k-1."""
    high = num_classes if zero_is_ignore else num_classes - 1
    bad = ((label < 0) | (label > high)) & (label != IGNORE_INDEX)
    if bad.any():
        values = np.unique(label[bad])
        meaning = f"0 = ignore, 1..{high} = the {num_classes} classes" if zero_is_ignore else f"{num_classes} classes"
        raise ValueError(f"label file {path} has value {int(values[0])} ({int(bad.sum())} pixels; all bad values: "
                         f"{values[:10].tolist()}) outside the class range 0..{high} ({meaning}); "
                         f"{IGNORE_INDEX} = ignore")
