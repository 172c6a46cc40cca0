"""shapes: the dataset contract, reproducibility per (seed, split, index), shape geometry against closed
forms, and colour not identifying the class."""

import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from flowseg.data import IGNORE_INDEX, build_dataset, dataset_options
from flowseg.data.synthetic import SHAPE_CLASSES, _shape_mask, _texture_mask


def test_samples_follow_the_dataset_contract():
    dataset = build_dataset("shapes", "train", image_size=(24, 40), length=16)
    assert len(dataset) == 16
    assert dataset.num_classes == len(dataset.class_names) == len(SHAPE_CLASSES)
    assert dataset.palette.shape == (dataset.num_classes, 3) and dataset.palette.dtype == np.uint8
    assert dataset.ignore_index == IGNORE_INDEX == 255
    for index in range(len(dataset)):
        sample = dataset[index]
        image, label = sample["image"], sample["label"]
        assert image.shape == (3, 24, 40) and image.dtype == torch.float32
        assert label.shape == (24, 40) and label.dtype == torch.int64
        assert image.min() >= -1 and image.max() <= 1
        assert 0 <= label.min() and label.max() < dataset.num_classes
        assert (label > 0).any(), "every scene has at least one object"
    batch = next(iter(DataLoader(dataset, batch_size=4)))
    assert batch["image"].shape == (4, 3, 24, 40) and len(batch["name"]) == 4


def test_every_index_is_reproducible_and_seeded_by_split_and_seed():
    first = build_dataset("shapes", "train", image_size=32, length=50)
    again = build_dataset("shapes", "train", image_size=32, length=50)
    for index in (0, 7, 49):  # any order, fresh instance: same sample
        assert torch.equal(first[index]["image"], again[index]["image"])
        assert torch.equal(first[index]["label"], again[index]["label"])
    other_seed = build_dataset("shapes", "train", image_size=32, length=50, seed=1)
    other_split = build_dataset("shapes", "val", image_size=32)
    assert not torch.equal(first[0]["image"], first[1]["image"])
    assert not torch.equal(first[0]["image"], other_seed[0]["image"])
    assert not torch.equal(first[0]["image"], other_split[0]["image"])
    assert len(other_split) == 500 and len(build_dataset("shapes", "train")) == 10000


@pytest.mark.parametrize("kind, area_over_r2", [
    ("disc", math.pi),
    ("square", 2.0),                                   # side r * sqrt(2)
    ("triangle", 3 * math.sqrt(3) / 4),                # equilateral, circumradius r
    ("ring", math.pi * (1 - 0.55 ** 2)),               # outer r, inner 0.55 r
])
def test_shape_areas_match_closed_forms(kind, area_over_r2):
    radius, step = 1.0, 0.004
    grid = np.arange(-1.2, 1.2, step) + step / 2
    u, v = np.meshgrid(grid, grid)
    for angle in (0.0, 0.7):  # rotating the coordinates must not change the area
        ur, vr = math.cos(angle) * u + math.sin(angle) * v, -math.sin(angle) * u + math.cos(angle) * v
        area = _shape_mask(kind, ur, vr, radius).sum() * step * step
        assert area == pytest.approx(area_over_r2 * radius ** 2, rel=0.01)


@pytest.mark.parametrize("kind, fraction", [("striped square", 0.5), ("dotted disc", math.pi * 0.3 ** 2),
                                            ("square", 0.0)])
def test_texture_covers_the_expected_fraction_of_a_large_area(kind, fraction):
    u, v = np.meshgrid(np.arange(0, 100, 0.05), np.arange(0, 100, 0.05))
    assert _texture_mask(kind, u, v, period=2.0).mean() == pytest.approx(fraction, abs=0.01)


def test_colour_alone_does_not_identify_the_class():
    # all colours come from one distribution: each class's mean colour is mid-grey, with the same spread
    dataset = build_dataset("shapes", "train", image_size=32, length=300, seed=3)
    pixels = {k: [] for k in range(dataset.num_classes)}
    for index in range(len(dataset)):
        sample = dataset[index]
        for k in sample["label"].unique().tolist():
            pixels[k].append(sample["image"][:, sample["label"] == k].mean(dim=1))  # this object's mean colour
    for k, colours in pixels.items():
        colours = torch.stack(colours)  # (objects, 3)
        assert len(colours) > 30, f"class {SHAPE_CLASSES[k]} too rare"
        assert colours.mean(0).abs().max() < 0.15, f"class {SHAPE_CLASSES[k]} has a telltale mean colour"
        assert colours.std(0).min() > 0.3, f"class {SHAPE_CLASSES[k]} colours vary too little"


def test_augment_applies_the_joint_transform():
    dataset = build_dataset("shapes", "train", image_size=32, length=8,
                            augment={"scale_range": (0.5, 0.5), "hflip": False})
    sample = dataset[0]
    assert sample["image"].shape == (3, 32, 32)
    assert (sample["label"] == IGNORE_INDEX).any(), "half-size scene on a full-size crop leaves padding"


@pytest.mark.parametrize("kwargs, message", [
    ({"split": "training"}, "unknown split 'training'; valid splits: ['train', 'val', 'test']"),
    ({"length": 0}, "length must be a positive int"),
    ({"max_objects": 0}, "max_objects must be a positive int"),
    ({"seed": -1}, "seed must be a non-negative int"),
    ({"image_size": 0}, "image_size must be a positive int"),
    ({"image_size": None}, "image_size, which cannot be None"),
    ({"root": "/data"}, "generated and reads no files"),
    ({"colours": 3}, "unknown option(s) ['colours'] for dataset 'shapes'; valid options: ['length', 'max_objects']"),
])
def test_bad_arguments_are_named(kwargs, message):
    arguments = {"name": "shapes", "split": "train", **kwargs}
    with pytest.raises(ValueError) as error:
        build_dataset(**arguments)
    assert message in str(error.value)


def test_unknown_dataset_lists_the_valid_names():
    with pytest.raises(ValueError, match=r"unknown dataset 'shape'; valid datasets: \['shapes', 'mnist-seg'"):
        build_dataset("shape", "train")
    assert dataset_options("shapes") == ["length", "max_objects"]


def test_index_out_of_range():
    dataset = build_dataset("shapes", "val", length=3)
    with pytest.raises(IndexError, match="index 3 out of range for a dataset of length 3"):
        dataset[3]
