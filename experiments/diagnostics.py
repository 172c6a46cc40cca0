"""Diagnostics of the two failure modes of vanilla flow matching (docs/method.md, section 3).

(a) Gradient vanishing. The per-pixel training signal is ||v_tgt - v_theta||, half the norm of the
    loss gradient with respect to the network output v. For vanilla flow matching with v-prediction
    it is ||x1_hat - x_1|| / (1 - t): it fades linearly as the estimate x1_hat reaches its centroid.
    pixel_signal reads it off the objective's own training draw (FlowMatchingObjective.targets);
    signal_profile bins it by the distance ||x1_hat - mu_true||.
(b) Trajectory traversing. Along a sampled trajectory of states z_0 = x_0 (the image), z_1, ..., z_S
    (z_i = x_t at t = i / S) every state is decoded to its nearest centroid. A pixel "traverses" when
    an intermediate state (0 < i < S) is nearest to a third class: neither its true class nor the
    class its image colour x_0 starts in (starting in a wrong cell is the image's doing, not the
    field's). traversal_stats counts those pixels and those that end in a wrong class.
The vector-field picture (Figure 1 of the paper) is analytic: the velocity error that the loss
drives to zero, for a pixel of true class k whose clean estimate is x at time t,

    vanilla:   (mu_k - x) / (1 - t)
    reshaped:  (mu_k - x) / (1 - t) - lambda * dPhi/dx      (distance_correction)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from flowseg.encoding import IGNORE_INDEX, CategoryEncoding
from flowseg.flow import image_to_x0
from flowseg.correction import distance_correction
from flowseg.objective import FlowMatchingObjective, ObjectiveConfig, bounded
from flowseg.sampling import VelocityFn, integrate

NEAR_FRACTION = 0.25  # "near its centroid": closer than this fraction of the encoding's minimum spacing


def distance_bins(encoding: CategoryEncoding, count: int = 24) -> np.ndarray:
    """Log-spaced edges of ||x1_hat - mu_true||, from 1e-3 to the diagonal of the centroids' box."""
    box = encoding.centroids.amax(0) - encoding.centroids.amin(0)
    return np.geomspace(1e-3, float(box.norm()), count + 1)


@dataclass
class SignalProfile:
    """Mean training-signal magnitude per distance bin; the near-centroid mean as one number."""
    edges: list[float]           # (K + 1,) bin edges of ||x1_hat - mu_true||
    mean_signal: list[float]     # (K,) nan where a bin is empty
    counts: list[int]            # (K,) pixels per bin
    near_radius: float           # NEAR_FRACTION * min spacing
    near_signal: float           # mean signal of pixels closer than near_radius (nan if none)
    near_fraction: float         # share of the valid pixels that are that close


def signal_profile(distance: Tensor, signal: Tensor, valid: Tensor, edges: np.ndarray,
                   near_radius: float) -> SignalProfile:
    """Bin per-pixel signals (any shape, valid pixels only) by distance; out-of-range distances go to
    the first or last bin."""
    if not (distance.shape == signal.shape == valid.shape):
        raise ValueError(f"distance, signal and valid must share a shape, got {tuple(distance.shape)}, "
                         f"{tuple(signal.shape)}, {tuple(valid.shape)}")
    d = distance[valid].double().cpu().numpy()
    s = signal[valid].double().cpu().numpy()
    bins = np.clip(np.searchsorted(edges, d, side="right") - 1, 0, len(edges) - 2)
    counts = np.bincount(bins, minlength=len(edges) - 1)
    sums = np.bincount(bins, weights=s, minlength=len(edges) - 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts
    near = d < near_radius
    return SignalProfile(
        edges=[float(e) for e in edges], mean_signal=[float(m) for m in means], counts=[int(c) for c in counts],
        near_radius=near_radius, near_signal=float(s[near].mean()) if near.any() else float("nan"),
        near_fraction=float(near.mean()) if len(d) else float("nan"))


@dataclass
class PixelSignal:
    """One draw of t per image: each pixel's training signal against its clean estimate's distance."""
    t: Tensor            # (B,)
    distance: Tensor     # (B, H, W) ||x1_hat - mu_true||, 0 at ignore pixels
    signal: Tensor       # (B, H, W) ||v_tgt - v_theta||, half the norm of dL_pixel/dv
    valid: Tensor        # (B, H, W) bool, pixels with a class label


@torch.no_grad()
def pixel_signal(objective: FlowMatchingObjective, model: VelocityFn, image: Tensor, labels: Tensor,
                 progress: float = 0.0, generator: torch.Generator | None = None) -> PixelSignal:
    """The objective's own training draw (objective.targets), reduced to the two per-pixel norms."""
    f = objective.targets(model, image, labels, progress, generator)
    mu_true = objective.encoding.encode(labels, ignore_fill=f.x1_hat)  # (B, d, H, W)
    return PixelSignal(f.t, (f.x1_hat - mu_true).norm(dim=1), (f.v_target - f.v_pred).norm(dim=1), f.valid)


@torch.no_grad()
def measure_signal(objective: FlowMatchingObjective, model: VelocityFn, image: Tensor, labels: Tensor,
                   draws: int, progress: float, seed: int) -> SignalProfile:
    """The profile of `model`'s own training signal over `draws` independent draws of t per image."""
    generator = torch.Generator(image.device).manual_seed(seed)
    parts = [pixel_signal(objective, model, image, labels, progress, generator) for _ in range(draws)]
    encoding = objective.encoding
    return signal_profile(torch.stack([p.distance for p in parts]), torch.stack([p.signal for p in parts]),
                          torch.stack([p.valid for p in parts]), distance_bins(encoding),
                          NEAR_FRACTION * encoding.min_spacing())


@dataclass
class TraversalStats:
    traversed: float               # share of valid pixels whose intermediate states visit a third class
    ends_wrong: float              # share of valid pixels whose last state decodes to a wrong class
    third_class_by_state: list[float]  # (S + 1,) share of valid pixels in a third class at state i
    wrong_by_state: list[float]        # (S + 1,) share of valid pixels in a wrong class at state i
    pixels: int                    # valid pixels counted


def traversal_stats(decoded: Tensor, labels: Tensor) -> TraversalStats:
    """decoded (S + 1, B, H, W): nearest-centroid class of every state; labels (B, H, W) with 255 ignored."""
    if decoded.dim() != 4 or decoded.shape[1:] != labels.shape:
        raise ValueError(f"decoded must be (S + 1, *labels.shape) = (S + 1, {tuple(labels.shape)}), "
                         f"got {tuple(decoded.shape)}")
    if decoded.shape[0] < 2:
        raise ValueError(f"a trajectory needs at least 2 states (x_0 and x_1), got {decoded.shape[0]}")
    valid = labels != IGNORE_INDEX                          # (B, H, W)
    pixels = int(valid.sum())
    wrong = decoded != labels                               # (S + 1, B, H, W)
    third = wrong & (decoded != decoded[0])                 # neither the true nor the starting class
    traversed = third[1:-1].any(0) & valid
    share = lambda mask: float(mask.sum()) / max(pixels, 1)  # noqa: E731
    return TraversalStats(
        traversed=share(traversed), ends_wrong=share(wrong[-1] & valid),
        third_class_by_state=[share(third[i] & valid) for i in range(decoded.shape[0])],
        wrong_by_state=[share(wrong[i] & valid) for i in range(decoded.shape[0])], pixels=pixels)


@torch.no_grad()
def decode_states(states: Tensor, encoding: CategoryEncoding) -> Tensor:
    """(S + 1, B, d, H, W) -> (S + 1, B, H, W) nearest-centroid classes."""
    return torch.stack([encoding.decode(state) for state in states])


@torch.no_grad()
def sampled_traversal(model: VelocityFn, encoding: CategoryEncoding, image: Tensor, labels: Tensor,
                      steps: int) -> TraversalStats:
    """Traversal of the model's Euler trajectories from x_0 = image."""
    sample = integrate(model, image_to_x0(image, encoding.dim), image, steps, return_trajectory=True)
    return traversal_stats(decode_states(sample.trajectory, encoding), labels)


@torch.no_grad()
def straight_traversal(encoding: CategoryEncoding, image: Tensor, labels: Tensor, steps: int) -> TraversalStats:
    """Traversal of the ideal straight paths x_t = (1 - t) x_0 + t x_1 at the sampler's times: what a
    perfectly learned vanilla field would do (ignore pixels stay at x_0)."""
    x0 = image_to_x0(image, encoding.dim)
    x1 = encoding.encode(labels, ignore_fill=x0)
    times = torch.linspace(0.0, 1.0, steps + 1, dtype=x0.dtype).view(-1, 1, 1, 1, 1)
    states = (1 - times) * x0 + times * x1                # (S + 1, B, d, H, W)
    return traversal_stats(decode_states(states, encoding), labels)


@dataclass
class FieldPicture:
    grid: np.ndarray            # (G,) coordinates of both axes
    centroids: np.ndarray       # (N, 2)
    true_class: int
    vanilla: np.ndarray         # (2, G, G) velocity error field, [component, y, x]
    reshaped: np.ndarray        # (2, G, G)
    t: float
    objective: ObjectiveConfig  # the correction's transform, tau, eps, lambda and bound


def field_picture(encoding: CategoryEncoding, true_class: int, t: float = 0.5, objective: ObjectiveConfig | None = None,
                  extent: float = 1.3, points: int = 81) -> FieldPicture:
    """The vanilla and reshaped velocity-error fields over a grid of clean estimates x in [-extent,
    extent]^2 (module docstring), for a 2-d encoding and one true class; the correction uses the
    objective's transform, tau, eps, (static) lambda and bound, by default ObjectiveConfig()'s."""
    objective = objective or ObjectiveConfig()
    if encoding.dim != 2:
        raise ValueError(f"the field picture needs a 2-d encoding, got dim={encoding.dim}")
    if not 0 <= true_class < encoding.num_classes:
        raise ValueError(f"true_class must lie in [0, {encoding.num_classes}), got {true_class}")
    if not 0 <= t < 1:
        raise ValueError(f"t must lie in [0, 1), got {t}")
    grid = torch.linspace(-extent, extent, points, dtype=torch.float64)
    ys, xs = torch.meshgrid(grid, grid, indexing="ij")
    x = torch.stack([xs, ys])[None]                                      # (1, 2, G, G)
    mu = encoding.centroids.double()
    labels = torch.full((1, points, points), true_class, dtype=torch.int64)
    vanilla = (mu[true_class].view(1, 2, 1, 1) - x) / (1 - t)
    grad = distance_correction(x, labels, mu, objective.tau, objective.eps, objective.transform)
    reshaped = vanilla - bounded(objective.lam * grad, objective.correction_clip)
    return FieldPicture(grid.numpy(), mu.numpy(), true_class, vanilla[0].numpy(), reshaped[0].numpy(), t, objective)
