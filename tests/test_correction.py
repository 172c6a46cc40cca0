"""The distance-aware correction: the closed-form kernel against its autograd reference, and its geometry."""
import pytest
import torch

from flowseg import correction
from flowseg.correction import distance_correction, reference_correction
from flowseg.encoding import IGNORE_INDEX, TRANSFORMS, build_encoding

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


# ------------------------------------------------------------------ the kernel against the reference


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
    assert torch.allclose(reference_correction(x, labels, mu, tau, EPS, transform), expected, rtol=1e-12, atol=1e-12)
    for chunk in (None, 4, 11):
        got = distance_correction(x, labels, mu, tau, EPS, transform, class_chunk=chunk)
        assert torch.allclose(got, expected, rtol=1e-9, atol=1e-9), (transform, tau, chunk)
    assert torch.equal(got[1, :, 2, 3], torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
@pytest.mark.parametrize("seed", range(4))
def test_kernel_matches_the_reference_on_random_inputs(transform, seed, monkeypatch):
    """Random classes, dimension, image size, temperature and share of ignore pixels; every class chunk
    width from 1 to N, and pixel blocks from 3 pixels to the whole batch."""
    g = torch.Generator().manual_seed(seed)
    num_classes, dim = int(torch.randint(2, 30, (), generator=g)), int(torch.randint(1, 7, (), generator=g))
    mu = torch.rand(num_classes, dim, generator=g, dtype=torch.float64) * 2 - 1
    batch, height, width = (int(v) for v in torch.randint(1, 6, (3,), generator=g))
    x = torch.randn(batch, dim, height, width, generator=g, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (batch, height, width), generator=g)
    labels[torch.rand(labels.shape, generator=g) < 0.2] = IGNORE_INDEX
    tau = float(torch.empty((), dtype=torch.float64).uniform_(0.2, 3.0, generator=g))
    expected = reference_correction(x, labels, mu, tau, EPS, transform)
    assert torch.equal(expected * (labels == IGNORE_INDEX).unsqueeze(1), torch.zeros_like(expected))
    for block_entries in (3 * num_classes, correction.CORRECTION_BLOCK_ELEMENTS_CPU):
        monkeypatch.setattr(correction, "CORRECTION_BLOCK_ELEMENTS_CPU", block_entries)
        for chunk in (None, 1, 3, num_classes):
            got = distance_correction(x, labels, mu, tau, EPS, transform, class_chunk=chunk)
            torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


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
    monkeypatch.setattr(correction, "CORRECTION_BLOCK_ELEMENTS_CPU", 8)
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
    with pytest.raises(ValueError, match=r"x1_hat must have shape \(B, 3, H, W\), got \(1, 2, 2, 2\)"):
        distance_correction(x[:, :2], labels, mu, 1.0, EPS)
    with pytest.raises(ValueError, match="tau and eps must be > 0"):
        distance_correction(x, labels, mu, 0.0, EPS)
    with pytest.raises(ValueError, match="unknown distance transform"):
        distance_correction(x, labels, mu, 1.0, EPS, "square")
