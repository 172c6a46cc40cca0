"""Joint transforms: labels are never interpolated, images and labels stay aligned, padding is ignore,
and the resamplers agree with hand-derived references."""

import numpy as np
import pytest
import torch

from flowseg.data import IGNORE_INDEX, AugmentConfig
from flowseg.data.transforms import (RandomScaleCropFlip, Resize, as_augment_config, as_size, build_transform,
                                     resize_pair)


def blocky_pair(height=48, width=64, block=8, seed=0):
    """A label of constant blocks with values {1, 4, 7} and an image whose channel 0 encodes it."""
    generator = np.random.default_rng(seed)
    label = generator.choice([1, 4, 7], size=(height // block, width // block)).repeat(block, 0).repeat(block, 1)
    label = torch.from_numpy(label)
    image = torch.stack([label / 10 - 0.5, torch.rand(height, width) - 0.5, torch.full((height, width), 0.25)])
    return image.float(), label


def striped_pair(axis: int, height=48, width=64, seed=0):
    """A two-class label of stripes (random widths >= 3 px, varying along `axis` only) and an image whose
    channel 0 is the label's indicator in {-0.5, 0.5}. Bilinear resampling of a step crosses the midpoint
    exactly at the step, and pixel-centre nearest neighbour moves the label step to the same place, so
    thresholding the resampled image at 0 must give back the resampled label wherever it is not a tie."""
    generator = np.random.default_rng(seed)
    length = (height, width)[axis]
    widths = generator.integers(3, 9, size=length)
    profile = np.repeat(np.arange(len(widths)) % 2, widths)[:length]  # 0/1 stripes
    indicator = torch.from_numpy(profile).float()
    indicator = indicator[:, None].expand(height, width) if axis == 0 else indicator[None, :].expand(height, width)
    label = torch.where(indicator > 0, 7, 1).long()
    image = torch.stack([indicator - 0.5, torch.rand(height, width) - 0.5, torch.full((height, width), 0.25)])
    return image, label


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("scale_range", [(0.5, 0.5), (0.7, 1.3), (2.0, 2.0)])
def test_augmentation_keeps_image_and_label_aligned(scale_range, axis):
    image, label = striped_pair(axis)
    augment = RandomScaleCropFlip((40, 40), AugmentConfig(scale_range=scale_range, image_fill=-0.75),
                                  generator=torch.Generator().manual_seed(0))
    for _ in range(10):
        out_image, out_label = augment(image, label)
        assert out_image.shape == (3, 40, 40) and out_label.shape == (40, 40) and out_label.dtype == torch.int64
        # never interpolated: only input values, or ignore from padding
        assert set(out_label.unique().tolist()) <= {1, 7, IGNORE_INDEX}
        # padded pixels carry the fill in the image and ignore in the label, and only they do
        padded = out_label == IGNORE_INDEX
        assert torch.all(out_image[:, padded] == -0.75)
        assert torch.allclose(out_image[2, ~padded], torch.tensor(0.25))
        # the label read back from the image is the label, pixel for pixel
        decided = ~padded & (out_image[0].abs() > 1e-4)
        assert decided.sum() > 0.9 * (~padded).sum()
        decoded = torch.where(out_image[0] > 0, 7, 1)
        assert torch.equal(decoded[decided], out_label[decided])


def test_flip_happens_about_half_the_time_and_is_exact():
    image, label = blocky_pair(32, 32)
    augment = RandomScaleCropFlip((32, 32), AugmentConfig(scale_range=(1.0, 1.0)),
                                  generator=torch.Generator().manual_seed(1))
    flips = 0
    for _ in range(40):
        out_image, out_label = augment(image, label)
        flipped = torch.equal(out_label, label.flip(-1)) and torch.equal(out_image, image.flip(-1))
        assert flipped or (torch.equal(out_label, label) and torch.equal(out_image, image))
        flips += flipped
    assert 10 <= flips <= 30
    no_flip = RandomScaleCropFlip((32, 32), AugmentConfig(scale_range=(1.0, 1.0), hflip=False))
    assert all(torch.equal(no_flip(image, label)[1], label) for _ in range(10))


def test_same_generator_seed_same_augmentation():
    image, label = blocky_pair()
    runs = [RandomScaleCropFlip((24, 24), generator=torch.Generator().manual_seed(5))(image, label) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def nearest_reference(label: np.ndarray, size) -> np.ndarray:
    """Pixel-centre nearest neighbour: output pixel i samples input floor((i + 1/2) * in / out)."""
    rows = np.floor((np.arange(size[0]) + 0.5) * label.shape[0] / size[0]).astype(int)
    cols = np.floor((np.arange(size[1]) + 0.5) * label.shape[1] / size[1]).astype(int)
    return label[np.ix_(rows, cols)]


@pytest.mark.parametrize("size", [(7, 5), (20, 30), (10, 13)])
def test_label_resize_is_pixel_centre_nearest_neighbour(size):
    label = torch.from_numpy(np.random.default_rng(2).choice([0, 3, 9, 255], size=(10, 13)))
    image = torch.zeros(3, 10, 13)
    _, resized = resize_pair(image, label, size)
    assert np.array_equal(resized.numpy(), nearest_reference(label.numpy(), size))


def test_image_resize_is_bilinear_on_a_linear_ramp():
    # bilinear resampling reproduces an affine function exactly at the output pixel centres (away from the
    # border, where clamping applies): value(x) = 0.1 x, sampled at x = (j + 1/2) * in / out - 1/2
    ramp = (0.1 * torch.arange(16.0)).expand(3, 8, 16)
    up, _ = resize_pair(ramp, torch.zeros(8, 16, dtype=torch.long), (8, 40))
    centres = (torch.arange(40) + 0.5) * 16 / 40 - 0.5
    inside = (centres >= 0) & (centres <= 15)
    assert torch.allclose(up[0, 0, inside], 0.1 * centres[inside], atol=1e-5)


def test_evaluation_resize_is_deterministic_and_a_noop_at_size():
    image, label = blocky_pair()
    resize = Resize((24, 32))
    first, again = resize(image, label), resize(image, label)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert first[0].shape == (3, 24, 32) and set(first[1].unique().tolist()) <= {1, 4, 7}
    same = Resize((48, 64))(image, label)
    assert same[0] is image and same[1] is label


def test_build_transform_choices():
    assert build_transform(None, None) is None
    assert build_transform(32, None) == Resize((32, 32))
    assert isinstance(build_transform((16, 24), True), RandomScaleCropFlip)
    assert build_transform(16, {"scale_range": [0.8, 1.2]}).config == AugmentConfig(scale_range=(0.8, 1.2))
    assert as_augment_config(False) is None
    assert AugmentConfig(scale_range=[0.8, 1.2]).scale_range == (0.8, 1.2)  # a list from a config file


@pytest.mark.parametrize("call, message", [
    (lambda: as_augment_config({"rotate": 10}), "unknown augment option(s) ['rotate']; valid options"),
    (lambda: as_augment_config("yes"), "augment must be None, a bool, a mapping or an AugmentConfig, got str"),
    (lambda: AugmentConfig(scale_range=(2.0, 1.0)), "scale_range must satisfy 0 < low <= high"),
    (lambda: AugmentConfig(scale_range=(1.0,)), "scale_range must be a pair (low, high), got (1.0,)"),
    (lambda: AugmentConfig(image_fill=3.0), "image_fill must lie in [-1, 1]"),
    (lambda: build_transform(None, True), "image_size cannot be None when augment is set"),
    (lambda: as_size((3, -1)), "image_size must be a positive int or a pair (H, W) of positive ints, got (3, -1)"),
    (lambda: as_size(2.5), "image_size must be a positive int"),
])
def test_bad_transform_arguments_are_named(call, message):
    with pytest.raises((ValueError, TypeError)) as error:
        call()
    assert message in str(error.value)
