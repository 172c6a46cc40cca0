"""REPA: representation alignment of the trunk's tokens to a frozen pretrained encoder (Yu et al. 2024),
as PixNerd trains with it.

For the tokens s_k (B, L, C) after trunk block k and the teacher's features f (B, L, D) of the same
image on the same token grid:

    L_repa = mean over images b and tokens l of  1 - cos(h_phi(s_k)_{b,l}, f_{b,l})
    h_phi  = Linear(C, C) -> SiLU -> Linear(C, C) -> SiLU -> Linear(C, D)      (the projector)

and training minimises the main loss + weight * L_repa. The teacher sees the clean image I, resized
so that its feature grid is the token grid (stride x grid pixels a side, PixNerd's rule for DINOv2),
under no_grad; it is never trained and never saved. The projector is trained with the network,
saved in the training state (for --resume) and unused at inference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowseg.config import RepaConfig
from flowseg.models.teachers import load_teacher
from flowseg.losses import LossOutput

PIXNERD_ALIGN_BLOCK = 8  # PixNerd aligns the output of its 8th block (L/16 and XL/16)


def align_block(block: int | None, depth: int) -> int:
    """The trunk block whose output is aligned: `block`, or by default PixNerd's 8th, but no deeper
    than half the trunk (the small models have 4 to 8 blocks)."""
    return block if block is not None else min(PIXNERD_ALIGN_BLOCK, max(1, depth // 2))


def build_projector(width: int, teacher_dim: int) -> nn.Sequential:
    """h_phi: the tokens' width C -> C -> C -> the teacher's width D (PixNerd's hidden width is C)."""
    return nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                         nn.Linear(width, teacher_dim))


def alignment_loss(projected: Tensor, target: Tensor) -> Tensor:
    """1 - cos between matching feature vectors (..., D), averaged over all of them; computed in float32."""
    return (1 - F.cosine_similarity(projected.float(), target.float(), dim=-1)).mean()


def teacher_features(teacher: nn.Module, image: Tensor, grid: tuple[int, int]) -> Tensor:
    """The teacher's features of I (B, 3, H, W) in [-1, 1] on a grid_h x grid_w grid, (B, L, D) with
    tokens in row-major order. The image is resized (bilinear, antialiased) to stride x grid pixels,
    so that each feature covers the image area of one token."""
    stride = teacher.stride
    size = (grid[0] * stride, grid[1] * stride)
    with torch.no_grad():
        if image.shape[-2:] != size:
            image = F.interpolate(image, size=size, mode="bilinear", antialias=True, align_corners=False)
        features = teacher(image)  # (B, D, grid_h, grid_w)
    return features.flatten(2).transpose(1, 2)  # (B, L, D)


class RepaAlignment(nn.Module):
    """The frozen teacher and the projector; only the projector is trained and saved."""

    def __init__(self, teacher: nn.Module, width: int, block: int, weight: float):
        super().__init__()
        self.teacher = teacher.requires_grad_(False).eval()  # eval: its batch norms keep their ImageNet statistics
        self.projector = build_projector(width, teacher.dim)
        self.block, self.weight = block, weight

    def loss(self, block_tokens: Tensor, image: Tensor, grid: tuple[int, int]) -> LossOutput:
        """weight * L_repa for the tokens s_k (B, L, C) of images I (B, 3, H, W) on a token grid."""
        target = teacher_features(self.teacher, image, grid)  # (B, L, D)
        repa = alignment_loss(self.projector(block_tokens), target)
        return LossOutput(self.weight * repa, {"loss_repa": repa.detach()})


def build_alignment(config: RepaConfig, width: int, depth: int) -> RepaAlignment | None:
    """REPA for a trunk of `depth` blocks of `width` channels as `config` says; None when it is off."""
    if config.teacher is None:
        return None
    teacher = load_teacher(config.teacher, config.weights)
    return RepaAlignment(teacher, width, align_block(config.block, depth), config.weight)
