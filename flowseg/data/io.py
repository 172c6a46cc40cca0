"""Reading dataset files: RGB images and single-channel label PNGs, with errors that name the file.

An image is read as it is displayed: a JPEG's EXIF orientation is applied (as OpenCV's and Pillow's
readers in mmsegmentation and detectron2 do), and a 16-bit greyscale image is scaled by its bit depth,
v -> round(v * 255 / 65535), not clipped at 255. 32-bit integer and floating-point images have no
standard 8-bit reading and are refused.

A label PNG holds one class id per pixel: greyscale ("L"), 16/32-bit ("I;16", "I") or palette-indexed
("P", as in VOC, whose pixel values are the ids and whose palette only colours them). A colour
rendering of a label (RGB) cannot be read as ids and is refused. Label values are read as stored, with
no EXIF orientation applied (mmsegmentation reads them "unchanged" too): a dataset stores its label
maps in the orientation in which its images are displayed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from flowseg.encoding import IGNORE_INDEX

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
LABEL_MODES = ("L", "P", "I;16", "I", "1")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")  # how Pillow opens 16-bit greyscale files


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


def _displayed(picture: Image.Image) -> Image.Image:
    """The picture in its EXIF orientation. EXIF that Pillow cannot parse (it raises SyntaxError,
    struct.error, ... from deep inside its TIFF reader) carries no orientation to trust: then the
    pixels are taken as stored, as viewers do."""
    try:
        return ImageOps.exif_transpose(picture)
    except Exception:  # a failure to parse the metadata only: the pixels are decoded already
        return picture


def read_image(path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB from any image file PIL reads (greyscale, palette and RGBA become RGB), in
    its displayed orientation and with 16-bit greyscale scaled to 8 bits."""
    picture = _displayed(_open(Path(path), "image"))
    if picture.mode in SIXTEEN_BIT_MODES:
        grey = np.rint(np.asarray(picture, dtype=np.float64) * (255 / 65535)).astype(np.uint8)  # (H, W)
        return np.repeat(grey[..., None], 3, axis=2)
    if picture.mode in ("I", "F"):
        raise ValueError(f"image file {path} holds {'32-bit integer' if picture.mode == 'I' else 'floating-point'} "
                         f"pixels (mode {picture.mode}), which have no standard 8-bit reading; save it as an "
                         f"8- or 16-bit image")
    return np.array(picture.convert("RGB"))  # a writable copy, as torch wants


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
