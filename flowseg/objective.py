"""Training objectives: vanilla flow matching, the reshaped target with the detached distance-aware
correction (method.md section 3), the discriminative cross-entropy baseline, and the auxiliary
token-classification loss that either model can add (token_classification_loss).

Reshaped target, per pixel, with the clean estimate x1_hat of the same forward pass:

    d_k   = ||x1_hat - mu_k||^2,   p_k = softmax_k(T(d_k) / tau),   Phi = -log p_true
    v_tgt = (x_1 - x_0) - clip_c(lambda * dPhi/dx1_hat)  (computed under no_grad)
    L     = mean over valid pixels of ||v - v_tgt||^2

clip_c(g) = g min(1, c / ||g||) per pixel bounds the correction's norm by c (correction_clip; None:
no bound, the paper's target). Near a wrong centroid at distance r the unbounded -log correction grows
like 2 / (tau r), so pixels a young model puts near the wrong digit get targets of norm 4-25 where
||x_1 - x_0|| <= 2 sqrt(d) (docs/core.md, "How large the correction gets").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from flowseg.encoding import (
    IGNORE_INDEX, TRANSFORMS, CategoryEncoding, DistanceTransform, check_chunk, check_field, check_labels,
    class_chunks, get_transform,
)
from flowseg.flow import (
    PARAMETERIZATIONS, T_SCHEMES, image_to_x0, interpolate, sample_t, target_velocity, to_clean_estimate,
    to_velocity,
)
from flowseg.models.field import patchify

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
    tau: float = 0.5                     # mnist-seg val mIoU 0.23 vs 0.11 with tau = 1 (docs/core.md)
    eps: float = 1e-3
    lam: float = 1.0
    correction_clip: float | None = None  # c: max per-pixel norm of lambda * dPhi/dx1_hat (None: unbounded)
    lam_schedule: str = "constant"       # "annealed": lambda * (1 - progress), linear to 0 at the end
    parameterization: str = "v"          # "v" | "x"
    t_sampling: str = "uniform"          # "uniform" | "logit_normal"
    t_zero_fraction: float = 0.9         # share of draws put at t = 0, where x_t = I (see flow.sample_t)
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
        if self.correction_clip is not None and not self.correction_clip > 0:
            raise ValueError(f"ObjectiveConfig.correction_clip must be > 0 or None, got {self.correction_clip!r}")
        check_chunk(self.class_chunk)


# The correction takes the pixels in blocks of about this many (class, pixel) entries, on a CPU per
# thread. A block that stays in cache makes each pass over its classes several times cheaper than a
# pass over a whole (B, N, H, W) tensor, and every op is one parallel region, so with more threads a
# block grows rather than the count of regions; accelerators prefer few large launches.
CORRECTION_BLOCK_ELEMENTS_CPU = 2**20
CORRECTION_BLOCK_ELEMENTS_ACCELERATOR = 2**26


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
    The pixels are taken in cache-sized blocks, each block's classes in chunks of class_chunk
    (default: all at once) with an online softmax, so the only temporaries of size N x pixels are two
    (n, pixels of a block) buffers. Ignore pixels have no true class: Phi = 0 there, and so is grad.
    (B, d, H, W), (B, H, W) -> (B, d, H, W), computed under no_grad.
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
    softmax = RelativeSoftmax(transform, get_transform(transform), tau, eps)

    x = x1_hat.transpose(0, 1).reshape(dim, -1)  # (d, P): all B*H*W pixels side by side
    x_aug = torch.cat([x, torch.ones_like(x[:1]), x.square().sum(0, keepdim=True)])  # (d + 2, P) [x; 1; ||x||^2]
    true = torch.where(valid, labels, 0).flatten()  # (P,)
    to_true = x - centroids[true].T  # (d, P) x1_hat - mu_true
    chunks = ClassChunk.split(centroids, class_chunk)
    width = chunks[0].classes.stop - chunks[0].classes.start
    if x.device.type == "cpu":
        entries = CORRECTION_BLOCK_ELEMENTS_CPU * torch.get_num_threads()
    else:
        entries = CORRECTION_BLOCK_ELEMENTS_ACCELERATOR
    block = min(max(1, entries // width), x.shape[1])  # pixels per block
    # two flat buffers that every block and chunk reuses: fresh ones of this size would each cost page faults
    workspace = (x.new_empty(width * block), x.new_empty(width * block))
    grad = torch.empty_like(x)
    for start in range(0, x.shape[1], block):
        pixels = slice(start, start + block)
        grad[:, pixels] = _block_correction(
            x_aug[:, pixels], to_true[:, pixels], true[pixels], chunks, softmax, workspace
        )
    grad *= valid.flatten()
    return grad.view(dim, *labels.shape).transpose(0, 1).contiguous()


@dataclass
class ClassChunk:
    """A chunk of classes and the tables that turn the correction's sums over them into matmuls."""
    classes: slice
    distance: Tensor  # (n, d + 2) [-2 mu_k, ||mu_k||^2, 1], so d_k = distance @ [x; 1; ||x||^2]
    moments: Tensor   # (d + 1, n) [mu_k; 1], so moments @ q = [sum_k q_k mu_k; sum_k q_k]

    @staticmethod
    def split(centroids: Tensor, class_chunk: int | None) -> list[ClassChunk]:
        ones = torch.ones_like(centroids[:, :1])
        distance = torch.cat([-2.0 * centroids, centroids.square().sum(1, keepdim=True), ones], 1)
        moments = torch.cat([centroids, ones], 1).T
        return [ClassChunk(c, distance[c], moments[:, c]) for c in class_chunks(centroids.shape[0], class_chunk)]


@dataclass(frozen=True)
class RelativeSoftmax:
    """p_k = softmax_k(T(d_k) / tau), taken relative to the closest class.

    Every T decreases in d, so max_k T(d_k) = T(d_min) and p_k Z = exp((T(d_k) - T(d_min)) / tau) lies in
    (0, 1], with Z = sum_k p_k Z >= 1: nothing overflows or vanishes whatever tau is.
    """
    name: str
    transform: DistanceTransform
    tau: float
    eps: float

    def relative(self, d: Tensor, d_min: Tensor) -> Tensor:
        """exp((T(d) - T(d_min)) / tau) for per-pixel d, d_min (P,)."""
        T, eps = self.transform, self.eps
        return T.score(d, eps).sub_(T.score(d_min, eps)).div_(self.tau).exp_()

    def terms(self, d: Tensor, d_min: Tensor, spare: Tensor) -> tuple[Tensor, Tensor, Tensor | float]:
        """(p_k Z, q_k Z unit, unit) for one chunk of distances d (n, P), q_k = p_k w(d_k).

        The (n, P) results reuse the storage of d and spare.

        For T = -log(d + eps), with s_k = (d_min + eps) / (d_k + eps) in (0, 1]: p_k Z = s_k^(1/tau) and
        w(d_k) = s_k / (d_min + eps). No log or exp is evaluated, and unit = d_min + eps (per pixel)
        divides the class sums instead of every q_k.
        """
        if self.name == "neg_log":
            s = torch.div((d_min + self.eps).unsqueeze(0), d.add_(self.eps), out=d)
            p = s if self.tau == 1.0 else torch.pow(s, 1.0 / self.tau, out=spare)
            q = torch.mul(p, s, out=spare if p is s else s)
            return p, q, d_min + self.eps
        p = self.relative(d, d_min.unsqueeze(0))
        return p, self.transform.weight(d, self.eps).mul_(p), 1.0


def _block_correction(
    x_aug: Tensor, to_true: Tensor, true: Tensor, chunks: list[ClassChunk], softmax: RelativeSoftmax,
    workspace: tuple[Tensor, Tensor],
) -> Tensor:
    """distance_correction's grad (d, P) for one block of pixels x_aug = [x; 1; ||x||^2] (d + 2, P)."""
    dim, size = to_true.shape
    d_true = to_true.square().sum(0)  # (P,)
    d_min = d_true  # running min_k d_k over the chunks seen
    p_other = torch.zeros_like(d_true)  # sum_k' p_k Z
    q_other = torch.zeros_like(x_aug[:-1])  # [sum_k' q_k Z mu_k; sum_k' q_k Z], (d + 1, P)
    for chunk in chunks:
        n = chunk.classes.stop - chunk.classes.start
        d = torch.mm(chunk.distance, x_aug, out=workspace[0][: n * size].view(n, size))  # (n, P)
        d.clamp_min_(0.0)  # the expansion can round slightly below 0 next to a centroid
        closest = torch.minimum(d_min, d.amin(0))
        rescale = softmax.relative(d_min, closest)  # 1 unless this chunk holds a closer class
        d_min = closest
        p, q, unit = softmax.terms(d, d_min, workspace[1][: n * size].view(n, size))
        _exclude_true_class((p, q), true, chunk.classes)
        p_other.mul_(rescale).add_(p.sum(0))
        q_other.mul_(rescale).add_(torch.mm(chunk.moments, q).div_(unit))
    normaliser = p_other + softmax.relative(d_true, d_min)  # Z = sum_k' p_k Z + p_true Z
    attraction = softmax.transform.weight(d_true, softmax.eps) * to_true  # w(d_true) (x1_hat - mu_true)
    x, q_mu, q_sum = x_aug[:dim], q_other[:dim], q_other[dim]
    return (2.0 / softmax.tau) * (p_other * attraction - x * q_sum + q_mu) / normaliser


def _exclude_true_class(terms: tuple[Tensor, ...], true: Tensor, classes: slice) -> None:
    """Zero each (n, P) term in the row of its pixel's true class, where the chunk holds that class."""
    in_chunk = (true >= classes.start) & (true < classes.stop)
    row = (true - classes.start).clamp_(0, classes.stop - classes.start - 1).unsqueeze(0)  # (1, P)
    for term in terms:
        term.scatter_(0, row, torch.where(in_chunk, 0.0, term.gather(0, row)))


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
        t = sample_t(image.shape[0], cfg.t_sampling, device=image.device, generator=generator,
                     zero_fraction=cfg.t_zero_fraction)
        x_t = interpolate(x0, x1, t)
        output = velocity_model(x_t, t, image)
        v_pred = to_velocity(output, x_t, t, cfg.parameterization)
        v_star = target_velocity(x0, x1)
        with torch.no_grad():
            x1_hat = to_clean_estimate(output.detach(), x_t, t, cfg.parameterization)
            v_target = v_star
            if cfg.kind == "reshaped" and lam > 0:
                grad = distance_correction(x1_hat, labels, centroids, cfg.tau, cfg.eps, cfg.transform, cfg.class_chunk)
                correction = lam * grad  # (B, d, H, W)
                if cfg.correction_clip is not None:
                    norm = correction.norm(dim=1, keepdim=True)  # (B, 1, H, W)
                    correction *= cfg.correction_clip / norm.clamp_min(cfg.correction_clip)
                v_target = v_star - correction
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


def token_classification_loss(logits: Tensor, labels: Tensor, patch_size: int) -> LossOutput:
    """Auxiliary loss on the trunk's token logits z (B, L, N), one token per p x p patch of labels (B, H, W):

        q_l,k = share of patch l's valid pixels labelled k,   L_tok = -mean_{l: patch l has a valid pixel}
                                                                      sum_k q_l,k log softmax(z_l)_k

    Cross-entropy against each patch's label histogram. Added to the flow loss it gives the trunk the
    direct class signal that regression to the centroids lacks early on (docs/core.md, "The token loss").
    """
    if logits.dim() != 3 or not logits.dtype.is_floating_point:
        raise ValueError(f"token logits must be a float tensor (B, L, N), got {logits.dtype} {tuple(logits.shape)}")
    batch, height, width = labels.shape
    if height % patch_size or width % patch_size or logits.shape[:2] != (batch, height * width // patch_size**2):
        raise ValueError(f"token logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)} "
                         f"in patches of {patch_size} x {patch_size}")
    valid = check_labels(labels, logits.shape[-1])
    # (B, H, W) -> (B, L, p^2) with the model's own patchify, so patch l is token l
    patches = patchify(labels[:, None], patch_size)[:, :, 0]
    in_patch = patchify(valid[:, None], patch_size)[:, :, 0]
    counts = torch.zeros_like(logits, dtype=torch.float32)  # (B, L, N)
    counts.scatter_add_(2, torch.where(in_patch, patches, 0), in_patch.float())
    total = counts.sum(-1)  # (B, L): valid pixels per patch
    kept = total > 0
    share = counts / total.clamp_min(1)[..., None]  # q (B, L, N)
    per_token = -(share * F.log_softmax(logits.float(), dim=-1)).sum(-1)  # (B, L)
    loss = per_token[kept].sum() / kept.sum().clamp_min(1)
    return LossOutput(loss, {"loss_token": loss.item()})
