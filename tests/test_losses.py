"""The classification losses: the twin's cross-entropy and the token loss, against hand-worked values."""
import math

import pytest
import torch

from flowseg.encoding import IGNORE_INDEX
from flowseg.losses import discriminative_loss, patch_label_shares, token_classification_loss
from flowseg.models.field import patchify


def test_discriminative_loss_by_hand():
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 0.0]], [[1.0, 5.0]]]])  # (1, 3, 1, 2)
    labels = torch.tensor([[[0, IGNORE_INDEX]]])
    out = discriminative_loss(logits, labels)
    assert out.loss.item() == pytest.approx(-(2.0 - math.log(math.exp(2) + 1 + math.e)))
    assert out.metrics["pixel_accuracy"].item() == 1.0
    empty = discriminative_loss(logits, torch.full((1, 1, 2), IGNORE_INDEX))
    assert empty.loss.item() == 0.0
    with pytest.raises(ValueError, match="do not match logits"):
        discriminative_loss(logits, torch.zeros(1, 2, 2, dtype=torch.long))


def test_token_loss_against_a_per_patch_loop():
    """Each token's target is its patch's label histogram; ignore pixels are left out of it, and a
    patch with no valid pixel is left out of the mean."""
    torch.manual_seed(0)
    labels = torch.randint(0, 5, (2, 4, 6))
    labels[0, :2, :2] = IGNORE_INDEX                 # patch (0, 0) of image 0: no valid pixel
    labels[1, 2, 4] = IGNORE_INDEX                   # patch (1, 2) of image 1: 3 valid pixels
    logits = torch.randn(2, 6, 5, dtype=torch.float64, requires_grad=True)  # (B, L = 2 x 3, N)
    out = token_classification_loss(logits, labels, patch_size=2)

    terms = []
    for b in range(2):
        for row in range(2):
            for col in range(3):
                patch = labels[b, 2 * row:2 * row + 2, 2 * col:2 * col + 2].flatten()
                patch = patch[patch != IGNORE_INDEX]
                if len(patch):
                    log_p = torch.log_softmax(logits[b, 3 * row + col], dim=0)
                    terms.append(-sum(log_p[k] for k in patch.tolist()) / len(patch))
    expected = torch.stack(terms).mean()
    assert len(terms) == 11
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert out.metrics["loss_token"].item() == pytest.approx(expected.item(), rel=1e-6)
    (grad,) = torch.autograd.grad(out.loss, logits)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(grad, expected_grad)
    assert torch.equal(grad[0, 0], torch.zeros(5, dtype=torch.float64))  # the all-ignore patch


def test_token_loss_is_the_target_entropy_at_its_minimum_and_rejects_bad_input():
    labels = torch.tensor([[[1, 1, 2, 2], [1, 0, 2, 2]]])  # patches of 2: shares (1/4, 3/4, 0), (0, 0, 1)
    share = torch.tensor([[[0.25, 0.75, 0.0], [0.0, 0.0, 1.0]]])
    best = token_classification_loss(torch.log(share.clamp_min(1e-30)), labels, patch_size=2)
    entropy = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) / 2
    assert best.loss.item() == pytest.approx(entropy, rel=1e-5)
    with pytest.raises(ValueError, match=r"do not match labels \(1, 2, 4\) in patches of 2 x 2"):
        token_classification_loss(torch.zeros(1, 3, 3), labels, patch_size=2)
    with pytest.raises(ValueError, match=r"\(B, L, N\)"):
        token_classification_loss(torch.zeros(1, 2, 3, 1), labels, patch_size=2)


def test_patches_are_numbered_like_the_models_tokens():
    """Share l is the label histogram of the pixels that models.field.patchify puts in patch l."""
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 4, (2, 6, 9), generator=g)
    labels[torch.rand(labels.shape, generator=g) < 0.3] = IGNORE_INDEX
    labels[0, :3, :3] = IGNORE_INDEX  # patch 0 of image 0: no valid pixel
    patches = patchify(labels[:, None], 3)[:, :, 0]  # (B, L, 9)
    valid = patches != IGNORE_INDEX
    counts = torch.stack([(patches == k) & valid for k in range(4)], -1).sum(2).float()  # (B, L, N)
    expected = counts / counts.sum(-1, keepdim=True).clamp_min(1)
    torch.testing.assert_close(patch_label_shares(labels, 4, 3), expected)
    assert torch.equal(expected[0, 0], torch.zeros(4))
