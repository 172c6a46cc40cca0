import math

import pytest
import torch

from flowseg.encoding import IGNORE_INDEX, TRANSFORMS, build_encoding
from flowseg import objective
from flowseg.flow import image_to_x0, interpolate
from flowseg.objective import (
    FlowMatchingObjective, ObjectiveConfig, discriminative_loss, distance_correction, token_classification_loss,
)

EPS = 1e-3
# T(d) written out independently of flowseg: larger score = closer class
REFERENCE_T = {
    "neg_log": lambda d, eps: -torch.log(d + eps),
    "inverse": lambda d, eps: 1.0 / (d + eps),
    "sqrt": lambda d, eps: -torch.sqrt(d + eps),
    "identity": lambda d, eps: -d,
}


def reference_phi(x, labels, mu, tau, eps, transform):
    """Phi = sum over labelled pixels of -log softmax_k(T(||x - mu_k||^2) / tau)[true], by broadcasting."""
    d = (x[:, None] - mu[None, :, :, None, None]).square().sum(2)  # (B, N, H, W)
    log_p = torch.log_softmax(REFERENCE_T[transform](d, eps) / tau, dim=1)
    valid = labels != IGNORE_INDEX
    picked = log_p.gather(1, torch.where(valid, labels, 0).unsqueeze(1)).squeeze(1)
    return -(picked * valid).sum()


def autograd_correction(x, labels, mu, tau, eps, transform):
    x = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(reference_phi(x, labels, mu, tau, eps, transform), x)
    return grad


def kronecker64(n):
    return build_encoding("kronecker", n).centroids.double()


# ------------------------------------------------------------------ the analytic correction


@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
@pytest.mark.parametrize("tau", [0.3, 1.0, 2.5])
def test_correction_equals_autograd_of_phi(transform, tau):
    mu = kronecker64(11)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 4, 5, generator=g, dtype=torch.float64) * 2.2 - 1.1
    x[0, :, 0, 0] = mu[3]  # exactly on a centroid: d = 0 where sqrt(d) alone would be singular
    labels = torch.randint(0, 11, (2, 4, 5), generator=g)
    labels[1, 2, 3] = IGNORE_INDEX
    expected = autograd_correction(x, labels, mu, tau, EPS, transform)
    for chunk in (None, 4, 11):
        got = distance_correction(x, labels, mu, tau, EPS, transform, class_chunk=chunk)
        assert torch.allclose(got, expected, rtol=1e-9, atol=1e-9), (transform, tau, chunk)
    assert torch.equal(got[1, :, 2, 3], torch.zeros(3, dtype=torch.float64))


def test_correction_float32_close_to_float64():
    mu = kronecker64(150)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 6, 6, generator=g, dtype=torch.float64) * 2 - 1
    labels = torch.randint(0, 150, (2, 6, 6), generator=g)
    exact = distance_correction(x, labels, mu, 1.0, EPS, "neg_log")
    single = distance_correction(x.float(), labels, mu.float(), 1.0, EPS, "neg_log", class_chunk=16)
    assert torch.allclose(single.double(), exact, rtol=1e-3, atol=1e-3 * exact.abs().max().item())


@pytest.mark.parametrize("tau", [0.05, 0.2, 1.0, 2.5])
def test_neg_log_power_form_equals_score_form(tau, monkeypatch):
    # T = -log(d + eps) takes a closed form, p_k Z = ((d_min + eps) / (d_k + eps))^(1/tau); under another
    # name the same transform goes through the general exp((T(d_k) - T(d_min)) / tau)
    monkeypatch.setitem(TRANSFORMS, "neg_log_via_scores", TRANSFORMS["neg_log"])
    mu = kronecker64(23)
    g = torch.Generator().manual_seed(5)
    x = torch.rand(2, 3, 5, 6, generator=g, dtype=torch.float64) * 12 - 6  # d up to ~100: (eps/d)^20 ~ 1e-100
    x[0, :, 1, :] = mu[:6].T + 1e-4  # next to a centroid: p_true -> 1
    labels = torch.randint(0, 23, (2, 5, 6), generator=g)
    labels[0, 1, :] = torch.arange(6)
    for chunk in (None, 5):
        fast = distance_correction(x, labels, mu, tau, EPS, "neg_log", class_chunk=chunk)
        general = distance_correction(x, labels, mu, tau, EPS, "neg_log_via_scores", class_chunk=chunk)
        assert torch.isfinite(fast).all()
        assert torch.allclose(fast, general, rtol=1e-10, atol=1e-12 * general.abs().max().item()), (tau, chunk)


def reference_neg_log_correction(x, labels, mu, tau, eps):
    """(2/tau) sum_{k != true} p_k [w_true (x - mu_true) - w_k (x - mu_k)], w = 1/(d + eps), by broadcasting.

    The same grad as autograd of Phi (as sum_k (y_k - p_k) = 0), but without 1 - p_true, which autograd
    of log_softmax forms and which rounds to 0 once p_true -> 1. Labelled pixels only.
    """
    diff = x[:, None] - mu[None, :, :, None, None]  # (B, N, d, H, W)
    d = diff.square().sum(2)
    p = torch.softmax(-torch.log(d + eps) / tau, dim=1)
    term = diff / (d + eps).unsqueeze(2)  # w_k (x - mu_k)
    index = labels[:, None, None].expand(-1, 1, x.shape[1], -1, -1)
    term_true = term.gather(1, index)  # (B, 1, d, H, W)
    p_other = p.scatter(1, labels.unsqueeze(1), 0.0)
    return (2 / tau) * (p_other.unsqueeze(2) * (term_true - term)).sum(1)


@pytest.mark.parametrize("tau", [0.05, 1.0])
def test_correction_where_p_true_rounds_to_one(tau):
    # At 0.03 from the true centroid (N = 150) 1 - p_true is ~1e-20 at tau = 0.05: computed as 1 - p_true,
    # even in float64, it is 0 (autograd of log_softmax misses the pixel's attraction there). Kept out
    # of the sums, every pixel's value stays within 1e-3 of the reference in float32, 1e-9 in float64;
    # and (1/eps)^(1/tau) = 1e60 would overflow float32 if p were not taken relative to the closest class.
    mu = kronecker64(150)
    g = torch.Generator().manual_seed(6)
    labels = torch.randint(0, 150, (1, 4, 16), generator=g)
    x = torch.rand(1, 3, 4, 16, generator=g, dtype=torch.float64) * 8 - 4
    near = mu[labels[0, :2]].permute(2, 0, 1)  # (3, 2, 16): the true centroids of the first two rows
    offset = torch.randn(3, 2, 16, generator=g, dtype=torch.float64)
    x[0, :, :2] = near + 0.03 * offset / offset.norm(dim=0)
    expected = reference_neg_log_correction(x, labels, mu, tau, EPS)
    assert torch.allclose(expected[0, :, 2:], autograd_correction(x, labels, mu, tau, EPS, "neg_log")[0, :, 2:],
                          rtol=1e-9, atol=1e-12)  # the two oracles agree away from the centroids
    for dtype, tolerance in ((torch.float32, 1e-3), (torch.float64, 1e-9)):
        for chunk in (None, 16):
            got = distance_correction(x.to(dtype), labels, mu.to(dtype), tau, EPS, "neg_log", chunk).double()
            assert torch.isfinite(got).all()
            error = (got - expected).norm(dim=1) / expected.norm(dim=1)
            assert (error < tolerance).all(), (tau, dtype, chunk, error.max().item())


def test_correction_in_small_pixel_blocks(monkeypatch):
    # blocks of 2 pixels (the last one ragged) and class chunks of 4 give the autograd values too
    monkeypatch.setattr(objective, "CORRECTION_BLOCK_ELEMENTS_CPU", 8)
    mu = kronecker64(11)
    g = torch.Generator().manual_seed(7)
    x = torch.rand(2, 3, 3, 5, generator=g, dtype=torch.float64) * 2.2 - 1.1
    labels = torch.randint(0, 11, (2, 3, 5), generator=g)
    labels[1, 0, 1] = IGNORE_INDEX
    for transform, tau in (("neg_log", 1.0), ("neg_log", 0.3), ("inverse", 0.7)):
        expected = autograd_correction(x, labels, mu, tau, EPS, transform)
        got = distance_correction(x, labels, mu, tau, EPS, transform, class_chunk=4)
        assert torch.allclose(got, expected, rtol=1e-9, atol=1e-9), (transform, tau)


def test_minus_grad_attracts_in_one_dimension():
    # d = 1, classes at -1 and +1, true class +1: between them, attraction to +1 and repulsion from -1
    # both point to +1. (Beyond -1 the repulsion points outwards and can win: see docs/core.md.)
    mu = torch.tensor([[-1.0], [1.0]], dtype=torch.float64)
    x = torch.linspace(-0.99, 0.99, 50, dtype=torch.float64).view(1, 1, 1, 50)
    labels = torch.ones(1, 1, 50, dtype=torch.long)
    for transform in TRANSFORMS:
        step = -distance_correction(x, labels, mu, 1.0, EPS, transform)
        assert (step >= 0).all() and (step[..., :25] > 0).all(), transform  # 1/d saturates to 0 near +1


@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
def test_each_class_term_attracts_to_true_and_repels_from_others(transform):
    # -grad_x = sum_k dPhi/dmu_k (Phi depends on x - mu_k only), so autograd w.r.t. each centroid gives
    # class k's share of the step: it must point from x to mu_true for the true class and from mu_k
    # to x for every other class.
    mu = kronecker64(19)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(40, 3, generator=g, dtype=torch.float64) * 2 - 1  # (P, d)
    true = torch.randint(0, 19, (40,), generator=g)
    per_pixel_mu = mu.expand(40, 19, 3).clone().requires_grad_(True)  # (P, N, d)
    d = (x[:, None] - per_pixel_mu).square().sum(-1)
    phi = -torch.log_softmax(REFERENCE_T[transform](d, EPS), dim=1)[torch.arange(40), true].sum()
    (share,) = torch.autograd.grad(phi, per_pixel_mu)  # (P, N, d)
    step = -distance_correction(x.T.reshape(1, 3, 1, 40), true.view(1, 1, 40), mu, 1.0, EPS, transform)
    assert torch.allclose(share.sum(1), step.reshape(3, 40).T, atol=1e-9)
    outward = x[:, None] - mu[None]  # (P, N, d) from mu_k to x
    coefficient = (share * outward).sum(-1) / outward.square().sum(-1)  # (P, N)
    assert torch.allclose(share, coefficient.unsqueeze(-1) * outward, atol=1e-12)  # parallel
    is_true = torch.nn.functional.one_hot(true, 19).bool()
    assert (coefficient[is_true] <= 0).all() and (coefficient[~is_true] >= 0).all()
    assert (coefficient[is_true] < 0).sum() > 20


def test_neg_log_step_points_home_near_true_and_away_near_wrong_centroids():
    # the net effect the paper relies on, for its default T(d) = -log(d + eps): within 0.05 of a centroid
    # (N = 19, spacing ~0.59) the step points to it if it is the true class and away from it otherwise
    mu = kronecker64(19)
    directions = torch.randn(64, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    directions /= directions.norm(dim=1, keepdim=True)
    true, wrong = 5, 12
    labels = torch.full((1, 1, 64), true)
    x = (mu[true] + 0.05 * directions).T.reshape(1, 3, 1, 64)
    step = -distance_correction(x, labels, mu, 1.0, EPS, "neg_log")
    assert ((step * (mu[true].view(1, 3, 1, 1) - x)).sum(1) > 0).all()
    x = (mu[wrong] + 0.05 * directions).T.reshape(1, 3, 1, 64)
    step = -distance_correction(x, labels, mu, 1.0, EPS, "neg_log")
    assert ((step * (x - mu[wrong].view(1, 3, 1, 1))).sum(1) > 0).all()


@pytest.mark.parametrize("transform", ["neg_log", "inverse"])
def test_correction_vanishes_at_the_true_centroid_as_eps_shrinks(transform):
    # at x1_hat = mu_true only the other classes' p_k remain: p_k = O(eps) for -log, O(exp(-1/eps)) for 1/d
    mu = kronecker64(19)
    labels = torch.arange(19).view(1, 1, 19)
    x = mu.T.reshape(1, 3, 1, 19).clone()
    norms = [distance_correction(x, labels, mu, 1.0, eps, transform).norm(dim=1).max().item()
             for eps in (1e-3, 1e-4, 1e-5)]
    away = distance_correction(x + 0.1, labels, mu, 1.0, 1e-3, transform).norm(dim=1).min().item()
    assert norms[0] < 0.05 * away
    if transform == "neg_log":
        assert norms[0] / norms[1] == pytest.approx(10, rel=0.05) and norms[1] / norms[2] == pytest.approx(10, rel=0.05)
    else:
        assert norms[1] < 1e-30


def test_correction_rejects_bad_input():
    mu = kronecker64(5)
    x = torch.zeros(1, 3, 2, 2, dtype=torch.float64)
    labels = torch.zeros(1, 2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="do not match"):
        distance_correction(x, torch.zeros(1, 2, 3, dtype=torch.long), mu, 1.0, EPS)
    with pytest.raises(ValueError, match="outside"):
        distance_correction(x, labels + 5, mu, 1.0, EPS)
    with pytest.raises(ValueError, match="tau and eps must be > 0"):
        distance_correction(x, labels, mu, 0.0, EPS)
    with pytest.raises(ValueError, match="non-finite"):
        distance_correction(x * math.inf, labels, mu, 1.0, EPS)
    with pytest.raises(ValueError, match="unknown distance transform"):
        distance_correction(x, labels, mu, 1.0, EPS, "square")


# ------------------------------------------------------------------ the objective


def zero_model(x_t, t, image):
    return torch.zeros_like(x_t)


def make_batch(n=7, seed=0, shape=(3, 4, 5)):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(shape[0], 3, *shape[1:], generator=g) * 2 - 1
    labels = torch.randint(0, n, shape, generator=g)
    labels[0, 0, :2] = IGNORE_INDEX
    return image, labels


def test_vanilla_loss_closed_form_with_zero_model():
    # v_pred = 0, so L = mean over valid pixels of ||x_1 - x_0||^2, whatever t is
    enc = build_encoding("kronecker", 7)
    image, labels = make_batch()
    out = FlowMatchingObjective(enc, ObjectiveConfig(kind="vanilla"))(zero_model, image, labels)
    valid = labels != IGNORE_INDEX
    mu = enc.centroids[labels.clamp(max=6)].permute(0, 3, 1, 2)
    expected = (mu - image).square().sum(1)[valid].mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.metrics["loss_fm"] == pytest.approx(out.metrics["loss"]) and out.metrics["correction_norm"] == 0.0
    # unmasked, the ignore pixels count with target 0 - x_0
    unmasked = FlowMatchingObjective(enc, ObjectiveConfig(kind="vanilla", mask_ignore=False))(zero_model, image, labels)
    target = torch.where(valid.unsqueeze(1), mu - image, -image)
    assert unmasked.loss.item() == pytest.approx(target.square().sum(1).mean().item(), rel=1e-5)


def test_perfect_models_have_zero_vanilla_loss():
    enc = build_encoding("bits", 7)
    image, labels = make_batch()
    x0 = image_to_x0(image, enc.dim)
    x1 = enc.encode(labels, ignore_fill=x0)
    v_model = lambda x_t, t, img: x1 - x0  # noqa: E731
    x_model = lambda x_t, t, img: x1  # noqa: E731
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert FlowMatchingObjective(enc, ObjectiveConfig(kind="vanilla"))(v_model, image, labels).loss.item() < 1e-10
    t = FlowMatchingObjective(enc).targets(zero_model, image, labels, generator=gen()).t
    assert (t < 1 - 0.05).all()  # x-prediction is exact away from the clipped end
    x_obj = FlowMatchingObjective(enc, ObjectiveConfig(kind="vanilla", parameterization="x"))
    assert x_obj(x_model, image, labels, generator=gen()).loss.item() < 1e-10


@pytest.mark.parametrize("parameterization", ["v", "x"])
@pytest.mark.parametrize("transform", ["neg_log", "identity"])
def test_reshaped_loss_against_autograd_target(parameterization, transform):
    enc = build_encoding("kronecker", 7)
    image, labels = make_batch()
    head = torch.nn.Conv2d(3, 3, 1).double()
    model = lambda x_t, t, img: head(x_t.double())  # noqa: E731
    cfg = ObjectiveConfig(tau=0.7, lam=0.4, transform=transform, parameterization=parameterization,
                          t_zero_fraction=0.0)
    objective = FlowMatchingObjective(enc, cfg)
    image = image.double()
    out = objective(model, image, labels, generator=torch.Generator().manual_seed(4))
    # rebuild the draw independently: same t, x_t from the path, x1_hat from the parameterisation
    t = torch.rand(3, generator=torch.Generator().manual_seed(4)).double()
    mu = enc.centroids.double()
    valid = labels != IGNORE_INDEX
    x1 = torch.where(valid.unsqueeze(1), mu[labels.clamp(max=6)].permute(0, 3, 1, 2), image)
    x_t = interpolate(image, x1, t)
    output = model(x_t, t, image)
    gap = (1 - t).view(-1, 1, 1, 1)
    x1_hat = x_t + gap * output if parameterization == "v" else output
    v_pred = output if parameterization == "v" else (output - x_t) / gap.clamp_min(0.05)
    v_target = (x1 - image) - 0.4 * autograd_correction(x1_hat, labels, mu, 0.7, 1e-3, transform)
    expected = (v_pred - v_target).square().sum(1)[valid].mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-9)


def test_correction_clip_bounds_each_pixel_and_keeps_its_direction():
    enc = build_encoding("kronecker", 7)
    image, labels = make_batch()
    output = 3 * torch.randn(3, 3, 4, 5, generator=torch.Generator().manual_seed(1))

    def correction(clip):  # lambda * dPhi/dx1_hat after the clip, for one fixed draw
        cfg = ObjectiveConfig(lam=2.0, correction_clip=clip)
        f = FlowMatchingObjective(enc, cfg).targets(lambda x_t, t, img: output, image, labels,
                                                    generator=torch.Generator().manual_seed(0))
        return f.v_star - f.v_target  # (B, d, H, W)

    free, clipped = correction(None), correction(0.5)
    norm = free.norm(dim=1, keepdim=True)  # (B, 1, H, W)
    large = norm > 0.5
    assert large.any() and (~large & (norm > 0)).any()  # the draw has pixels on both sides of c
    expected = torch.where(large, free * 0.5 / norm.clamp_min(1e-12), free)  # norm c, same direction
    assert torch.allclose(clipped, expected, atol=1e-6)
    assert clipped.norm(dim=1).max() <= 0.5 + 1e-6


def test_correction_is_detached_from_the_model():
    enc = build_encoding("kronecker", 7)
    image, labels = make_batch()
    output = torch.randn(3, 3, 4, 5, requires_grad=True)
    objective = FlowMatchingObjective(enc)
    f = objective.targets(lambda x_t, t, img: output, image, labels, generator=torch.Generator().manual_seed(0))
    assert not f.v_target.requires_grad and not f.x1_hat.requires_grad
    loss = objective(lambda x_t, t, img: output, image, labels, generator=torch.Generator().manual_seed(0)).loss
    (grad,) = torch.autograd.grad(loss, output)
    # first-order only: dL/dv = 2 (v - v_target) / #valid on valid pixels, 0 elsewhere
    count = (labels != IGNORE_INDEX).sum()
    expected = 2 * (output - f.v_target) * (labels != IGNORE_INDEX).unsqueeze(1) / count
    assert torch.allclose(grad, expected, atol=1e-6)


def test_masked_ignore_pixels_do_not_affect_the_loss():
    enc = build_encoding("kronecker", 7)
    image, labels = make_batch()
    ignore = (labels == IGNORE_INDEX).unsqueeze(1)

    def model(perturb):
        return lambda x_t, t, img: torch.where(ignore, perturb, 0.1 * x_t)

    objective = FlowMatchingObjective(enc)
    a = objective(model(0.0), image, labels, generator=torch.Generator().manual_seed(0)).loss
    b = objective(model(50.0), image, labels, generator=torch.Generator().manual_seed(0)).loss
    assert a.item() == b.item()
    f = objective.targets(model(0.0), image, labels)
    assert torch.equal(f.v_star * ignore, torch.zeros_like(f.v_star))  # x_1 = x_0 there


def test_class_chunking_and_lambda_schedule():
    enc = build_encoding("kronecker", 40)
    image, labels = make_batch(40)
    model = lambda x_t, t, img: 0.3 * x_t  # noqa: E731
    losses = [FlowMatchingObjective(enc, ObjectiveConfig(class_chunk=c))(
        model, image, labels, generator=torch.Generator().manual_seed(1)).loss.item() for c in (None, 6)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    annealed = FlowMatchingObjective(enc, ObjectiveConfig(lam=2.0, lam_schedule="annealed"))
    assert [annealed.lam_at(p) for p in (0.0, 0.25, 1.0)] == [2.0, 1.5, 0.0]
    assert FlowMatchingObjective(enc, ObjectiveConfig(lam=2.0)).lam_at(0.9) == 2.0
    # at the end of an annealed run the reshaped loss is the vanilla loss
    vanilla = FlowMatchingObjective(enc, ObjectiveConfig(kind="vanilla"))
    gen = lambda: torch.Generator().manual_seed(2)  # noqa: E731
    end = annealed(model, image, labels, progress=1.0, generator=gen())
    assert end.loss.item() == vanilla(model, image, labels, generator=gen()).loss.item()
    with pytest.raises(ValueError, match=r"progress must be in \[0, 1\]"):
        annealed.lam_at(1.5)


def test_objective_rejects_bad_input():
    enc = build_encoding("kronecker", 7)
    image, labels = make_batch()
    with pytest.raises(ValueError, match="ObjectiveConfig.kind must be one of"):
        ObjectiveConfig(kind="fancy")
    with pytest.raises(ValueError, match="ObjectiveConfig.tau must be > 0"):
        ObjectiveConfig(tau=0.0)
    with pytest.raises(ValueError, match="ObjectiveConfig.transform"):
        ObjectiveConfig(transform="cube")
    with pytest.raises(ValueError, match="lam must be >= 0"):
        ObjectiveConfig(lam=-1.0)
    with pytest.raises(ValueError, match="correction_clip must be > 0 or None, got 0.0"):
        ObjectiveConfig(correction_clip=0.0)
    objective = FlowMatchingObjective(enc)
    with pytest.raises(ValueError, match="do not match image"):
        objective(zero_model, image, labels[:, :3])
    with pytest.raises(ValueError, match="network output and x_t"):
        objective(lambda x_t, t, img: x_t[:, :2], image, labels)
    with pytest.raises(ValueError, match="non-finite"):
        objective(zero_model, image * math.nan, labels)


# ------------------------------------------------------------------ discriminative baseline


def test_discriminative_loss_by_hand():
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 0.0]], [[1.0, 5.0]]]])  # (1, 3, 1, 2)
    labels = torch.tensor([[[0, IGNORE_INDEX]]])
    out = discriminative_loss(logits, labels)
    assert out.loss.item() == pytest.approx(-(2.0 - math.log(math.exp(2) + 1 + math.e)))
    assert out.metrics["pixel_accuracy"] == 1.0
    empty = discriminative_loss(logits, torch.full((1, 1, 2), IGNORE_INDEX))
    assert empty.loss.item() == 0.0
    with pytest.raises(ValueError, match="do not match logits"):
        discriminative_loss(logits, torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="outside"):
        discriminative_loss(logits, torch.tensor([[[0, 3]]]))


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
    assert out.metrics["loss_token"] == pytest.approx(expected.item(), rel=1e-6)
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
    with pytest.raises(ValueError, match="outside"):
        token_classification_loss(torch.zeros(1, 2, 3), torch.full((1, 2, 4), 3), patch_size=2)
    with pytest.raises(ValueError, match=r"\(B, L, N\)"):
        token_classification_loss(torch.zeros(1, 2, 3, 1), labels, patch_size=2)
