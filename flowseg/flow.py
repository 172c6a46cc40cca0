"""The straight path from an image to its mask (docs/method.md, section 1).

x_1 is the encoded mask, x_t = (1 - t) x_0 + t x_1 and the target velocity v* = x_1 - x_0. x_0 is the
image in [-1, 1] mapped to d channels, x_0 = A I, plus, in training, Gaussian noise:

    x_0 = A I + sigma eps,   eps ~ N(0, 1)          (sigma = 0: the paper's deterministic path)

Why the noise: with sigma = 0 and I given to the network, every x_t with t > 0 reveals the answer,
x_1 = (x_t - (1 - t) A I) / t, so only t = 0 is learned and later sampling steps only copy the first.
With sigma > 0 the network sees x_1 through noise of std sigma (1 - t) / t, so each t is a denoising
problem of its own. Sampling starts from the mean of x_0, A I: along the learned flow that start goes
to the most likely class of each pixel, where the one-step answer is the posterior mean of the mu_k,
which can lie nearest a third class.
"""
from __future__ import annotations

import torch
from torch import Tensor

PARAMETERIZATIONS = ("v", "x")
# x-prediction divides by 1 - t to get a velocity; clipping the gap keeps v finite near t = 1
# (the same clip, 0.05, as the x-prediction pixel transformers JiT/PixNerd-style models use).
MIN_TIME_GAP = 0.05


def x0_projection(dim: int, device: torch.device | str | None = None) -> Tensor:
    """The fixed (d, 3) matrix A with x_0 = A image, rows are convex combinations of R, G, B.

    d >= 3: channel j copies image channel j mod 3 (RGB repeated). d < 3: channel j is the mean of
    the image channels c with c mod d = j (d = 1: grey = mean of R, G, B; d = 2: (mean(R, B), G)).
    Values stay in [-1, 1], and d = 3 is the identity.
    """
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    a = torch.zeros(dim, 3, device=device)
    if dim >= 3:
        a[torch.arange(dim), torch.arange(dim) % 3] = 1.0
    else:
        a[torch.arange(3) % dim, torch.arange(3)] = 1.0
        a /= a.sum(1, keepdim=True)
    return a


def image_to_x0(image: Tensor, dim: int) -> Tensor:
    """x_0 = A image: (B, 3, H, W) in [-1, 1] -> (B, d, H, W); identity for d = 3."""
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"image must have shape (B, 3, H, W), got {tuple(image.shape)}")
    if dim == 3:
        return image
    a = x0_projection(dim, image.device).to(image.dtype)  # built on the image's device: no host copy
    return torch.einsum("dc,bchw->bdhw", a, image)


def noisy_x0(image: Tensor, dim: int, sigma: float, generator: torch.Generator | None = None) -> Tensor:
    """x_0 = A I + sigma eps, eps ~ N(0, 1): (B, 3, H, W) -> (B, d, H, W); A I itself when sigma = 0."""
    x0 = image_to_x0(image, dim)
    if sigma == 0.0:
        return x0
    return x0 + sigma * torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)


def _time_view(t: Tensor, like: Tensor) -> Tensor:
    if t.dim() != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(f"t must have shape ({like.shape[0]},), got {tuple(t.shape)}")
    return t.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))  # (B, 1, 1, 1)


def _same_shape(a: Tensor, b: Tensor, names: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{names} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def interpolate(x0: Tensor, x1: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t) x_0 + t x_1."""
    _same_shape(x0, x1, "x0 and x1")
    tt = _time_view(t, x0)
    return (1.0 - tt) * x0 + tt * x1


def target_velocity(x0: Tensor, x1: Tensor) -> Tensor:
    """v* = x_1 - x_0: the constant velocity of the straight path."""
    _same_shape(x0, x1, "x0 and x1")
    return x1 - x0


def sample_t(
    batch: int, device: torch.device | str | None = None, generator: torch.Generator | None = None,
    zero_fraction: float = 0.0,
) -> Tensor:
    """t ~ U[0, 1], then each t set to 0 with probability zero_fraction.

    t = 0 is where the sampler takes its first step, from the image alone; on the paper's noise-free
    path it is also the only t with anything to learn (module docstring), hence the extra draws there.
    """
    if not 0.0 <= zero_fraction <= 1.0:
        raise ValueError(f"zero_fraction must be in [0, 1], got {zero_fraction!r}")
    t = torch.rand(batch, device=device, generator=generator)
    if zero_fraction > 0.0:
        at_zero = torch.rand(batch, device=device, generator=generator) < zero_fraction
        t = t.masked_fill(at_zero, 0.0)
    return t


def _check_parameterization(parameterization: str) -> None:
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"unknown parameterization {parameterization!r}; expected one of {PARAMETERIZATIONS}")


def to_velocity(output: Tensor, x_t: Tensor, t: Tensor, parameterization: str = "v") -> Tensor:
    """Network output -> v. v-prediction: v = output. x-prediction: v = (x1_hat - x_t) / max(1 - t, 0.05)."""
    _check_parameterization(parameterization)
    _same_shape(output, x_t, "network output and x_t")
    if parameterization == "v":
        return output
    gap = (1.0 - _time_view(t, x_t)).clamp_min(MIN_TIME_GAP)
    return (output - x_t) / gap


def to_clean_estimate(output: Tensor, x_t: Tensor, t: Tensor, parameterization: str = "v") -> Tensor:
    """Network output -> x1_hat. v-prediction: x1_hat = x_t + (1 - t) v. x-prediction: x1_hat = output."""
    _check_parameterization(parameterization)
    _same_shape(output, x_t, "network output and x_t")
    if parameterization == "x":
        return output
    return x_t + (1.0 - _time_view(t, x_t)) * output
