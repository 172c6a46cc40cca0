"""`shapes`: procedurally generated scenes of textured shapes on a noisy background.

Classes differ by outline (disc, square, triangle, ring) and by fill texture (a striped square vs a
plain square, a dotted disc vs a plain disc). Every colour -- objects, stripes, dots, background -- is
drawn from one shared distribution, so colour alone never identifies a class: segmenting it takes
learning shape and texture. Sample `index` of split `split` is generated from the seed sequence
(seed, split id, index), so any index is reproducible in any process (DistributedSampler-safe) and the
dataset is as long as asked ("infinite" in practice).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from flowseg.data.base import JointTransform, SegmentationDataset, check_count, check_seed, check_split
from flowseg.data.transforms import as_size

SHAPE_CLASSES = ["background", "disc", "square", "triangle", "ring", "striped square", "dotted disc"]
SPLITS = {"train": 0, "val": 1, "test": 2}
DEFAULT_LENGTHS = {"train": 10000, "val": 500, "test": 500}


def _shape_mask(kind: str, u: np.ndarray, v: np.ndarray, radius: float) -> np.ndarray:
    """Pixels inside a shape of circumradius `radius`, in the shape's own rotated coordinates (u, v)."""
    dist = np.hypot(u, v)
    if kind in ("disc", "dotted disc"):
        return dist <= radius
    if kind in ("square", "striped square"):
        half = radius / np.sqrt(2.0)
        return np.maximum(np.abs(u), np.abs(v)) <= half
    if kind == "triangle":
        # equilateral: inside all three edges, each at distance radius/2 from the centre
        angles = np.pi / 2 + 2 * np.pi * np.arange(3) / 3
        return np.all([np.cos(a) * u + np.sin(a) * v <= radius / 2 for a in angles], axis=0)
    if kind == "ring":
        return (dist <= radius) & (dist >= 0.55 * radius)
    raise ValueError(f"unknown shape kind {kind!r}")


def _texture_mask(kind: str, u: np.ndarray, v: np.ndarray, period: float) -> np.ndarray:
    """Where the second colour of a textured fill shows (stripes along v, or a grid of dots)."""
    if kind == "striped square":
        return np.floor(u / (period / 2)) % 2 == 0
    if kind == "dotted disc":
        du, dv = (u % period) - period / 2, (v % period) - period / 2
        return du * du + dv * dv <= (0.3 * period) ** 2
    return np.zeros_like(u, dtype=bool)


def render_shapes(rng: np.random.Generator, size: tuple[int, int],
                  max_objects: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """One scene: image (H,W,3) float32 in [0,1] and label (H,W) int64. Later objects occlude earlier ones."""
    height, width = size
    scale = min(height, width)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5  # pixel centres, (H, W) each

    # background (class 0): a random colour, a smooth gradient and per-pixel grain
    direction = rng.normal(size=2)
    gradient = (direction[0] * (x / width - 0.5) + direction[1] * (y / height - 0.5))[..., None]
    image = rng.uniform(0, 1, size=3) + 0.25 * gradient * rng.uniform(-1, 1, size=3)  # (H, W, 3)
    image = image + rng.normal(0, 0.06, size=(height, width, 3))
    label = np.zeros((height, width), dtype=np.int64)

    for _ in range(rng.integers(1, max_objects + 1)):
        class_id = int(rng.integers(1, len(SHAPE_CLASSES)))
        kind = SHAPE_CLASSES[class_id]
        radius = scale * rng.uniform(0.12, 0.3)
        cy, cx = rng.uniform(0.1, 0.9) * height, rng.uniform(0.1, 0.9) * width
        angle = rng.uniform(0, 2 * np.pi)
        u = np.cos(angle) * (x - cx) + np.sin(angle) * (y - cy)
        v = -np.sin(angle) * (x - cx) + np.cos(angle) * (y - cy)
        inside = _shape_mask(kind, u, v, radius)
        textured = inside & _texture_mask(kind, u, v, period=max(4.0, radius * rng.uniform(0.35, 0.6)))
        image[inside] = rng.uniform(0, 1, size=3)
        image[textured] = rng.uniform(0, 1, size=3)
        label[inside] = class_id

    image = image + rng.normal(0, 0.02, size=image.shape)  # mild sensor noise over everything
    return np.clip(image, 0, 1).astype(np.float32), label


class ShapesDataset(SegmentationDataset):
    """Procedural shapes; `length` samples (defaults: train 10000, val/test 500), each image_size square."""

    def __init__(self, split: str = "train", image_size: int | tuple[int, int] = 64, seed: int = 0,
                 length: int | None = None, max_objects: int = 4, transform: JointTransform | None = None):
        check_split(split, SPLITS)
        check_seed(seed)
        super().__init__(SHAPE_CLASSES, transform=transform)
        self.length = DEFAULT_LENGTHS[split] if length is None else length
        check_count("shapes length", self.length)
        check_count("shapes max_objects", max_objects)
        self.split, self.size, self.seed, self.max_objects = split, as_size(image_size), seed, max_objects

    def __len__(self) -> int:
        return self.length

    def load(self, index: int) -> tuple[Tensor, Tensor, str]:
        rng = np.random.default_rng([self.seed, SPLITS[self.split], index])
        image, label = render_shapes(rng, self.size, self.max_objects)
        image = torch.from_numpy(image).permute(2, 0, 1) * 2 - 1  # (3, H, W) in [-1, 1]
        return image, torch.from_numpy(label), f"shapes_{self.split}_{index:06d}"
