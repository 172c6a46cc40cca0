"""Classification losses: the discriminative twin's per-pixel cross-entropy (which the categorical flow
objective uses too), and the auxiliary token loss that either model can add (the flow matching objective
is in objective.py); and LossOutput, what every loss returns.

Labels (B, H, W) hold class ids in [0, N) or IGNORE_INDEX; the datasets check them where they are read.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from flowseg.encoding import IGNORE_INDEX


@dataclass
class LossOutput:
    loss: Tensor                  # scalar, differentiable
    metrics: dict[str, Tensor]    # detached scalars for logging; reading one waits for the device


def discriminative_loss(logits: Tensor, labels: Tensor) -> LossOutput:
    """Per-pixel cross-entropy over the N logits (B, N, H, W), averaged over pixels whose label is not
    IGNORE_INDEX."""
    if logits.dim() != 4 or not logits.dtype.is_floating_point:
        raise ValueError(f"logits must be a float tensor (B, N, H, W), got {logits.dtype} {tuple(logits.shape)}")
    if labels.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(f"labels {tuple(labels.shape)} do not match logits {tuple(logits.shape)}")
    valid = labels != IGNORE_INDEX
    count = valid.sum().clamp_min(1)
    loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum") / count
    with torch.no_grad():
        accuracy = ((logits.argmax(1) == labels) & valid).sum() / count
    return LossOutput(loss, {"loss_ce": loss.detach(), "pixel_accuracy": accuracy})


def patch_label_shares(labels: Tensor, num_classes: int, patch_size: int) -> Tensor:
    """q (B, L, N): the share of patch l's valid pixels labelled k, 0 for a patch without valid pixels.

    Patches are the p x p blocks numbered row-major, l = (i // p) (W / p) + j // p for pixel (i, j):
    the order in which the models number their tokens.
    """
    batch, height, width = labels.shape
    rows = torch.arange(height, device=labels.device) // patch_size
    cols = torch.arange(width, device=labels.device) // patch_size
    patch = rows[:, None] * (width // patch_size) + cols[None, :]  # (H, W) the patch l of each pixel
    valid = labels != IGNORE_INDEX
    slot = (patch * num_classes + torch.where(valid, labels, 0)).flatten(1)  # (B, H W) entry (l, k) of (L, N)
    tokens = (height // patch_size) * (width // patch_size)
    counts = torch.zeros(batch, tokens * num_classes, device=labels.device)
    counts.scatter_add_(1, slot, valid.flatten(1).float())
    counts = counts.view(batch, tokens, num_classes)
    return counts / counts.sum(-1, keepdim=True).clamp_min(1)


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
    share = patch_label_shares(labels, logits.shape[-1], patch_size)  # (B, L, N)
    kept = (share.sum(-1) > 0).sum()  # patches with a valid pixel; the others have q = 0 and add 0
    loss = -(share * F.log_softmax(logits.float(), dim=-1)).sum() / kept.clamp_min(1)
    return LossOutput(loss, {"loss_token": loss.detach()})
