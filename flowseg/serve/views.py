"""What the viewer shows, without the web page, so that all of it is testable without a browser.

    read_upload(path)                  -> (H, W, 3) uint8 RGB, or UploadError with the page's message
    ViewerModel.load(checkpoint)       -> a checkpoint's network, loaded once, that segments at any Settings
    ViewerModel.view(rgb, settings)    -> View: labels, confidence and the trajectory's frames
    legend_html / frame_caption / changes_picture / write_downloads: the pictures and text of a View

The trajectory of a flow model: every state x_{t_i}, t_i = i / S (i = 0..S), of the integration
from x_0 = image to x_1 = mask, decoded as the answer is, p_k = softmax_k(T(||x_{t_i} - mu_k||^2) / tau)
through the same grid shifts, resizing and windows (Segmenter.probabilities(every_step=True)), then
argmax_k. Its last frame is the label map. A categorical flow's frames are the argmax of the network's
posterior p_theta(x_1 | x_{t_i}) at i = 0..S-1, the last of which is its answer. The trajectory holds
up to S+1 probability maps, so where those would pass TRAJECTORY_BYTES the frames are computed on the
image scaled down to fit, and the label map apart.
"""

from __future__ import annotations

import html
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from flowseg.build import TrainedModel, load_split, load_trained
from flowseg.data.io import image_to_tensor, read_image
from flowseg.distributed import resolve_device
from flowseg.inference import Segmenter
from flowseg.visualize import colorize, image_to_uint8, overlay, save_label_png, save_rgb_png

MAX_UPLOAD_BYTES = 10 * 2**20    # an upload's file size
MAX_PIXELS = 2**20               # an upload's width x height (1024 x 1024): the trajectory holds S+1 maps of it
MAX_STEPS = 20                   # the page's step slider
QUERY_SCALES = (1, 2, 4)
TRAJECTORY_BYTES = 256 * 2**20   # float32 probabilities of all S+1 states held at once
EXAMPLES = 8                     # samples of the checkpoint's dataset offered as examples
SAMPLERS = ("euler", "heun")


class UploadError(ValueError):
    """An upload the viewer does not take; its message is shown in the page."""


def _megabytes(size: int) -> str:
    return f"{size / 2**20:.1f} MB"


def read_upload(path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an uploaded image file, read as flowseg.data.io.read_image reads images;
    a file over MAX_UPLOAD_BYTES, an image over MAX_PIXELS (checked from its header, before decoding)
    and a file that is not a readable image raise UploadError naming the file."""
    path = Path(path)
    size = os.path.getsize(path)
    if size > MAX_UPLOAD_BYTES:
        raise UploadError(f"{path.name} is {_megabytes(size)}; the viewer takes files of at most "
                          f"{_megabytes(MAX_UPLOAD_BYTES)}")
    try:
        with Image.open(path) as header:  # reads the header only
            width, height = header.size
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as error:
        if isinstance(error, Image.DecompressionBombError):
            raise UploadError(f"{path.name} is too large to decode: {error}") from None
        raise UploadError(f"{path.name} is not an image file that can be read (PNG, JPEG, BMP, TIFF, WebP, ...)") \
            from None
    if width * height > MAX_PIXELS:
        side = math.isqrt(MAX_PIXELS)
        raise UploadError(f"{path.name} is {width} x {height} pixels; the viewer takes images of at most "
                          f"{MAX_PIXELS} pixels ({side} x {side}): scale it down first")
    try:
        return read_image(path)
    except ValueError as error:  # truncated or corrupt data, 32-bit pixels: read_image says which
        raise UploadError(str(error).replace(str(path), path.name)) from None


@dataclass(frozen=True)
class Settings:
    """The page's choices; each is the eval.* setting of the same name."""
    sampler: str = "euler"
    steps: int = 1
    grid_shifts: int = 1
    query_scale: int = 1

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if not 1 <= self.steps <= MAX_STEPS:
            raise ValueError(f"steps must lie in [1, {MAX_STEPS}], got {self.steps}")
        if self.query_scale not in QUERY_SCALES:
            raise ValueError(f"query scale must be one of {QUERY_SCALES}, got {self.query_scale}")
        if self.grid_shifts < 1:
            raise ValueError(f"grid shifts must be >= 1, got {self.grid_shifts}")


@dataclass
class View:
    labels: np.ndarray          # (H, W) int64 class ids
    confidence: np.ndarray      # (H, W) float32 max_k p_k
    frames: np.ndarray | None   # (S+1, h, w) int64: x_{t_i} decoded, i = 0..S; None for the discriminative twin
    seconds: float              # wall time of the model run
    posterior: bool = False     # categorical flow: frames (S, h, w) are the posterior's argmax at i = 0..S-1

    @property
    def changes(self) -> np.ndarray | None:
        """(h, w) int64: how many steps changed each pixel's class on the way from x_0 to the answer.
        On the straight path from the image to the mask most pixels change once; 0 is a pixel whose
        colour (or first posterior) already gives its class, 2 or more one that passed through others."""
        if self.frames is None:
            return None
        return (self.frames[1:] != self.frames[:-1]).sum(axis=0)


@dataclass
class ViewerModel:
    trained: TrainedModel
    device: torch.device

    @classmethod
    def load(cls, checkpoint: str | Path, overrides: Sequence[str] = ()) -> ViewerModel:
        """A checkpoint (or a run folder: its newest) loaded once, on eval.device."""
        trained = load_trained(checkpoint, overrides)
        device = resolve_device(trained.config.eval.device)
        trained.model.to(device)
        return cls(trained, device)

    @property
    def palette(self) -> np.ndarray:
        return self.trained.info.palette

    @property
    def class_names(self) -> list[str]:
        return self.trained.info.class_names

    @property
    def patch_size(self) -> int:
        return self.trained.model.size.patch_size

    @property
    def is_flow(self) -> bool:
        return self.trained.encoding is not None

    def describe(self) -> str:
        config, info = self.trained.config, self.trained.info
        kind = "flow model" if self.is_flow else "discriminative twin"
        return (f"{config.model.size} {kind}, step {info.step}, {info.num_classes} classes of "
                f"{config.data.name} ({info.path})")

    def default_settings(self) -> Settings:
        settings = self.trained.config.eval
        return Settings(settings.sampler, min(settings.steps, MAX_STEPS), settings.grid_shifts,
                        settings.query_scale if settings.query_scale in QUERY_SCALES else 1)

    def segmenter(self, settings: Settings) -> Segmenter:
        """A Segmenter of the loaded network at `settings` (the network is shared, not copied)."""
        config = self.trained.config
        chosen = replace(config.eval, sampler=settings.sampler, steps=settings.steps,
                         grid_shifts=settings.grid_shifts, query_scale=settings.query_scale)
        return Segmenter(self.trained.model, self.trained.encoding, replace(config, eval=chosen), self.device)

    def view(self, rgb: np.ndarray, settings: Settings) -> View:
        """Segment one (H, W, 3) uint8 image at `settings`: the label map, its confidence and (flow
        models) the decoded states of the integration."""
        started = time.perf_counter()
        segmenter = self.segmenter(settings)
        image = image_to_tensor(rgb)[None]  # (1, 3, H, W) in [-1, 1]
        if not self.is_flow:
            confidence, labels = segmenter.probabilities(image).max(dim=1)
            return View(labels[0].cpu().numpy(), confidence[0].cpu().numpy(), None, time.perf_counter() - started)
        scale = trajectory_scale(image.shape[-2:], settings.steps, len(self.class_names))
        # a categorical flow's every_step ends with its answer twice (at i = S-1 and as frame S): keep one
        posterior = self.trained.config.objective.kind == "categorical"
        kept = slice(None, -1 if posterior else None)
        if scale == 1.0:  # one run: the last state's p is the answer
            confidences, frames = segmenter.probabilities(image, every_step=True)[0, kept].max(dim=1)  # (frames, H, W)
            confidence, labels = confidences[-1], frames[-1]
        else:
            confidence, labels = segmenter.probabilities(image)[0].max(dim=0)
            size = [max(1, round(side * scale)) for side in image.shape[-2:]]
            small = F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)
            frames = segmenter.probabilities(small, every_step=True)[0, kept].argmax(dim=1)  # (frames, h, w)
        return View(labels.cpu().numpy(), confidence.cpu().numpy(), frames.cpu().numpy(),
                    time.perf_counter() - started, posterior)

    def examples(self) -> list[tuple[str, np.ndarray]]:
        """(name, (H, W, 3) uint8) of the first EXAMPLES samples of the checkpoint's eval.split."""
        dataset = load_split(self.trained.config, self.trained.config.eval.split)
        samples = [dataset[index] for index in range(min(EXAMPLES, len(dataset)))]
        return [(sample["name"], image_to_uint8(sample["image"])) for sample in samples]


def trajectory_scale(size: Sequence[int], steps: int, classes: int) -> float:
    """The side scale (<= 1) at which S+1 float32 maps of N classes fit in TRAJECTORY_BYTES."""
    height, width = size
    needed = (steps + 1) * classes * height * width * 4
    return 1.0 if needed <= TRAJECTORY_BYTES else math.sqrt(TRAJECTORY_BYTES / needed)


def class_shares(labels: np.ndarray, classes: int) -> np.ndarray:
    """(N,) share of the pixels given to each class."""
    return np.bincount(labels.ravel(), minlength=classes)[:classes] / labels.size


def legend_html(labels: np.ndarray, class_names: Sequence[str], palette: np.ndarray) -> str:
    """The classes present in a label map, largest share first: colour swatch, name, share of pixels."""
    shares = class_shares(labels, len(class_names))
    present = [k for k in np.argsort(-shares, kind="stable") if shares[k] > 0]
    rows = "".join(
        f'<tr><td><span class="swatch" style="background:rgb{tuple(int(c) for c in palette[k])}"></span></td>'
        f"<td>{html.escape(class_names[k])}</td><td>{100 * shares[k]:.1f}%</td></tr>" for k in present)
    return (f'<table class="legend"><caption>{len(present)} of {len(class_names)} classes present</caption>'
            f"<tr><th></th><th>class</th><th>pixels</th></tr>{rows}</table>")


def frame_caption(view: View, index: int) -> str:
    """What frame `index` of the trajectory is, and how many pixels its step changed."""
    steps = len(view.frames) - (0 if view.posterior else 1)
    state = "the posterior p(x_1 | x_t)" if view.posterior else "x_t"
    text = f"{state} at t = {index}/{steps} = {index / steps:.2f}"
    if index == 0:
        return f"{text}: " + ("the classes the network gives the image before any step" if view.posterior
                              else "the image's colours decoded to their nearest class centroids")
    changed = (view.frames[index] != view.frames[index - 1]).mean()
    return f"{text}: step {index} changed the class of {100 * changed:.1f}% of the pixels"


def changes_picture(view: View, palette: np.ndarray) -> np.ndarray:
    """(h, w, 3) uint8: the final labels' colours, dimmed, with every pixel whose class changed on the
    way (View.changes) brightened towards white in proportion to its number of changes."""
    changes = view.changes.astype(np.float32)
    weight = (changes / max(1.0, float(changes.max())))[..., None] * (changes[..., None] > 0)  # (h, w, 1)
    dimmed = 0.35 * colorize(view.frames[-1], palette).astype(np.float32)
    return np.rint(dimmed * (1 - weight) + 255.0 * weight).astype(np.uint8)


def changes_summary(view: View) -> str:
    changes = view.changes
    end = "the answer" if view.posterior else "x_1"
    return (f"from x_0 to {end}, {100 * (changes > 0).mean():.1f}% of the pixels changed class, "
            f"{100 * (changes > 1).mean():.1f}% more than once (at most {int(changes.max())} times)")


def write_downloads(view: View, rgb: np.ndarray, palette: np.ndarray, folder: Path, stem: str) -> tuple[Path, Path]:
    """<stem>_labels.png (indexed: pixel value = class id) and <stem>_overlay.png in `folder`."""
    labels_path, overlay_path = folder / f"{stem}_labels.png", folder / f"{stem}_overlay.png"
    save_label_png(view.labels, palette, labels_path)
    save_rgb_png(overlay(image_to_tensor(rgb), view.labels, palette), overlay_path)
    return labels_path, overlay_path
