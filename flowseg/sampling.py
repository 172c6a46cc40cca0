"""Inference: integrate dx/dt = v(x, t, I) from t = 0 (the image) to t = 1, then decode each pixel to
its nearest centroid (docs/method.md, section 1). Any callable velocity model works.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from flowseg.encoding import CategoryEncoding
from flowseg.flow import image_to_x0

VelocityFn = Callable[[Tensor, Tensor, Tensor], Tensor]  # (x (B,d,H,W), t (B,), image) -> v (B,d,H,W)
METHODS = ("euler", "heun")


@dataclass
class SampleResult:
    x1: Tensor                    # (B, d, H, W) final state
    trajectory: Tensor | None     # (S+1, B, d, H, W) when asked
    times: Tensor                 # (S+1,)


def integrate(
    velocity_fn: VelocityFn, x0: Tensor, image: Tensor, steps: int = 10, method: str = "euler",
    return_trajectory: bool = False,
) -> SampleResult:
    """Integrate from t = 0 to 1 on S uniform steps of h = 1/S.

    Euler:  x_{i+1} = x_i + h v(x_i, t_i)                                    (first order)
    Heun:   x'      = x_i + h v(x_i, t_i)
            x_{i+1} = x_i + h/2 [v(x_i, t_i) + v(x', t_{i+1})]               (second order, 2 calls/step)
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if method not in METHODS:
        raise ValueError(f"unknown integration method {method!r}; expected one of {METHODS}")
    if x0.dim() != 4:
        raise ValueError(f"x0 must have shape (B, d, H, W), got {tuple(x0.shape)}")

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        v = velocity_fn(x, t.expand(x.shape[0]), image)
        if v.shape != x.shape:
            raise ValueError(f"velocity_fn returned shape {tuple(v.shape)}, expected {tuple(x.shape)}")
        return v

    times = torch.linspace(0.0, 1.0, steps + 1, device=x0.device, dtype=x0.dtype)
    x = x0
    states = [x0] if return_trajectory else None
    for i in range(steps):
        h = times[i + 1] - times[i]
        v = velocity(x, times[i : i + 1])
        if method == "heun":
            v = 0.5 * (v + velocity(x + h * v, times[i + 1 : i + 2]))
        x = x + h * v
        if states is not None:
            states.append(x)
    trajectory = torch.stack(states) if states is not None else None
    return SampleResult(x, trajectory, times)


@torch.no_grad()
def segment(
    velocity_fn: VelocityFn, image: Tensor, encoding: CategoryEncoding, steps: int = 10, method: str = "euler",
    return_trajectory: bool = False,
) -> tuple[Tensor, SampleResult]:
    """Labels (B, H, W) int64 by nearest centroid of the ODE's end point, and the sample itself."""
    sample = integrate(velocity_fn, image_to_x0(image, encoding.dim), image, steps, method, return_trajectory)
    return encoding.to(image.device).decode(sample.x1), sample
