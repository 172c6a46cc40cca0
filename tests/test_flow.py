import pytest
import torch

from flowseg.flow import (
    MIN_TIME_GAP, image_to_x0, interpolate, noisy_x0, sample_t, target_velocity, to_clean_estimate, to_velocity,
)


def rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_x0_map_by_hand():
    image = rand(2, 3, 4, 5)
    r, g, b = image[:, 0], image[:, 1], image[:, 2]
    assert image_to_x0(image, 3) is image
    assert torch.allclose(image_to_x0(image, 1)[:, 0], (r + g + b) / 3)
    two = image_to_x0(image, 2)
    assert torch.allclose(two[:, 0], (r + b) / 2) and torch.allclose(two[:, 1], g)
    five = image_to_x0(image, 5)
    for channel, source in enumerate((r, g, b, r, g)):
        assert torch.equal(five[:, channel], source)
    assert image_to_x0(image, 150).abs().max() <= 1.0


def test_path_endpoints_and_velocity_is_the_time_derivative():
    x0, x1 = rand(3, 2, 4, 4, seed=1), rand(3, 2, 4, 4, seed=2)
    assert torch.equal(interpolate(x0, x1, torch.zeros(3)), x0)
    assert torch.allclose(interpolate(x0, x1, torch.ones(3)), x1)
    t = torch.tensor([0.1, 0.5, 0.9], requires_grad=True)
    (dxdt,) = torch.autograd.grad(interpolate(x0, x1, t), t, grad_outputs=torch.ones(3, 2, 4, 4))
    # d/dt sum_pixels x_t = sum_pixels (x_1 - x_0), per batch element
    assert torch.allclose(dxdt, target_velocity(x0, x1).sum((1, 2, 3)), atol=1e-5)


def test_sample_t_is_uniform_and_seeded():
    u = sample_t(20000, generator=torch.Generator().manual_seed(0))
    assert u.shape == (20000,) and u.min() >= 0 and u.max() <= 1
    assert u.mean().item() == pytest.approx(0.5, abs=0.01) and u.var().item() == pytest.approx(1 / 12, abs=0.003)
    again = sample_t(5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(again, sample_t(5, generator=torch.Generator().manual_seed(7)))


def test_noisy_x0_is_the_image_map_plus_gaussian_noise_of_std_sigma():
    image = rand(4, 3, 32, 32)
    assert torch.equal(noisy_x0(image, 5, 0.0), image_to_x0(image, 5))
    noise = noisy_x0(image, 5, 0.5, torch.Generator().manual_seed(0)) - image_to_x0(image, 5)
    assert noise.mean().item() == pytest.approx(0.0, abs=0.02) and noise.std().item() == pytest.approx(0.5, abs=0.01)
    # channels copied from the same image channel get independent noise
    assert abs(torch.corrcoef(torch.stack([noise[:, 0].flatten(), noise[:, 3].flatten()]))[0, 1].item()) < 0.05
    assert torch.equal(noisy_x0(image, 5, 0.5, torch.Generator().manual_seed(0)) - image_to_x0(image, 5), noise)


def test_parameterizations_agree_on_the_straight_path():
    x0, x1 = rand(4, 3, 2, 2, seed=3), rand(4, 3, 2, 2, seed=4)
    t = torch.tensor([0.0, 0.3, 0.7, 0.94])
    x_t = interpolate(x0, x1, t)
    v_star = target_velocity(x0, x1)
    # a perfect v-model outputs v*, a perfect x-model outputs x_1; both describe the same state
    assert torch.allclose(to_clean_estimate(v_star, x_t, t, "v"), x1, atol=1e-6)
    assert torch.equal(to_clean_estimate(x1, x_t, t, "x"), x1)
    assert torch.equal(to_velocity(v_star, x_t, t, "v"), v_star)
    assert torch.allclose(to_velocity(x1, x_t, t, "x"), v_star, atol=1e-5)


def test_x_prediction_clips_the_time_gap():
    x_t, out = torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1)
    assert to_velocity(out, x_t, torch.ones(1), "x").item() == pytest.approx(1 / MIN_TIME_GAP)


def test_bad_input():
    x = torch.zeros(2, 3, 2, 2)
    with pytest.raises(ValueError, match=r"t must have shape \(2,\)"):
        interpolate(x, x, torch.zeros(3))
    with pytest.raises(ValueError, match="same shape"):
        target_velocity(x, torch.zeros(2, 3, 2, 3))
    with pytest.raises(ValueError, match="unknown parameterization 'eps'"):
        to_velocity(x, x, torch.zeros(2), "eps")
    with pytest.raises(ValueError, match="network output and x_t"):
        to_clean_estimate(torch.zeros(2, 4, 2, 2), x, torch.zeros(2))
    with pytest.raises(ValueError, match=r"image must have shape \(B, 3, H, W\)"):
        image_to_x0(torch.zeros(2, 1, 2, 2), 3)
    with pytest.raises(ValueError, match="dim must be a positive int"):
        image_to_x0(x, 0)


def test_sample_t_zero_fraction_puts_that_share_at_t0_and_keeps_the_rest_uniform():
    gen = torch.Generator().manual_seed(0)
    t = sample_t(200_000, generator=gen, zero_fraction=0.3)
    at_zero = t == 0
    # a uniform draw is exactly 0 with probability ~2^-24, so the zeros are the forced ones
    assert abs(at_zero.float().mean().item() - 0.3) < 0.005
    rest = t[~at_zero]
    assert abs(rest.mean().item() - 0.5) < 0.005 and abs(rest.var().item() - 1 / 12) < 0.002
    assert torch.equal(sample_t(64, generator=torch.Generator().manual_seed(1), zero_fraction=1.0), torch.zeros(64))
    with pytest.raises(ValueError, match="zero_fraction"):
        sample_t(4, zero_fraction=1.5)
