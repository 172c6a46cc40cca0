"""The dataset interface every flowseg dataset implements.

A sample is {"image": (3, H, W) float32 in [-1, 1], "label": (H, W) int64, "name": str}; the image
is what the flow starts from (x_0) and the label is what becomes the mask image x_1 = mu_label.
Label value IGNORE_INDEX (255) marks pixels that carry no class (borders, void, unlabelled).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from flowseg.data.classes import pascal_palette
from flowseg.encoding import IGNORE_INDEX

# (image (3,H,W), label (H,W)) -> (image, label), applied jointly so the two stay aligned
JointTransform = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def check_split(split: str, valid_splits) -> None:
    if split not in valid_splits:
        raise ValueError(f"unknown split {split!r}; valid splits: {list(valid_splits)}")


def check_count(what: str, value: int, allow_zero: bool = False) -> None:
    if not isinstance(value, int) or value < (0 if allow_zero else 1):
        raise ValueError(f"{what} must be a {'non-negative' if allow_zero else 'positive'} int, got {value!r}")


def check_seed(seed: int) -> None:
    # seeds feed numpy SeedSequence, which takes non-negative ints only
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")


class SegmentationDataset(Dataset):
    """Map-style dataset of (image, label, name) samples with class metadata.

    Subclasses implement `__len__` and `load(index)`, returning the sample before `transform`.
    """

    ignore_index: int = IGNORE_INDEX
    classes_file = None  # the file class_names were read from, where there is one

    def __init__(self, class_names: list[str], palette: np.ndarray | None = None,
                 transform: JointTransform | None = None):
        if len(class_names) == 0:
            raise ValueError("class_names is empty: a segmentation dataset needs at least one class")
        if len(class_names) > IGNORE_INDEX:
            raise ValueError(f"{len(class_names)} classes given; at most {IGNORE_INDEX} fit below the "
                             f"ignore label {IGNORE_INDEX}")
        self.class_names = list(class_names)
        palette = pascal_palette(len(class_names)) if palette is None else np.asarray(palette)
        if palette.shape != (len(class_names), 3) or palette.dtype != np.uint8:
            raise ValueError(f"palette must be a ({len(class_names)}, 3) uint8 array, one colour per "
                             f"class; got shape {palette.shape} dtype {palette.dtype}")
        self.palette = palette
        self.transform = transform

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def describe_classes(self) -> str:
        """"N classes", and the file they come from, for messages about a class count."""
        source = f" (listed in {self.classes_file})" if self.classes_file is not None else ""
        return f"{self.num_classes} classes{source}"

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int) -> tuple[Tensor, Tensor, str]:
        """image (3,H,W) float32 in [-1,1], label (H,W) int64, name -- before the transform."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Tensor | str]:
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"dataset index must be an int, got {type(index).__name__}")
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of length {len(self)}")
        image, label, name = self.load(int(index))
        if self.transform is not None:
            image, label = self.transform(image, label)
        return {"image": image.contiguous(), "label": label.contiguous(), "name": name}
