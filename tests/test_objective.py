"""The flow matching objective: closed forms, the reshaped target against autograd, masking, schedules,
the categorical objective."""
import math

import pytest
import torch

from flowseg.correction import reference_correction
from flowseg.encoding import IGNORE_INDEX, build_encoding
from flowseg.flow import image_to_x0, interpolate
from flowseg.objective import FlowMatchingObjective, ObjectiveConfig


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
    out = FlowMatchingObjective(enc, ObjectiveConfig(x0_noise=0.0, kind="vanilla"))(zero_model, image, labels)
    valid = labels != IGNORE_INDEX
    mu = enc.centroids[labels.clamp(max=6)].permute(0, 3, 1, 2)
    expected = (mu - image).square().sum(1)[valid].mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.metrics["loss_fm"].item() == pytest.approx(out.loss.item()) and out.metrics["correction_norm"].item() == 0
    # unmasked, the ignore pixels count with target 0 - x_0
    unmasked = FlowMatchingObjective(enc, ObjectiveConfig(x0_noise=0.0, kind="vanilla", mask_ignore=False))(zero_model, image, labels)
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
    assert FlowMatchingObjective(enc, ObjectiveConfig(x0_noise=0.0, kind="vanilla"))(v_model, image, labels).loss.item() < 1e-10
    t = FlowMatchingObjective(enc).targets(zero_model, image, labels, generator=gen()).t
    assert (t < 1 - 0.05).all()  # x-prediction is exact away from the clipped end
    x_obj = FlowMatchingObjective(enc, ObjectiveConfig(x0_noise=0.0, kind="vanilla", parameterization="x"))
    assert x_obj(x_model, image, labels, generator=gen()).loss.item() < 1e-10


@pytest.mark.parametrize("parameterization", ["v", "x"])
@pytest.mark.parametrize("transform", ["neg_log", "identity"])
def test_reshaped_loss_against_autograd_target(parameterization, transform):
    enc = build_encoding("kronecker", 7)
    image, labels = make_batch()
    head = torch.nn.Conv2d(3, 3, 1).double()
    model = lambda x_t, t, img: head(x_t.double())  # noqa: E731
    cfg = ObjectiveConfig(x0_noise=0.0, tau=0.7, lam=0.4, transform=transform, parameterization=parameterization,
                          correction_clip=None,  # the paper's unbounded target
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
    v_target = (x1 - image) - 0.4 * reference_correction(x1_hat, labels, mu, 0.7, 1e-3, transform)
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



def test_targets_closed_form_for_zero_model():
    # vanilla, v_pred = 0: v_target - v_pred = v* = x_1 - x_0, x1_hat = x_t, so ||x1_hat - x_1|| = (1 - t) ||v*||
    enc = build_encoding("kronecker", 7)
    image, labels = make_batch()
    f = FlowMatchingObjective(enc, ObjectiveConfig(x0_noise=0.0, kind="vanilla")).targets(zero_model, image, labels)
    x1 = enc.encode(labels, ignore_fill=image)
    span = (x1 - image).norm(dim=1)
    assert torch.allclose((f.v_target - f.v_pred).norm(dim=1), span, atol=1e-6)
    assert torch.allclose((f.x1_hat - x1).norm(dim=1), (1 - f.t).view(-1, 1, 1) * span, atol=1e-6)
    assert torch.equal(f.valid, labels != IGNORE_INDEX) and torch.equal(f.weight, f.valid.float())


@pytest.mark.parametrize("mask_ignore", [True, False])
def test_sample_path_is_the_straight_path_from_the_image_to_the_encoded_mask(mask_ignore):
    enc = build_encoding("bits", 7)  # d = 3 bits
    image, labels = make_batch()
    objective = FlowMatchingObjective(enc, ObjectiveConfig(mask_ignore=mask_ignore, t_zero_fraction=0.5,
                                                           x0_noise=0.0))
    path = objective.sample_path(image, labels, torch.Generator().manual_seed(3))
    assert torch.equal(path.x_0, image_to_x0(image, 3))
    assert torch.equal(path.x_1, enc.encode(labels, ignore_fill=image if mask_ignore else None))
    assert torch.allclose(path.x_t, interpolate(path.x_0, path.x_1, path.t))
    assert torch.equal(path.labels, labels) and torch.equal(path.valid, labels != IGNORE_INDEX)
    # the same draw through the training path (sample_path, network, loss) and through __call__
    model = lambda x_t, t, img: 0.3 * x_t + img  # noqa: E731
    by_parts = objective.loss(model(path.x_t, path.t, image), path)
    whole = objective(model, image, labels, generator=torch.Generator().manual_seed(3))
    assert by_parts.loss.item() == whole.loss.item()
    with pytest.raises(ValueError, match="do not match image"):
        objective.sample_path(image, labels[:, :3])


def categorical_logits(labels, n, margin):
    """Logits with `margin` on each pixel's label and 0 elsewhere; garbage at ignore pixels."""
    logits = margin * torch.nn.functional.one_hot(labels.clamp(max=n - 1), n).permute(0, 3, 1, 2).double()
    return torch.where((labels == IGNORE_INDEX).unsqueeze(1), torch.full_like(logits, 1e3), logits)


@pytest.mark.parametrize("margin", [0.0, 2.0])
def test_categorical_loss_is_the_cross_entropy_over_labelled_pixels(margin):
    # -log p_label = log(1 + (N - 1) e^-margin) at every labelled pixel (log N for zero logits); the
    # ignore pixels' logits are garbage and must not count
    n = 7
    image, labels = make_batch(n)
    objective = FlowMatchingObjective(build_encoding("kronecker", n), ObjectiveConfig(kind="categorical"))
    out = objective.loss(categorical_logits(labels, n, margin), objective.sample_path(image, labels))
    assert out.loss.item() == pytest.approx(math.log(1 + (n - 1) * math.exp(-margin)), rel=1e-9)
    assert out.metrics["loss_ce"].item() == pytest.approx(out.loss.item())


def test_categorical_velocity_is_the_straight_velocity_for_a_sure_class_and_points_at_the_mean_for_uniform_p():
    # p = one-hot(label): x1_hat = x_1, so v = (x_1 - x_t) / (1 - t) = x_1 - x_0 on the straight path;
    # zero logits: v = (mean of the mu_k - x_t) / (1 - t)
    n = 7
    encoding = build_encoding("kronecker", n)
    image, labels = make_batch(n)
    objective = FlowMatchingObjective(encoding, ObjectiveConfig(kind="categorical"))
    path = objective.sample_path(image, labels, generator=torch.Generator().manual_seed(2))
    assert (path.t < 0.95).all()  # away from the end, where the gap 1 - t is clipped at 0.05
    valid = path.valid.unsqueeze(1).expand_as(path.x_1)
    sure = objective.targets_for(categorical_logits(labels, n, 1e4).float(), path)
    torch.testing.assert_close(sure.v_pred[valid], (path.x_1 - path.x_0)[valid], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sure.x1_hat[valid], path.x_1[valid])
    uniform = objective.velocity(torch.zeros(3, n, 4, 5), path.x_t, path.t)
    gap = (1 - path.t).view(-1, 1, 1, 1)
    torch.testing.assert_close(uniform, (encoding.centroids.mean(0).view(1, 3, 1, 1) - path.x_t) / gap)


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
    with pytest.raises(ValueError, match=r"t_zero_fraction must be in \[0, 1\], got 1.5"):
        ObjectiveConfig(t_zero_fraction=1.5)
    with pytest.raises(ValueError, match="token_loss_weight must be >= 0"):
        ObjectiveConfig(token_loss_weight=-1.0)
    for setting, value in (("parameterization", "x"), ("mask_ignore", False), ("lam_schedule", "annealed")):
        with pytest.raises(ValueError, match=rf"ObjectiveConfig\.{setting} .*with kind='categorical' leave it at"):
            ObjectiveConfig(kind="categorical", **{setting: value})
    categorical = FlowMatchingObjective(enc, ObjectiveConfig(kind="categorical"))
    with pytest.raises(ValueError, match=r"scores 7 class logits per pixel, got an output of shape \(3, 3, 4, 5\)"):
        categorical(zero_model, image, labels)


def test_noisy_path_starts_from_the_image_plus_noise_and_its_target_is_the_straight_velocity():
    enc = build_encoding("kronecker", 7)
    image, labels = make_batch()
    objective = FlowMatchingObjective(enc, ObjectiveConfig(kind="vanilla", x0_noise=0.7, t_zero_fraction=0.0))
    path = objective.sample_path(image, labels, torch.Generator().manual_seed(0))
    noise = path.x_0 - image_to_x0(image, 3)
    assert noise.std().item() == pytest.approx(0.7, rel=0.15) and noise.abs().max() > 0
    assert torch.equal(path.x_1[path.valid.unsqueeze(1).expand_as(path.x_1)],
                       enc.encode(labels)[path.valid.unsqueeze(1).expand_as(path.x_1)])
    assert torch.allclose(path.x_t, interpolate(path.x_0, path.x_1, path.t))
    # a network that outputs x_1 - x_0 of the drawn x_0 has zero loss: the target is the straight velocity
    f = objective.targets_for(path.x_1 - path.x_0, path)
    assert torch.equal(f.v_star, path.x_1 - path.x_0) and objective.loss(path.x_1 - path.x_0, path).loss.item() == 0.0
