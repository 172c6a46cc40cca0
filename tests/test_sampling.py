import math

import pytest
import torch

from flowseg.encoding import build_encoding
from flowseg.flow import image_to_x0
from flowseg.sampling import integrate, segment


def rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1


def time_field(a, b):
    """v(x, t) = a + b t: exact end point x_0 + a + b / 2."""
    return lambda x, t, image: a + b * t.view(-1, 1, 1, 1)


@pytest.mark.parametrize("steps", [1, 3, 10])
def test_time_dependent_field_closed_forms(steps):
    x0, a, b = rand(2, 3, 4, 4), rand(2, 3, 4, 4, seed=1), rand(2, 3, 4, 4, seed=2)
    exact = x0 + a + b / 2
    # Heun is the trapezoid rule here: exact for a field linear in t
    assert torch.allclose(integrate(time_field(a, b), x0, None, steps, "heun").x1, exact, atol=1e-12)
    # Euler is the left Riemann sum: x_0 + a + b (1 - 1/S) / 2
    euler = integrate(time_field(a, b), x0, None, steps, "euler").x1
    assert torch.allclose(euler, x0 + a + b * (1 - 1 / steps) / 2, atol=1e-12)
    constant = integrate(time_field(a, torch.zeros_like(b)), x0, None, steps, "euler").x1
    assert torch.allclose(constant, x0 + a, atol=1e-12)


def test_linear_ode_closed_forms_and_orders():
    # dx/dt = -x: exact x_0 e^-1; Euler multiplies by (1 - h) per step, Heun by (1 - h + h^2 / 2)
    x0 = rand(1, 2, 3, 3)
    decay = lambda x, t, image: -x  # noqa: E731
    errors = {"euler": [], "heun": []}
    for steps in (8, 16, 32):
        h = 1 / steps
        euler = integrate(decay, x0, None, steps, "euler").x1
        heun = integrate(decay, x0, None, steps, "heun").x1
        assert torch.allclose(euler, x0 * (1 - h) ** steps, atol=1e-13)
        assert torch.allclose(heun, x0 * (1 - h + h * h / 2) ** steps, atol=1e-13)
        errors["euler"].append((euler - x0 * math.exp(-1)).abs().max().item())
        errors["heun"].append((heun - x0 * math.exp(-1)).abs().max().item())
    for coarse, fine in zip(errors["euler"], errors["euler"][1:]):
        assert coarse / fine == pytest.approx(2, rel=0.1)  # first order
    for coarse, fine in zip(errors["heun"], errors["heun"][1:]):
        assert coarse / fine == pytest.approx(4, rel=0.1)  # second order


def test_trajectory_times_and_calls():
    x0 = rand(2, 3, 2, 2)
    seen = []

    def field(x, t, image):
        seen.append(t.clone())
        assert t.shape == (2,) and image == "img"
        return torch.ones_like(x)

    result = integrate(field, x0, "img", steps=4, method="heun", return_trajectory=True)
    assert result.trajectory.shape == (5, 2, 3, 2, 2)
    assert torch.equal(result.trajectory[0], x0) and torch.equal(result.trajectory[-1], result.x1)
    assert torch.allclose(result.times, torch.tensor([0, 0.25, 0.5, 0.75, 1], dtype=torch.float64))
    assert len(seen) == 8 and seen[-1].tolist() == [1.0, 1.0]  # 2 calls a step, the last at t = 1
    assert integrate(field, x0, "img", steps=4).trajectory is None


@pytest.mark.parametrize("name", ["kronecker", "bits"])
def test_segment_recovers_labels_from_the_ideal_field(name):
    enc = build_encoding(name, 19)
    image = rand(2, 3, 5, 5).float()
    labels = torch.randint(0, 19, (2, 5, 5), generator=torch.Generator().manual_seed(3))
    v_star = enc.encode(labels) - image_to_x0(image, enc.dim)
    predicted, sample = segment(lambda x, t, img: v_star, image, enc, steps=7, method="euler")
    assert torch.equal(predicted, labels)
    assert torch.allclose(sample.x1, enc.encode(labels), atol=1e-5)


def test_bad_input():
    x0 = torch.zeros(1, 3, 2, 2)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        integrate(lambda x, t, i: x, x0, None, steps=0)
    with pytest.raises(ValueError, match="unknown integration method 'rk4'"):
        integrate(lambda x, t, i: x, x0, None, method="rk4")
    with pytest.raises(ValueError, match=r"velocity_fn returned shape \(1, 2, 2, 2\)"):
        integrate(lambda x, t, i: x[:, :2], x0, None)
    with pytest.raises(ValueError, match=r"x0 must have shape"):
        integrate(lambda x, t, i: x, torch.zeros(3, 2, 2), None)


def two_class_field(prior_a, m, sigma, mu=(-1.0, 1.0)):
    """The exact marginal velocity of x_t = (1 - t) x_0 + t x_1, x_0 ~ N(m, sigma^2), x_1 = mu_a or mu_b
    with probabilities (prior_a, 1 - prior_a), in one dimension:

        v(x, t) = (E[x_1 | x_t = x] - x) / (1 - t),
        P(x_1 = mu_k | x_t = x) ~ pi_k exp(-(x - (1 - t) m - t mu_k)^2 / (2 (1 - t)^2 sigma^2))
    """
    prior = torch.tensor([prior_a, 1.0 - prior_a], dtype=torch.float64)
    centroids = torch.tensor(mu, dtype=torch.float64)

    def velocity(x, t, image):
        t = t.view(-1, 1, 1, 1)
        mean = (1 - t) * m + t * centroids.view(1, 2, 1, 1)  # (B, 2, 1, 1) where each x_1 would put x_t
        log_w = prior.log().view(1, 2, 1, 1) - (x - mean).square() / (2 * ((1 - t) * sigma).square())
        x1_mean = (log_w.softmax(1) * centroids.view(1, 2, 1, 1)).sum(1, keepdim=True)
        return (x1_mean - x) / (1 - t)
    return velocity


@pytest.mark.parametrize("prior_a", [0.3, 0.7])
def test_noisy_start_flow_from_the_mean_reaches_the_majority_class_and_one_step_is_the_posterior_mean(prior_a):
    m, sigma = 0.2, 1.0
    field = two_class_field(prior_a, m, sigma)
    x0 = torch.full((1, 1, 1, 1), m, dtype=torch.float64)
    one = integrate(field, x0, None, 1).x1
    assert torch.allclose(one, torch.tensor(prior_a * -1 + (1 - prior_a) * 1.0, dtype=torch.float64))
    many = integrate(field, x0, None, 400).x1
    majority = -1.0 if prior_a > 0.5 else 1.0
    assert abs(many.item() - majority) < 1e-2
    # from x_0 ~ N(m, sigma^2) the same field sends a share prior_a of the starts to mu_a
    starts = m + sigma * torch.randn(4000, 1, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ends = integrate(field, starts, None, 400).x1
    assert ((ends - -1.0).abs() < 1e-2).logical_or((ends - 1.0).abs() < 1e-2).all()
    assert abs((ends < 0).double().mean().item() - prior_a) < 0.03
