"""Joint image/label transforms: deterministic resize for evaluation, random scale/crop/flip for training.

Images are resampled bilinearly, labels by nearest neighbour (never interpolated: a label value is a
class id, and the mean of two ids is a third, wrong class). Both use pixel-centre sampling
(align_corners=False / "nearest-exact"), so a pixel of the label stays under the same image pixel.
Padding fills the image with `image_fill` (0 = mid-grey in [-1, 1]) and the label with IGNORE_INDEX,
so padded pixels are excluded from the loss and the metric.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from flowseg.data.base import IGNORE_INDEX, JointTransform


def as_size(size: int | tuple[int, int] | list[int], what: str = "image_size") -> tuple[int, int]:
    """An int s means (s, s); a pair means (H, W). Both must be positive ints."""
    pair = (size, size) if isinstance(size, int) else tuple(size) if isinstance(size, (tuple, list)) else None
    if pair is None or len(pair) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0
                                                 for s in pair):
        raise ValueError(f"{what} must be a positive int or a pair (H, W) of positive ints, got {size!r}")
    return pair


def resize_pair(image: Tensor, label: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Resize (3,H,W) image bilinearly (antialiased when shrinking) and (H,W) label by nearest neighbour."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image, label
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False,
                          antialias=True)[0]
    # nearest on a float copy is exact: label ids <= 255 are representable
    label = F.interpolate(label[None, None].float(), size=size, mode="nearest-exact")[0, 0].long()
    return image, label


@dataclass(frozen=True)
class Resize:
    """Deterministic resize to a fixed (H, W): the evaluation transform."""

    size: tuple[int, int]

    def __call__(self, image: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
        return resize_pair(image, label, self.size)


@dataclass
class AugmentConfig:
    """Training augmentation. The image is resized so that its shorter side is s * min(crop_size),
    s ~ U(scale_range); then a crop_size window is cut at a random place (padding with ignore where the
    image is smaller) and flipped left-right with probability 1/2 when hflip. Also the `data.augment`
    section of a run's config."""

    scale_range: tuple[float, float] = (0.5, 2.0)
    hflip: bool = True
    image_fill: float = 0.0  # padding value of the image, in [-1, 1]

    def __post_init__(self):
        self.scale_range = tuple(self.scale_range)  # a config file gives a list
        if len(self.scale_range) != 2:
            raise ValueError(f"augment scale_range must be a pair (low, high), got {self.scale_range}")
        low, high = self.scale_range
        if not 0 < low <= high:
            raise ValueError(f"augment scale_range must satisfy 0 < low <= high, got {self.scale_range}")
        if not -1.0 <= self.image_fill <= 1.0:
            raise ValueError(f"augment image_fill must lie in [-1, 1] like the images, got {self.image_fill}")


class RandomScaleCropFlip:
    """Random scale, random crop with ignore fill, random horizontal flip, applied jointly.

    Randomness comes from `generator` (torch's global RNG when None, which DataLoader workers seed).
    """

    def __init__(self, crop_size: tuple[int, int], config: AugmentConfig | None = None,
                 generator: torch.Generator | None = None):
        self.crop_size = as_size(crop_size, "crop_size")
        self.config = config or AugmentConfig()
        self.generator = generator

    def _uniform(self, low: float, high: float) -> float:
        return low + (high - low) * torch.rand((), generator=self.generator).item()

    def _randint(self, high_inclusive: int) -> int:
        return int(torch.randint(high_inclusive + 1, (), generator=self.generator))

    def __call__(self, image: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
        crop_h, crop_w = self.crop_size
        height, width = image.shape[-2:]
        ratio = self._uniform(*self.config.scale_range) * min(crop_h, crop_w) / min(height, width)
        scaled = (max(1, round(height * ratio)), max(1, round(width * ratio)))
        image, label = resize_pair(image, label, scaled)

        # place the scaled image at a random offset on a canvas at least as large as the crop,
        # then cut the crop: covers both "image larger" (pure crop) and "smaller" (pad with ignore)
        canvas_h, canvas_w = max(scaled[0], crop_h), max(scaled[1], crop_w)
        top, left = self._randint(canvas_h - scaled[0]), self._randint(canvas_w - scaled[1])
        canvas_image = image.new_full((image.shape[0], canvas_h, canvas_w), self.config.image_fill)
        canvas_label = label.new_full((canvas_h, canvas_w), IGNORE_INDEX)
        canvas_image[:, top:top + scaled[0], left:left + scaled[1]] = image
        canvas_label[top:top + scaled[0], left:left + scaled[1]] = label

        y0, x0 = self._randint(canvas_h - crop_h), self._randint(canvas_w - crop_w)
        image = canvas_image[:, y0:y0 + crop_h, x0:x0 + crop_w]
        label = canvas_label[y0:y0 + crop_h, x0:x0 + crop_w]
        if self.config.hflip and torch.rand((), generator=self.generator).item() < 0.5:
            image, label = image.flip(-1), label.flip(-1)
        return image, label


def as_augment_config(augment: bool | dict | AugmentConfig | None) -> AugmentConfig | None:
    """None/False -> no augmentation; True -> defaults; a mapping (e.g. from YAML) -> AugmentConfig(**dict)."""
    if augment is None or augment is False:
        return None
    if augment is True:
        return AugmentConfig()
    if isinstance(augment, AugmentConfig):
        return augment
    if isinstance(augment, Mapping):  # a dict or an OmegaConf DictConfig
        valid = [f.name for f in fields(AugmentConfig)]
        unknown = sorted(set(augment) - set(valid))
        if unknown:
            raise ValueError(f"unknown augment option(s) {unknown}; valid options: {valid}")
        return AugmentConfig(**augment)
    raise TypeError(f"augment must be None, a bool, a mapping or an AugmentConfig, got {type(augment).__name__}")


def build_transform(image_size: int | tuple[int, int] | None,
                    augment: bool | dict | AugmentConfig | None) -> JointTransform | None:
    """Training: RandomScaleCropFlip to image_size. Evaluation: Resize to image_size, or nothing
    (native resolution) when image_size is None."""
    config = as_augment_config(augment)
    if config is not None:
        if image_size is None:
            raise ValueError("augmentation crops to image_size, so image_size cannot be None when augment is set")
        return RandomScaleCropFlip(as_size(image_size), config)
    return None if image_size is None else Resize(as_size(image_size))
