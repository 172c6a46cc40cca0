"""Segmenting images with a trained model.

A Segmenter turns images into per-pixel class probabilities p (B, N, H, W) at the image's own
resolution, and from them labels = argmax_k p_k and confidence = max_k p_k:

    flow model:           x_0 = image, integrate dx/dt = v_theta(x, t, I) to t = 1,
                          p_k = softmax_k(T(||x_1 - mu_k||^2) / tau)
    discriminative twin:  p = softmax(logits)

argmax_k p_k is the nearest centroid (T is decreasing), so labels equal encoding.decode(x_1). Working
with p rather than x_1 lets predictions be resized and averaged across windows without inventing
classes: the mean of two centroids can lie nearest to a third class, the mean of two p's cannot.

Inference modes (eval.inference), for images of any size:
    resize  the shorter side is scaled to data.image_size (the training resolution), p is computed
            there and resized back bilinearly;
    whole   the image is padded to a multiple of the patch and used as it is;
    slide   windows of eval.window pixels at eval.stride, p averaged where they overlap.
With eval.query_scale = s the trunk works at 1/s of the query resolution and the field decoder
evaluates every query pixel, so the model answers at s times the resolution its tokens see.

Grid shifts (eval.grid_shifts = k > 1): every pixel of a patch is decoded from that patch's token, so
where the patch grid falls changes the answer. p is averaged over the k x k offsets (i u / k, j u / k),
i, j < k, of the grid (u = patch_size * query_scale query pixels), each pass on the image rolled by the
offset and its p rolled back. A pixel whose patch straddles the wrap seam of a shifted pass (the first
patch row or column of the rolled image) takes only the passes without that seam, the unshifted one at
least. k^2 passes cost k^2 times the inference.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowseg.checkpoint import CheckpointInfo, ensure_writable_dir, fit_state_dict, load_weights, read_checkpoint
from flowseg.config import Config, config_from_yaml
from flowseg.data.io import IMAGE_EXTENSIONS, image_to_tensor, read_image
from flowseg.distributed import autocast, resolve_device
from flowseg.encoding import CategoryEncoding, build_encoding
from flowseg.flow import image_to_x0
from flowseg.models import build_model
from flowseg.sampling import integrate
from flowseg.visualize import confidence_image, overlay, save_label_png, save_rgb_png

def build_network(config: Config, num_classes: int) -> tuple[nn.Module, CategoryEncoding | None]:
    """The model a config describes, and its category encoding (None for the discriminative twin)."""
    token_classes = num_classes if config.model.token_head else None
    if config.model.kind == "discriminative":
        return build_model("discriminative", config.model.size, num_classes=num_classes,
                           token_classes=token_classes, stem=config.model.stem), None
    encoding = build_encoding(config.model.encoding, num_classes, config.model.dim, seed=config.train.seed)
    model = build_model("flow", config.model.size, dim=encoding.dim,
                        image_conditioning=config.model.image_conditioning, token_classes=token_classes,
                        stem=config.model.stem)
    return model, encoding


@dataclass
class Prediction:
    labels: Tensor        # (B, H, W) int64
    confidence: Tensor    # (B, H, W) max_k p_k in [1/N, 1]


class Segmenter:
    """Runs a flow model (with its encoding) or a discriminative twin on images of any size."""

    def __init__(self, model: nn.Module, encoding: CategoryEncoding | None, config: Config,
                 device: torch.device | None = None):
        self.device = device or next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.encoding = encoding.to(self.device) if encoding is not None else None
        self.config = config
        self.patch = model.size.patch_size
        shifts = config.eval.grid_shifts
        if self.patch % shifts:
            raise ValueError(f"eval.grid_shifts={shifts} must divide the model's patch size {self.patch}, "
                             "so that every grid offset is a whole number of the trunk's pixels")

    @property
    def is_flow(self) -> bool:
        return self.encoding is not None

    def _probabilities_at(self, image: Tensor, steps: int) -> Tensor:
        """p (B, N, H, W) for an image whose sides are multiples of patch_size * query_scale, averaged
        over the eval.grid_shifts^2 offsets of the patch grid (module docstring)."""
        shifts = self.config.eval.grid_shifts
        if shifts == 1:
            return self._one_pass(image, steps)
        unit = self.patch * self.config.eval.query_scale
        height, width = image.shape[-2:]
        offsets = [i * unit // shifts for i in range(shifts)]
        total = counts = None
        for dy in offsets:
            for dx in offsets:
                p = self._one_pass(torch.roll(image, (dy, dx), dims=(-2, -1)), steps)
                p = torch.roll(p, (-dy, -dx), dims=(-2, -1))  # back to the image's pixels
                # the rolled image's first patch row/column holds the seam: rows [0, u - dy) and
                # [H - dy, H) of the image (likewise for columns) are decoded from a patch mixing both ends
                weight = p.new_ones(height, width)
                if dy:
                    weight[:unit - dy] = weight[height - dy:] = 0
                if dx:
                    weight[:, :unit - dx] = weight[:, width - dx:] = 0
                total = p * weight if total is None else total + p * weight
                counts = weight if counts is None else counts + weight
        return total / counts

    def _one_pass(self, image: Tensor, steps: int) -> Tensor:
        scale = self.config.eval.query_scale
        with autocast(self.device, self.config.train.precision):
            if not self.is_flow:
                return torch.softmax(self.model(image, query_scale=scale).out.float(), dim=1)

            def velocity(x: Tensor, t: Tensor, img: Tensor) -> Tensor:
                return self.model(x, t, img, query_scale=scale).out.float()

            sample = integrate(velocity, image_to_x0(image, self.encoding.dim), image, steps,
                               self.config.eval.sampler)
        objective = self.config.objective
        return self.encoding.soft_assign(sample.x1, objective.tau, objective.eps, objective.transform)

    def _resized(self, image: Tensor, steps: int) -> Tensor:
        height, width = image.shape[-2:]
        ratio = self.config.data.image_size / min(height, width)
        scale = self.config.eval.query_scale
        size = tuple(max(1, round(side * ratio / self.patch)) * self.patch * scale for side in (height, width))
        resized = image if size == (height, width) else \
            F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)
        probabilities = self._probabilities_at(resized, steps)
        if size == (height, width):
            return probabilities
        return F.interpolate(probabilities, size=(height, width), mode="bilinear", align_corners=False)

    def _padded(self, image: Tensor, multiple_h: int, multiple_w: int) -> Tensor:
        height, width = image.shape[-2:]
        pad_h, pad_w = (-height) % multiple_h, (-width) % multiple_w
        return F.pad(image, (0, pad_w, 0, pad_h)) if pad_h or pad_w else image

    def _whole(self, image: Tensor, steps: int) -> Tensor:
        unit = self.patch * self.config.eval.query_scale
        height, width = image.shape[-2:]
        return self._probabilities_at(self._padded(image, unit, unit), steps)[..., :height, :width]

    def _sliding(self, image: Tensor, steps: int) -> Tensor:
        window = self.config.eval.window or self.config.data.image_size * self.config.eval.query_scale
        unit = self.patch * self.config.eval.query_scale
        if window % unit:
            raise ValueError(f"eval.window={window} must be a multiple of patch_size * query_scale = {unit}")
        stride = self.config.eval.stride or max(1, window * 2 // 3)
        height, width = image.shape[-2:]
        padded = F.pad(image, (0, max(0, window - width), 0, max(0, window - height)))
        full_h, full_w = padded.shape[-2:]
        tops = sorted({*range(0, full_h - window, stride), full_h - window})
        lefts = sorted({*range(0, full_w - window, stride), full_w - window})
        total = counts = None
        for top in tops:
            for left in lefts:
                p = self._probabilities_at(padded[..., top:top + window, left:left + window], steps)
                if total is None:
                    total = p.new_zeros(*p.shape[:2], full_h, full_w)
                    counts = p.new_zeros(1, 1, full_h, full_w)
                total[..., top:top + window, left:left + window] += p
                counts[..., top:top + window, left:left + window] += 1
        return (total / counts)[..., :height, :width]

    @torch.no_grad()
    def probabilities(self, image: Tensor, steps: int | None = None) -> Tensor:
        """image (B, 3, H, W) in [-1, 1] -> p (B, N, H, W) by the configured inference mode."""
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"image must have shape (B, 3, H, W), got {tuple(image.shape)}")
        steps = self.config.eval.steps if steps is None else steps
        mode = {"resize": self._resized, "whole": self._whole, "slide": self._sliding}[self.config.eval.inference]
        return mode(image.to(self.device), steps)

    def predict(self, image: Tensor, steps: int | None = None) -> Prediction:
        confidence, labels = self.probabilities(image, steps).max(dim=1)
        return Prediction(labels=labels, confidence=confidence)


def load_segmenter(checkpoint: str | Path, overrides: Sequence[str] = ()) -> tuple[Segmenter, CheckpointInfo]:
    """A Segmenter from a checkpoint alone; `overrides` adjust the saved config (eval.*, data.*, ...)."""
    info = read_checkpoint(checkpoint)
    origin = f"config of checkpoint {info.path}"
    saved = config_from_yaml(info.config_yaml, origin=origin)
    config = config_from_yaml(info.config_yaml, overrides, origin=origin)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    model, encoding = build_network(config, info.num_classes)
    weights = load_weights(info.path, "ema" if config.eval.use_ema else "model")
    fit_state_dict(model, weights, f"checkpoint {info.path} (model.kind={saved.model.kind}, "
                   f"model.size={saved.model.size}, {info.num_classes} classes)")
    return Segmenter(model, encoding, config, resolve_device(config.train.device)), info


def expand_inputs(inputs: Sequence[str]) -> list[Path]:
    """Image files named directly, inside folders (not recursive), or matched by glob patterns."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if any(char in item for char in "*?["):
            matches = sorted(Path(match) for match in glob.glob(item))
            if not matches:
                raise FileNotFoundError(f"no file matches the pattern {item!r}")
            found += [match for match in matches if match.is_file()]
        elif path.is_dir():
            images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            if not images:
                raise ValueError(f"folder {path} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            found += images
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"input image {path} does not exist")
    if not found:
        raise ValueError("no input images given")
    return found


def output_stems(paths: Sequence[Path]) -> list[str]:
    """File stems for the outputs; inputs that share a stem (a/x.png, b/x.jpg) get a numeric suffix."""
    seen: dict[str, int] = {}
    stems = []
    for path in paths:
        count = seen.get(path.stem, 0)
        seen[path.stem] = count + 1
        stems.append(path.stem if count == 0 else f"{path.stem}_{count}")
    return stems


@dataclass
class PredictedFile:
    source: Path
    labels: Path
    overlay: Path
    confidence: Path
    mean_confidence: float


def predict_files(segmenter: Segmenter, info: CheckpointInfo, inputs: Sequence[str],
                  out_dir: str | Path) -> list[PredictedFile]:
    """Segment every input image; write <stem>.png (palette labels), <stem>_overlay.png and
    <stem>_confidence.png to out_dir at the input's resolution. All inputs are read before anything
    is written, so a bad input leaves no partial output."""
    paths = expand_inputs(inputs)
    images = [image_to_tensor(read_image(path)) for path in paths]
    out_dir = ensure_writable_dir(out_dir)
    results = []
    for path, stem, image in zip(paths, output_stems(paths), images):
        prediction = segmenter.predict(image[None])
        labels, confidence = prediction.labels[0].cpu(), prediction.confidence[0].cpu()
        written = PredictedFile(path, out_dir / f"{stem}.png", out_dir / f"{stem}_overlay.png",
                                out_dir / f"{stem}_confidence.png", float(confidence.mean()))
        save_label_png(labels, info.palette, written.labels)
        save_rgb_png(overlay(image, labels, info.palette), written.overlay)
        save_rgb_png(confidence_image(confidence, 1.0 / info.num_classes), written.confidence)
        results.append(written)
    return results
