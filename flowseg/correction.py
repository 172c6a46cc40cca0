"""The distance-aware correction dPhi/dx1_hat of the reshaped target (docs/method.md, section 3).

Per pixel, with the clean estimate x1_hat and the class centroids mu_k:

    d_k = ||x1_hat - mu_k||^2,   p_k = softmax_k(T(d_k) / tau),   Phi = -log p_true

Two implementations of grad = dPhi/dx1_hat, tested against each other:

    reference_correction   the definition: every d_k by broadcasting, Phi, then autograd. Short, and
                           (B, N, d, H, W) in memory, so for tests and small inputs only.
    distance_correction    the closed form below, evaluated in cache-sized blocks of pixels with an
                           online softmax over chunks of classes; what training uses.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from flowseg.encoding import IGNORE_INDEX, DistanceTransform, check_chunk, class_chunks, get_transform


def reference_correction(
    x1_hat: Tensor, labels: Tensor, centroids: Tensor, tau: float, eps: float, transform: str = "neg_log",
) -> Tensor:
    """grad = dPhi/dx1_hat by autograd of Phi summed over the labelled pixels; 0 at ignore pixels.

    (B, d, H, W), (B, H, W) -> (B, d, H, W). Autograd of log_softmax forms 1 - p_true, which rounds
    to 0 once p_true -> 1; distance_correction keeps that term exact.
    """
    x = x1_hat.detach().requires_grad_(True)
    d = (x[:, None] - centroids.to(x)[None, :, :, None, None]).square().sum(2)  # (B, N, H, W)
    log_p = torch.log_softmax(get_transform(transform).score(d, eps) / tau, dim=1)
    valid = labels != IGNORE_INDEX
    log_p_true = log_p.gather(1, torch.where(valid, labels, 0).unsqueeze(1)).squeeze(1)  # (B, H, W)
    phi = -(log_p_true * valid).sum()
    (grad,) = torch.autograd.grad(phi, x)
    return grad


# distance_correction takes the pixels in blocks of about this many (class, pixel) entries, on a CPU
# per thread. A block that stays in cache makes each pass over its classes several times cheaper
# than a pass over a whole (B, N, H, W) tensor, and every op is one parallel region, so with more
# threads a block grows rather than the count of regions; accelerators prefer few large launches.
CORRECTION_BLOCK_ELEMENTS_CPU = 2**20
CORRECTION_BLOCK_ELEMENTS_ACCELERATOR = 2**26


@torch.no_grad()
def distance_correction(
    x1_hat: Tensor, labels: Tensor, centroids: Tensor, tau: float, eps: float, transform: str = "neg_log",
    class_chunk: int | None = None,
) -> Tensor:
    """grad = dPhi/dx1_hat in closed form. Every T is signed so that a larger score means a closer
    class; with w(d) = -dT/dd > 0,

        grad = (2 / tau) * sum_k (y_k - p_k) w(d_k) (x1_hat - mu_k)
             = (2 / tau) * [ (1 - p_true) w(d_true) (x1_hat - mu_true) - x1_hat sum_k' q_k + sum_k' q_k mu_k ]

    with q_k = p_k w(d_k) and k' running over the other classes (T = -log(d + eps) gives
    w = 1/(d + eps), the paper's formula). -grad pulls towards mu_true with weight (1 - p_true) and
    pushes away from every other mu_k with weight p_k. The true class is kept out of the sums and
    1 - p_true is summed from the other p_k, so nothing cancels when p_true -> 1.
    The pixels are taken in cache-sized blocks, each block's classes in chunks of class_chunk
    (default: all at once) with an online softmax, so the only temporaries of size N x pixels are two
    (n, pixels of a block) buffers. Ignore pixels have no true class: Phi = 0 there, and so is grad.
    Labels must hold class ids or IGNORE_INDEX (the datasets check them where they are read).
    (B, d, H, W), (B, H, W) -> (B, d, H, W), computed under no_grad.
    """
    centroids = centroids.to(device=x1_hat.device, dtype=x1_hat.dtype)
    num_classes, dim = centroids.shape
    if x1_hat.dim() != 4 or x1_hat.shape[1] != dim:
        raise ValueError(f"x1_hat must have shape (B, {dim}, H, W), got {tuple(x1_hat.shape)}")
    if labels.shape != (x1_hat.shape[0], *x1_hat.shape[2:]):
        raise ValueError(f"labels {tuple(labels.shape)} do not match x1_hat {tuple(x1_hat.shape)}")
    if not (tau > 0 and eps > 0):
        raise ValueError(f"tau and eps must be > 0, got tau={tau}, eps={eps}")
    check_chunk(class_chunk)
    softmax = RelativeSoftmax(transform, get_transform(transform), tau, eps)

    valid = labels != IGNORE_INDEX
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
