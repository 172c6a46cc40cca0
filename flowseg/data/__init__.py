"""Datasets behind one interface, and `build_dataset` to make them by name.

Every dataset returns {"image": (3,H,W) float32 in [-1,1], "label": (H,W) int64 (255 = ignore),
"name": str} and carries class_names, palette (N,3) uint8, num_classes and ignore_index = 255.
"""

from __future__ import annotations

import inspect

from flowseg.data.base import IGNORE_INDEX, SegmentationDataset
from flowseg.data.layouts import ADE20KDataset, CityscapesDataset, CocoStuffDataset, FolderDataset, VOCDataset
from flowseg.data.mnist_seg import MnistSegDataset
from flowseg.data.synthetic import ShapesDataset
from flowseg.data.transforms import AugmentConfig, build_transform

# name -> dataset class; generated sets take no root, on-disk layouts require one
GENERATED = {"shapes": ShapesDataset, "mnist-seg": MnistSegDataset}
ON_DISK = {"ade20k": ADE20KDataset, "cityscapes": CityscapesDataset, "coco-stuff": CocoStuffDataset,
           "voc": VOCDataset, "folder": FolderDataset}
DATASETS = {**GENERATED, **ON_DISK}

# the arguments build_dataset passes itself; everything else a dataset's __init__ takes is an option
_COMMON_ARGS = {"self", "split", "root", "image_size", "seed", "transform"}


def dataset_options(name: str) -> list[str]:
    """The **options build_dataset accepts for dataset `name`."""
    parameters = inspect.signature(_dataset_class(name).__init__).parameters
    return [option for option in parameters if option not in _COMMON_ARGS]


def _dataset_class(name: str) -> type[SegmentationDataset]:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid datasets: {list(DATASETS)}")
    return DATASETS[name]


def build_dataset(name: str, split: str, root: str | None = None, image_size: int | tuple[int, int] | None = 64,
                  augment: bool | dict | AugmentConfig | None = None, seed: int = 0,
                  **options) -> SegmentationDataset:
    """Make dataset `name` for `split`.

    image_size: training crop size with `augment`, else the evaluation resize (None keeps the native
    resolution of on-disk images). augment: None/False (evaluation), True (default AugmentConfig), or
    a mapping / AugmentConfig. seed: drives generated content (shapes, mnist-seg).
    """
    dataset_class = _dataset_class(name)
    valid = dataset_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for dataset {name!r}; valid options: {valid}")
    transform = build_transform(image_size, augment)
    if name in GENERATED:
        if root is not None:
            raise ValueError(f"dataset {name!r} is generated and reads no files, but root={root!r} was given")
        if image_size is None:
            raise ValueError(f"dataset {name!r} is generated at image_size, which cannot be None")
        return dataset_class(split=split, image_size=image_size, seed=seed, transform=transform, **options)
    if root is None:
        raise ValueError(f"dataset {name!r} is read from disk: give root=<its folder>")
    return dataset_class(root=root, split=split, transform=transform, **options)


__all__ = ["ADE20KDataset", "AugmentConfig", "CityscapesDataset", "CocoStuffDataset", "DATASETS", "FolderDataset",
           "GENERATED", "IGNORE_INDEX", "MnistSegDataset", "ON_DISK", "SegmentationDataset", "ShapesDataset",
           "VOCDataset", "build_dataset", "dataset_options"]
