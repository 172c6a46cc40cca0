"""Segmenting images with a trained model.

A Segmenter turns images into per-pixel class probabilities p (B, N, H, W) at the image's own
resolution, and from them labels = argmax_k p_k and confidence = max_k p_k:

    flow model:           x_0 = image, integrate dx/dt = v_theta(x, t, I) to t = 1,
                          p_k = softmax_k(T(||x_1 - mu_k||^2) / tau)
    categorical flow:     the same integration with v from the network's posterior (objective.py); p is
                          the posterior of the last step's state, p_theta(x_1 | x_{t_{S-1}}, t_{S-1}, I)
    discriminative twin:  p = softmax(logits)

For the flow model argmax_k p_k is the nearest centroid (T is decreasing), so labels equal
encoding.decode(x_1). The categorical flow's last step lands on the posterior mean sum_k p_k mu_k, whose
nearest centroid can be a third class; its p is the posterior itself. Working
with p rather than x_1 lets predictions be resized and averaged across windows without inventing
classes: the mean of two centroids can lie nearest to a third class, the mean of two p's cannot.

Inference modes (eval.inference), for images of any size:
    resize  the shorter side is scaled to data.image_size (the training resolution), p is computed
            there and resized back bilinearly;
    whole   the image is padded to a multiple of the patch and used as it is;
    slide   windows of eval.window pixels at eval.stride, p averaged where they overlap. The windows
            go through the model eval.batch_size at a time (crops of all images of the batch counted)
            and their p is added into the output as each forward ends, so memory holds one forward
            and the output, whatever the number of windows. On a terminal a progress bar appears
            once an image batch's windows have taken longer than PROGRESS_DELAY_S.
With eval.query_scale = s the trunk works at 1/s of the query resolution and the field decoder
evaluates every query pixel, so the model answers at s times the resolution its tokens see.

Grid shifts (eval.grid_shifts = k > 1): every pixel of a patch is decoded from that patch's token, so
where the patch grid falls changes the answer. p is averaged over the k x k offsets (i u / k, j u / k),
i, j < k, of the grid (u = patch_size * query_scale query pixels), each pass on the image rolled by the
offset and its p rolled back. A pixel whose patch straddles the wrap seam of a shifted pass (the first
patch row or column of the rolled image) takes only the passes without that seam, the unshifted one at
least. k^2 passes cost k^2 times the inference.

Settings. Everything a Segmenter does is read from the config's eval section (steps, sampler, mode,
eval.precision for autocast), data.image_size and the objective's kind, parameterization (what the
network outputs), tau, eps and T; none of it from the train section. Where it runs is the caller's
choice, passed as `device`: flowseg.build.load_segmenter resolves eval.device, the trainer validates on
each rank's own device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from flowseg.config import Config
from flowseg.distributed import autocast
from flowseg.encoding import CategoryEncoding
from flowseg.flow import image_to_x0
from flowseg.objective import FlowMatchingObjective
from flowseg.sampling import integrate

PROGRESS_DELAY_S = 2.0  # a progress bar (on a terminal) appears once sliding inference has run this long


@dataclass
class Prediction:
    labels: Tensor        # (B, H, W) int64
    confidence: Tensor    # (B, H, W) max_k p_k in [1/N, 1]


class Segmenter:
    """Runs a flow model (with its encoding) or a discriminative twin on images of any size, on
    `device` (default: where the model's parameters are)."""

    def __init__(self, model: nn.Module, encoding: CategoryEncoding | None, config: Config,
                 device: torch.device | None = None):
        self.device = device or next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.encoding = encoding.to(self.device) if encoding is not None else None
        # turns the network's output into v: v itself, x1_hat (x-prediction) or class logits (categorical)
        self.objective = FlowMatchingObjective(self.encoding, config.objective) if encoding is not None else None
        self.config = config
        self.patch = model.size.patch_size
        shifts = config.eval.grid_shifts
        if self.patch % shifts:
            raise ValueError(f"eval.grid_shifts={shifts} must divide the model's patch size {self.patch}, "
                             "so that every grid offset is a whole number of the trunk's pixels")

    @property
    def is_flow(self) -> bool:
        return self.encoding is not None

    def _probabilities_at(self, image: Tensor, steps: int, every_step: bool) -> Tensor:
        """p (B, N, H, W) for an image whose sides are multiples of patch_size * query_scale, averaged
        over the eval.grid_shifts^2 offsets of the patch grid (module docstring); every_step: p of
        every state x_0..x_S, (B (S+1), N, H, W) image-major."""
        shifts = self.config.eval.grid_shifts
        if shifts == 1:
            return self._one_pass(image, steps, every_step)
        unit = self.patch * self.config.eval.query_scale
        height, width = image.shape[-2:]
        offsets = [i * unit // shifts for i in range(shifts)]
        total = counts = None
        for dy in offsets:
            for dx in offsets:
                p = self._one_pass(torch.roll(image, (dy, dx), dims=(-2, -1)), steps, every_step)
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

    def _one_pass(self, image: Tensor, steps: int, every_step: bool) -> Tensor:
        scale = self.config.eval.query_scale
        with autocast(self.device, self.config.eval.precision):
            if not self.is_flow:
                return torch.softmax(self.model(image, query_scale=scale).out.float(), dim=1)

            categorical = self.config.objective.kind == "categorical"
            posteriors: dict[int, Tensor] = {}  # categorical: step index i -> p_theta(x_1 | x_{t_i}), (B, N, H, W)

            def velocity(x: Tensor, t: Tensor, img: Tensor) -> Tensor:
                out = self.model(x, t, img, query_scale=scale).out.float()
                if categorical:
                    # the last call at each t_i is at the state x_i (Heun's predictor at t_i comes before it);
                    # without every_step only the answer's, at t_{S-1}, is kept
                    index = round(float(t[0]) * steps)
                    if every_step or index == steps - 1:
                        posteriors[index] = out.softmax(1)
                return self.objective.velocity(out, x, t)

            sample = integrate(velocity, image_to_x0(image, self.encoding.dim), image, steps,
                               self.config.eval.sampler, return_trajectory=every_step)
        if categorical:  # the posteriors at x_0..x_{S-1}, then the answer (the one at x_{S-1}) again
            if not every_step:
                return posteriors[steps - 1]
            return torch.stack([posteriors[i] for i in range(steps)] + [posteriors[steps - 1]], 1).flatten(0, 1)
        # (S+1, B, d, H, W) -> (B (S+1), d, H, W): each image's states side by side, so the shifts,
        # resizing and windows below treat them as a batch
        states = sample.trajectory.transpose(0, 1).flatten(0, 1) if every_step else sample.x1
        objective = self.config.objective
        return self.encoding.soft_assign(states, objective.tau, objective.eps, objective.transform)

    def _resized(self, image: Tensor, steps: int, every_step: bool) -> Tensor:
        height, width = image.shape[-2:]
        ratio = self.config.data.image_size / min(height, width)
        scale = self.config.eval.query_scale
        size = tuple(max(1, round(side * ratio / self.patch)) * self.patch * scale for side in (height, width))
        resized = image if size == (height, width) else \
            F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)
        probabilities = self._probabilities_at(resized, steps, every_step)
        if size == (height, width):
            return probabilities
        return F.interpolate(probabilities, size=(height, width), mode="bilinear", align_corners=False)

    def _padded(self, image: Tensor, multiple_h: int, multiple_w: int) -> Tensor:
        height, width = image.shape[-2:]
        pad_h, pad_w = (-height) % multiple_h, (-width) % multiple_w
        return F.pad(image, (0, pad_w, 0, pad_h)) if pad_h or pad_w else image

    def _whole(self, image: Tensor, steps: int, every_step: bool) -> Tensor:
        unit = self.patch * self.config.eval.query_scale
        height, width = image.shape[-2:]
        return self._probabilities_at(self._padded(image, unit, unit), steps, every_step)[..., :height, :width]

    def _sliding(self, image: Tensor, steps: int, every_step: bool) -> Tensor:
        window = self.config.eval.window or self.config.data.image_size * self.config.eval.query_scale
        unit = self.patch * self.config.eval.query_scale
        if window % unit:
            raise ValueError(f"eval.window={window} must be a multiple of patch_size * query_scale = {unit}")
        stride = self.config.eval.stride or max(1, window * 2 // 3)
        batch, height, width = image.shape[0], *image.shape[-2:]
        padded = F.pad(image, (0, max(0, window - width), 0, max(0, window - height)))
        full_h, full_w = padded.shape[-2:]
        tops = sorted({*range(0, full_h - window, stride), full_h - window})
        lefts = sorted({*range(0, full_w - window, stride), full_w - window})
        corners = [(top, left) for top in tops for left in lefts]
        # eval.batch_size crops per forward (at least one window of every image): memory stays that of
        # one forward plus the output, however many windows the image has
        per_forward = max(1, self.config.eval.batch_size // batch)
        total = counts = None
        with tqdm(total=len(corners), desc="slide", unit="window", leave=False, disable=None,
                  delay=PROGRESS_DELAY_S) as bar:
            for start in range(0, len(corners), per_forward):
                group = corners[start:start + per_forward]
                crops = torch.cat([padded[..., top:top + window, left:left + window] for top, left in group])
                p = self._probabilities_at(crops, steps, every_step)  # (len(group) * R, N, window, window)
                rows = p.shape[0] // len(group)  # R: B, or B (S+1) with every_step; window-major
                if total is None:
                    total = p.new_zeros(rows, p.shape[1], full_h, full_w)
                    counts = p.new_zeros(1, 1, full_h, full_w)
                for (top, left), p_window in zip(group, p.split(rows)):
                    total[..., top:top + window, left:left + window] += p_window
                    counts[..., top:top + window, left:left + window] += 1
                bar.update(len(group))
        return total.div_(counts)[..., :height, :width]  # in place: no second copy of the output

    @torch.no_grad()
    def probabilities(self, image: Tensor, steps: int | None = None, every_step: bool = False) -> Tensor:
        """image (B, 3, H, W) in [-1, 1] -> p (B, N, H, W) by the configured inference mode.

        every_step (flow models): p_k = softmax_k(T(||x_{t_i} - mu_k||^2) / tau) of every state of the
        integration, t_i = i / S for i = 0..S (categorical: the posterior at x_0..x_{S-1}, then the answer),
        each through the same shifts, resizing and windows as the answer: (B, S+1, N, H, W), whose last
        state is the answer p. It holds S+1 times the memory."""
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"image must have shape (B, 3, H, W), got {tuple(image.shape)}")
        if every_step and not self.is_flow:
            raise ValueError("every_step needs a flow model: the discriminative twin has no states x_t")
        steps = self.config.eval.steps if steps is None else steps
        mode = {"resize": self._resized, "whole": self._whole, "slide": self._sliding}[self.config.eval.inference]
        p = mode(image.to(self.device), steps, every_step)
        return p.unflatten(0, (image.shape[0], steps + 1)) if every_step else p

    def predict(self, image: Tensor, steps: int | None = None) -> Prediction:
        confidence, labels = self.probabilities(image, steps).max(dim=1)
        return Prediction(labels=labels, confidence=confidence)
