"""Category encodings: every class k gets a fixed centroid mu_k in R^d (docs/method.md, section 2).

A label map becomes the "mask image" x_1 with x_1[:, i, j] = mu_{label(i, j)}; a point x is decoded
to the class of its nearest centroid. Distances to all N centroids are computed from the expansion
||x - mu_k||^2 = ||x||^2 - 2 x.mu_k + ||mu_k||^2, so no (B, N, d, H, W) tensor is ever built.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

IGNORE_INDEX = 255
ENCODINGS = ("kronecker", "rd", "lattice", "random", "bits", "onehot")
DEFAULT_DIM = 3  # Kronecker, R_d and random codes live in the image's 3 channels unless asked otherwise
# decode() scores pixels in blocks of about this many (pixel, class) scores: on a CPU a block that
# stays in cache is ~5x faster than one (B, N, H, W) pass; accelerators prefer few large launches.
DECODE_BLOCK_ELEMENTS_CPU = 2**20
DECODE_BLOCK_ELEMENTS_ACCELERATOR = 2**26
LATTICE_LEVELS = 6  # SemFlow palette: 6 levels per RGB channel, so at most 6^3 = 216 classes


# ----------------------------------------------------------------------------------------------
# Distance transforms T(d): the score of a class given its squared distance d_k. Every transform is
# signed so that a LARGER score means a CLOSER centroid; p_k = softmax_k(T(d_k) / tau).
# weight(d) = -dT/dd > 0 is what the analytic correction needs (correction.distance_correction).


@dataclass(frozen=True)
class DistanceTransform:
    score: Callable[[Tensor, float], Tensor]   # T(d; eps)
    weight: Callable[[Tensor, float], Tensor]  # -dT/dd (d; eps), positive


# (d + eps) is a fresh tensor, so the in-place ops below never touch d: at N = 150 every avoided
# temporary is one (B, N, H, W) tensor less at the correction's peak.
TRANSFORMS: dict[str, DistanceTransform] = {
    # T = -log(d + eps): the paper's default
    "neg_log": DistanceTransform(lambda d, eps: (d + eps).log_().neg_(), lambda d, eps: (d + eps).reciprocal_()),
    # T = 1 / (d + eps)
    "inverse": DistanceTransform(
        lambda d, eps: (d + eps).reciprocal_(), lambda d, eps: (d + eps).square_().reciprocal_()
    ),
    # T = -sqrt(d + eps): eps keeps dT/dd finite at d = 0; the sign out of place, as sqrt's backward reads its result
    "sqrt": DistanceTransform(lambda d, eps: -(d + eps).sqrt_(), lambda d, eps: (d + eps).rsqrt_().mul_(0.5)),
    # T = -d: the Gaussian-kernel softmax
    "identity": DistanceTransform(lambda d, eps: -d, lambda d, eps: torch.ones_like(d)),
}


def get_transform(name: str) -> DistanceTransform:
    if name not in TRANSFORMS:
        raise ValueError(f"unknown distance transform {name!r}; expected one of {tuple(TRANSFORMS)}")
    return TRANSFORMS[name]


# ----------------------------------------------------------------------------------------------
# Input checks shared by the encoding and the objective.


def check_labels(labels: Tensor, num_classes: int, name: str = "labels") -> Tensor:
    """Validate an int label map (B, H, W) with values in [0, N) or IGNORE_INDEX; return the valid mask."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype, got {labels.dtype}")
    if labels.dim() != 3:
        raise ValueError(f"{name} must have shape (B, H, W), got {tuple(labels.shape)}")
    valid = labels != IGNORE_INDEX
    bad = valid & ((labels < 0) | (labels >= num_classes))
    if bad.any():
        raise ValueError(
            f"{name} has values outside [0, {num_classes}) other than the ignore label {IGNORE_INDEX}: "
            f"{torch.unique(labels[bad])[:10].tolist()}"
        )
    return valid


def check_field(x: Tensor, dim: int, name: str = "x") -> None:
    """Validate a finite float field (B, d, H, W)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    if x.dim() != 4 or x.shape[1] != dim:
        raise ValueError(f"{name} must have shape (B, {dim}, H, W), got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains non-finite values (nan or inf)")


def check_chunk(class_chunk: int | None) -> None:
    if class_chunk is not None and (not isinstance(class_chunk, int) or class_chunk < 1):
        raise ValueError(f"class_chunk must be None or a positive int, got {class_chunk!r}")


def class_chunks(num_classes: int, class_chunk: int | None) -> list[slice]:
    step = num_classes if class_chunk is None else class_chunk
    return [slice(start, min(start + step, num_classes)) for start in range(0, num_classes, step)]


def sq_distances_to(x: Tensor, centroids: Tensor) -> Tensor:
    """d_k = ||x - mu_k||^2 = ||x||^2 - 2 x.mu_k + ||mu_k||^2 for centroids (n, d): (B,d,H,W) -> (B,n,H,W)."""
    mu = centroids.to(x.dtype)
    d = torch.matmul(mu, x.flatten(2)).view(x.shape[0], -1, *x.shape[2:])  # (n, d) @ (B, d, HW) -> (B, n, H, W)
    d.mul_(-2.0).add_((x * x).sum(1, keepdim=True)).add_((mu * mu).sum(1).view(1, -1, 1, 1))
    return d.clamp_min_(0.0)  # the expansion can round slightly below 0 next to a centroid


# ----------------------------------------------------------------------------------------------


class CategoryEncoding:
    """The (N, d) centroid table mu and the maps between label maps and d-channel fields."""

    def __init__(self, name: str, centroids: Tensor):
        if centroids.dim() != 2 or centroids.shape[0] < 2:
            raise ValueError(f"centroids must have shape (N >= 2, d), got {tuple(centroids.shape)}")
        self.name = name
        self.centroids = centroids.to(torch.float32)

    @property
    def num_classes(self) -> int:
        return self.centroids.shape[0]

    @property
    def dim(self) -> int:
        return self.centroids.shape[1]

    def __repr__(self) -> str:
        return f"CategoryEncoding(name={self.name!r}, num_classes={self.num_classes}, dim={self.dim})"

    def to(self, device: torch.device | str) -> CategoryEncoding:
        return CategoryEncoding(self.name, self.centroids.to(device))

    def encode(self, labels: Tensor, ignore_fill: Tensor | None = None) -> Tensor:
        """x_1 = mu_{label}: (B, H, W) -> (B, d, H, W). Ignore pixels take ignore_fill (method: x_0) or 0."""
        valid = check_labels(labels, self.num_classes)
        mu = self.centroids.to(labels.device)
        x1 = mu[torch.where(valid, labels, 0)].permute(0, 3, 1, 2)  # (B, d, H, W)
        shape = (labels.shape[0], self.dim, *labels.shape[1:])
        if ignore_fill is None:
            return x1 * valid.unsqueeze(1)
        if ignore_fill.shape != shape:
            raise ValueError(f"ignore_fill must have shape {shape}, got {tuple(ignore_fill.shape)}")
        return torch.where(valid.unsqueeze(1), x1.to(ignore_fill.dtype), ignore_fill)

    def sq_distances(self, x: Tensor, class_chunk: int | None = None) -> Tensor:
        """d_k = ||x - mu_k||^2: (B, d, H, W) -> (B, N, H, W).

        The result is (B, N, H, W) either way; class_chunk computes it chunk by chunk (as decode and
        the correction do) and costs one concatenation.
        """
        check_field(x, self.dim)
        check_chunk(class_chunk)
        mu = self.centroids.to(x.device)
        parts = [sq_distances_to(x, mu[c]) for c in class_chunks(self.num_classes, class_chunk)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)

    def decode(self, x: Tensor, class_chunk: int | None = None) -> Tensor:
        """argmin_k ||x - mu_k||^2 = argmax_k (2 x.mu_k - ||mu_k||^2): (B, d, H, W) -> (B, H, W) int64.

        ||x||^2 is the same for every k and is dropped. Pixels are scored in blocks of (P, n) scores,
        n = class_chunk or N, with a running (max, argmax) over class chunks; ties go to the lowest
        class index among chunks.
        """
        check_field(x, self.dim)
        check_chunk(class_chunk)
        batch, _, height, width = x.shape
        pixels = x.permute(0, 2, 3, 1).reshape(-1, self.dim)  # (B*H*W, d)
        mu = self.centroids.to(device=x.device, dtype=x.dtype)
        weight, bias = 2.0 * mu.T, -(mu * mu).sum(1)  # score = pixels @ (2 mu^T) - ||mu||^2
        chunks = class_chunks(self.num_classes, class_chunk)
        block_elements = DECODE_BLOCK_ELEMENTS_CPU if x.device.type == "cpu" else DECODE_BLOCK_ELEMENTS_ACCELERATOR
        block = max(1, block_elements // (chunks[0].stop - chunks[0].start))
        labels = torch.empty(pixels.shape[0], dtype=torch.int64, device=x.device)
        for start in range(0, pixels.shape[0], block):
            px = pixels[start : start + block]
            best_score, best_class = torch.addmm(bias[chunks[0]], px, weight[:, chunks[0]]).max(1)  # (P,)
            for c in chunks[1:]:
                score, cls = torch.addmm(bias[c], px, weight[:, c]).max(1)
                better = score > best_score
                best_score = torch.where(better, score, best_score)
                best_class = torch.where(better, cls + c.start, best_class)
            labels[start : start + block] = best_class
        return labels.view(batch, height, width)

    def posterior_mean(self, p: Tensor) -> Tensor:
        """x1_hat = sum_k p_k mu_k, the mean code under class probabilities p: (B, N, H, W) -> (B, d, H, W)."""
        if p.dim() != 4 or p.shape[1] != self.num_classes:
            raise ValueError(f"p must have shape (B, {self.num_classes}, H, W), got {tuple(p.shape)}")
        return torch.einsum("bnhw,nd->bdhw", p, self.centroids.to(device=p.device, dtype=p.dtype))

    def soft_assign(self, x: Tensor, tau: float = 1.0, eps: float = 1e-3, transform: str = "neg_log") -> Tensor:
        """p_k = softmax_k(T(d_k) / tau), default T(d) = -log(d + eps): (B, d, H, W) -> (B, N, H, W)."""
        if tau <= 0 or eps <= 0:
            raise ValueError(f"tau and eps must be > 0, got tau={tau}, eps={eps}")
        score = get_transform(transform).score(self.sq_distances(x), eps)
        return torch.softmax(score / tau, dim=1)

    def confidence(self, x: Tensor, tau: float = 1.0, eps: float = 1e-3) -> Tensor:
        """max_k p_k: a per-pixel confidence map (B, H, W) in [1/N, 1]."""
        return self.soft_assign(x, tau, eps).amax(1)

    def min_spacing(self) -> float:
        """min_{j != k} ||mu_j - mu_k||; 0 when two classes share a centroid."""
        mu = self.centroids.to(torch.float64)
        gram = mu @ mu.T
        sq = mu.square().sum(1)
        d2 = (sq[:, None] + sq[None, :] - 2.0 * gram).clamp_min(0.0)
        d2.fill_diagonal_(math.inf)
        return math.sqrt(d2.min().item())


# ----------------------------------------------------------------------------------------------
# Centroid constructions, all in float64 and returned as (N, d).


def first_primes(count: int) -> list[int]:
    primes: list[int] = []
    candidate = 2
    while len(primes) < count:
        if all(candidate % p for p in primes if p * p <= candidate):
            primes.append(candidate)
        candidate += 1
    return primes


def minmax_to_unit_box(c: Tensor) -> Tensor:
    """mu = 2 Norm(c) - 1 with Norm the per-channel min-max over the N classes: every channel spans [-1, 1]."""
    low, high = c.amin(0), c.amax(0)
    return 2.0 * (c - low) / (high - low) - 1.0


def kronecker_centroids(num_classes: int, dim: int) -> Tensor:
    """c_k = frac(k alpha), k = 1..N, alpha = square roots of the first d primes; mu_k = 2 Norm(c_k) - 1."""
    alpha = torch.tensor(first_primes(dim), dtype=torch.float64).sqrt()
    k = torch.arange(1, num_classes + 1, dtype=torch.float64)
    return minmax_to_unit_box(torch.frac(k[:, None] * alpha))


def generalized_golden_ratio(dim: int) -> float:
    """phi_d: the unique positive root of x^(d+1) = x + 1 (Newton from 2, where the map is convex)."""
    x = 2.0
    for _ in range(100):
        x -= (x ** (dim + 1) - x - 1.0) / ((dim + 1) * x**dim - 1.0)
    return x


RD_OFFSET = 0.5  # Roberts' R_d sequence starts at 0.5; the offset shifts where frac() wraps


def rd_centroids(num_classes: int, dim: int) -> Tensor:
    """R_d: c_k = frac(0.5 + k alpha), alpha_j = phi_d^-j (j = 1..d), k = 1..N; mu_k = 2 Norm(c_k) - 1."""
    phi = generalized_golden_ratio(dim)
    alpha = phi ** -torch.arange(1, dim + 1, dtype=torch.float64)
    k = torch.arange(1, num_classes + 1, dtype=torch.float64)
    return minmax_to_unit_box(torch.frac(RD_OFFSET + k[:, None] * alpha))


def lattice_centroids(num_classes: int) -> Tensor:
    """SemFlow palette: class c = 36 r + 6 g + b -> ({r, g, b} * 50) / 127.5 - 1, R outermost."""
    if num_classes > LATTICE_LEVELS**3:
        raise ValueError(f"the lattice encoding holds at most {LATTICE_LEVELS ** 3} classes, got {num_classes}")
    c = torch.arange(num_classes)
    digits = torch.stack([c // LATTICE_LEVELS**2, (c // LATTICE_LEVELS) % LATTICE_LEVELS, c % LATTICE_LEVELS], 1)
    return digits.to(torch.float64) * 50.0 / 127.5 - 1.0


def random_centroids(num_classes: int, dim: int, seed: int) -> Tensor:
    """Seeded uniform points in [-1, 1]^d."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(num_classes, dim, generator=generator, dtype=torch.float64) * 2.0 - 1.0


def bit_count(num_classes: int) -> int:
    return max(1, math.ceil(math.log2(num_classes)))


def bits_centroids(num_classes: int) -> Tensor:
    """Analog bits: the ceil(log2 N) bits of the class index, most significant first, as +-1."""
    dim = bit_count(num_classes)
    shifts = torch.arange(dim - 1, -1, -1)
    bits = (torch.arange(num_classes)[:, None] >> shifts) & 1  # (N, d)
    return bits.to(torch.float64) * 2.0 - 1.0


def onehot_centroids(num_classes: int) -> Tensor:
    """One-hot as +-1: mu_k = 2 e_k - 1."""
    return torch.eye(num_classes, dtype=torch.float64) * 2.0 - 1.0


def natural_dim(name: str, num_classes: int) -> int | None:
    """The dimension an encoding is defined with, or None where any d works."""
    return {"lattice": 3, "bits": bit_count(num_classes), "onehot": num_classes}.get(name)


def build_encoding(name: str, num_classes: int, dim: int | None = None, seed: int = 0) -> CategoryEncoding:
    """Build one of ENCODINGS for N classes; dim defaults to 3 where the encoding leaves it free."""
    if name not in ENCODINGS:
        raise ValueError(f"unknown encoding {name!r}; expected one of {ENCODINGS}")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    fixed = natural_dim(name, num_classes)
    if fixed is not None and dim is not None and dim != fixed:
        raise ValueError(f"the {name!r} encoding of {num_classes} classes has dim {fixed}, got dim={dim}")
    if dim is not None and (not isinstance(dim, int) or dim < 1):
        raise ValueError(f"dim must be a positive int or None, got {dim!r}")
    dim = dim or fixed or DEFAULT_DIM
    if name == "kronecker":
        centroids = kronecker_centroids(num_classes, dim)
    elif name == "rd":
        centroids = rd_centroids(num_classes, dim)
    elif name == "lattice":
        centroids = lattice_centroids(num_classes)
    elif name == "random":
        centroids = random_centroids(num_classes, dim, seed)
    elif name == "bits":
        centroids = bits_centroids(num_classes)
    else:
        centroids = onehot_centroids(num_classes)
    return CategoryEncoding(name, centroids)
