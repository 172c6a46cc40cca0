"""Training objectives: vanilla flow matching, the reshaped target with the detached distance-aware
correction (method.md section 3), and the discriminative cross-entropy baseline.

Reshaped target, per pixel, with the clean estimate x1_hat of the same forward pass:

    d_k   = ||x1_hat - mu_k||^2,   p_k = softmax_k(T(d_k) / tau),   Phi = -log p_true
    v_tgt = (x_1 - x_0) - lambda * dPhi/dx1_hat          (computed under no_grad)
    L     = mean over valid pixels of ||v - v_tgt||^2
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from flowseg.encoding import (
    IGNORE_INDEX, TRANSFORMS, CategoryEncoding, check_chunk, check_field, check_labels, class_chunks,
    get_transform, sq_distances_to,
)
from flowseg.flow import (
    PARAMETERIZATIONS, T_SCHEMES, image_to_x0, interpolate, sample_t, target_velocity, to_clean_estimate,
    to_velocity,
)

Network = Callable[[Tensor, Tensor, Tensor], Tensor]  # (x_t, t, image) -> output (B, d, H, W): v or x1_hat
KINDS = ("vanilla", "reshaped")
LAM_SCHEDULES = ("constant", "annealed")


@dataclass
class LossOutput:
    loss: Tensor                  # scalar, differentiable
    metrics: dict[str, float]     # detached scalars for logging


@dataclass
class ObjectiveConfig:
    kind: str = "reshaped"               # "vanilla" | "reshaped"
    transform: str = "neg_log"           # T(d): "neg_log" | "inverse" | "sqrt" | "identity"
    tau: float = 1.0
    eps: float = 1e-3
    lam: float = 1.0
    lam_schedule: str = "constant"       # "annealed": lambda * (1 - progress), linear to 0 at the end
    parameterization: str = "v"          # "v" | "x"
    t_sampling: str = "uniform"          # "uniform" | "logit_normal"
    mask_ignore: bool = True
    class_chunk: int | None = None

    def __post_init__(self) -> None:
        for field, value, allowed in (
            ("kind", self.kind, KINDS), ("transform", self.transform, tuple(TRANSFORMS)),
            ("lam_schedule", self.lam_schedule, LAM_SCHEDULES),
            ("parameterization", self.parameterization, PARAMETERIZATIONS), ("t_sampling", self.t_sampling, T_SCHEMES),
        ):
            if value not in allowed:
                raise ValueError(f"ObjectiveConfig.{field} must be one of {allowed}, got {value!r}")
        for field in ("tau", "eps"):
            if not getattr(self, field) > 0:
                raise ValueError(f"ObjectiveConfig.{field} must be > 0, got {getattr(self, field)!r}")
        if not self.lam >= 0:
            raise ValueError(f"ObjectiveConfig.lam must be >= 0, got {self.lam!r}")
        check_chunk(self.class_chunk)


@torch.no_grad()
def distance_correction(
    x1_hat: Tensor, labels: Tensor, centroids: Tensor, tau: float, eps: float, transform: str = "neg_log",
    class_chunk: int | None = None,
) -> Tensor:
    """grad = dPhi/dx1_hat, Phi = -log softmax_k(T(d_k) / tau)[true], d_k = ||x1_hat - mu_k||^2.

    Every T is signed so that a larger score means a closer class; with w(d) = -dT/dd > 0,

        grad = (2 / tau) * sum_k (y_k - p_k) w(d_k) (x1_hat - mu_k)
             = (2 / tau) * [ (1 - p_true) w(d_true) (x1_hat - mu_true) - x1_hat sum_k' q_k + sum_k' q_k mu_k ]

    with q_k = p_k w(d_k) and k' running over the other classes (T = -log(d + eps) gives
    w = 1/(d + eps), the paper's formula). -grad pulls towards mu_true with weight (1 - p_true) and
    pushes away from every other mu_k with weight p_k. The true class is kept out of the sums and
    1 - p_true is summed from the other p_k, so nothing cancels when p_true -> 1.
    One pass over class chunks with an online softmax (running max, accumulators rescaled when it
    grows): only (B, n, H, W) temporaries, n = class_chunk or N. Ignore pixels have no true class:
    Phi = 0 there, and so is grad. (B, d, H, W), (B, H, W) -> (B, d, H, W), computed under no_grad.
    """
    centroids = centroids.to(device=x1_hat.device, dtype=x1_hat.dtype)
    num_classes, dim = centroids.shape
    check_field(x1_hat, dim, "x1_hat")
    valid = check_labels(labels, num_classes)
    if labels.shape != (x1_hat.shape[0], *x1_hat.shape[2:]):
        raise ValueError(f"labels {tuple(labels.shape)} do not match x1_hat {tuple(x1_hat.shape)}")
    if not (tau > 0 and eps > 0):
        raise ValueError(f"tau and eps must be > 0, got tau={tau}, eps={eps}")
    check_chunk(class_chunk)
    T = get_transform(transform)

    mu_true = centroids[torch.where(valid, labels, 0)].permute(0, 3, 1, 2)  # (B, d, H, W)
    to_true = x1_hat - mu_true
    attraction = T.weight(to_true.square().sum(1, keepdim=True), eps) * to_true  # w(d_true)(x1_hat - mu_true)
    labels = labels.unsqueeze(1)  # (B, 1, H, W), compared with each chunk's class indices

    max_score = torch.full_like(x1_hat[:, :1], -math.inf)  # running max_k T(d_k)/tau, (B, 1, H, W)
    normaliser = torch.zeros_like(max_score)  # sum_k exp(T(d_k)/tau - max_score); p_k = exp(...)/normaliser
    p_other = torch.zeros_like(max_score)     # sum_k' p_k = 1 - p_true, unnormalised like the two below
    q_sum = torch.zeros_like(max_score)       # sum_k' q_k
    q_mu = torch.zeros_like(x1_hat)           # sum_k' q_k mu_k, (B, d, H, W)
    for chunk in class_chunks(num_classes, class_chunk):
        d = sq_distances_to(x1_hat, centroids[chunk])  # (B, n, H, W)
        weight = T.weight(d, eps)
        score = T.score(d, eps).div_(tau)
        del d
        new_max = torch.maximum(max_score, score.amax(1, keepdim=True))
        rescale = torch.exp(max_score - new_max)  # 0 on the first chunk
        for accumulator in (normaliser, p_other, q_sum, q_mu):
            accumulator.mul_(rescale)
        max_score = new_max
        p = score.sub_(max_score).exp_()  # unnormalised p_k, reusing the score buffer
        normaliser += p.sum(1, keepdim=True)
        classes = torch.arange(chunk.start, chunk.stop, device=labels.device).view(1, -1, 1, 1)
        p.masked_fill_(labels == classes, 0.0)
        p_other += p.sum(1, keepdim=True)
        q = weight.mul_(p)
        q_sum += q.sum(1, keepdim=True)
        q_mu += torch.matmul(centroids[chunk].T, q.flatten(2)).view_as(q_mu)  # (d, n) @ (B, n, HW)
    grad = (2.0 / tau) * (p_other * attraction - x1_hat * q_sum + q_mu) / normaliser
    return grad * valid.unsqueeze(1)


@dataclass
class FlowTargets:
    """One training draw: everything the loss and the diagnostics are computed from."""
    t: Tensor            # (B,)
    v_pred: Tensor       # (B, d, H, W), differentiable
    v_star: Tensor       # (B, d, H, W) x_1 - x_0
    v_target: Tensor     # (B, d, H, W) v* - lambda grad (= v* for vanilla), detached
    x1_hat: Tensor       # (B, d, H, W) clean estimate, detached
    valid: Tensor        # (B, H, W) bool, pixels with a class label
    weight: Tensor       # (B, H, W) float, 1 where the pixel counts in the loss


@dataclass
class SignalDiagnostics:
    """Per-pixel training signal: its magnitude ||v_target - v_pred|| against ||x1_hat - mu_true||."""
    t: Tensor            # (B,)
    distance: Tensor     # (B, H, W) ||x1_hat - mu_true||
    signal: Tensor       # (B, H, W) ||v_target - v_pred||, half the norm of dL_pixel/dv
    valid: Tensor        # (B, H, W) bool


def _masked_mean(values: Tensor, weight: Tensor) -> Tensor:
    return (values * weight).sum() / weight.sum().clamp_min(1.0)


class FlowMatchingObjective:
    """L = mean over counted pixels of ||v_theta(x_t, t, I) - v_tgt||^2 (squared norm over the d channels)."""

    def __init__(self, encoding: CategoryEncoding, config: ObjectiveConfig | None = None):
        self.encoding = encoding
        self.config = config or ObjectiveConfig()

    def lam_at(self, progress: float) -> float:
        """lambda at a training progress in [0, 1]: constant, or annealed linearly to 0."""
        if not 0.0 <= progress <= 1.0:
            raise ValueError(f"progress must be in [0, 1], got {progress!r}")
        lam = self.config.lam
        return lam * (1.0 - progress) if self.config.lam_schedule == "annealed" else lam

    def targets(
        self, velocity_model: Network, image: Tensor, labels: Tensor, progress: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> FlowTargets:
        cfg, enc = self.config, self.encoding
        check_field(image, 3, "image")
        if labels.shape != (image.shape[0], *image.shape[2:]):
            raise ValueError(f"labels {tuple(labels.shape)} do not match image {tuple(image.shape)}")
        lam = self.lam_at(progress)
        centroids = enc.centroids.to(image.device)
        x0 = image_to_x0(image, enc.dim)
        valid = check_labels(labels, enc.num_classes)
        # masked ignore pixels stay at x_0 (zero target velocity); unmasked ones are trained towards 0
        x1 = enc.to(image.device).encode(labels, ignore_fill=x0 if cfg.mask_ignore else None)
        t = sample_t(image.shape[0], cfg.t_sampling, device=image.device, generator=generator)
        x_t = interpolate(x0, x1, t)
        output = velocity_model(x_t, t, image)
        v_pred = to_velocity(output, x_t, t, cfg.parameterization)
        v_star = target_velocity(x0, x1)
        with torch.no_grad():
            x1_hat = to_clean_estimate(output.detach(), x_t, t, cfg.parameterization)
            v_target = v_star
            if cfg.kind == "reshaped" and lam > 0:
                grad = distance_correction(x1_hat, labels, centroids, cfg.tau, cfg.eps, cfg.transform, cfg.class_chunk)
                v_target = v_star - lam * grad
        weight = valid.to(image.dtype) if cfg.mask_ignore else torch.ones_like(valid, dtype=image.dtype)
        return FlowTargets(t, v_pred, v_star, v_target, x1_hat, valid, weight)

    def __call__(
        self, velocity_model: Network, image: Tensor, labels: Tensor, progress: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> LossOutput:
        f = self.targets(velocity_model, image, labels, progress, generator)
        loss = _masked_mean((f.v_pred - f.v_target).square().sum(1), f.weight)
        with torch.no_grad():
            loss_fm = _masked_mean((f.v_pred - f.v_star).square().sum(1), f.weight)
            correction = _masked_mean((f.v_target - f.v_star).norm(dim=1), f.weight)
        metrics = {
            "loss": loss.item(), "loss_fm": loss_fm.item(), "correction_norm": correction.item(),
            "lam": self.lam_at(progress),
        }
        return LossOutput(loss, metrics)

    @torch.no_grad()
    def diagnose(
        self, velocity_model: Network, image: Tensor, labels: Tensor, progress: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> SignalDiagnostics:
        """Per-pixel (distance to the true centroid, training-signal magnitude) for one draw of t."""
        f = self.targets(velocity_model, image, labels, progress, generator)
        mu_true = self.encoding.to(image.device).encode(labels, ignore_fill=f.x1_hat)
        distance = (f.x1_hat - mu_true).norm(dim=1)  # 0 at ignore pixels
        return SignalDiagnostics(f.t, distance, (f.v_target - f.v_pred).norm(dim=1), f.valid)


def discriminative_loss(logits: Tensor, labels: Tensor) -> LossOutput:
    """Per-pixel cross-entropy over the N logits, averaged over pixels whose label is not IGNORE_INDEX."""
    if logits.dim() != 4 or not logits.dtype.is_floating_point:
        raise ValueError(f"logits must be a float tensor (B, N, H, W), got {logits.dtype} {tuple(logits.shape)}")
    if labels.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(f"labels {tuple(labels.shape)} do not match logits {tuple(logits.shape)}")
    valid = check_labels(labels, logits.shape[1])
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    count = valid.sum().clamp_min(1)
    loss = ce / count
    with torch.no_grad():
        accuracy = ((logits.argmax(1) == labels) & valid).sum() / count
    return LossOutput(loss, {"loss_ce": loss.item(), "pixel_accuracy": accuracy.item()})
