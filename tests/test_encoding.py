import math

import pytest
import torch

from flowseg.encoding import (
    ENCODINGS, IGNORE_INDEX, TRANSFORMS, build_encoding, generalized_golden_ratio,
)

SIZES = (2, 19, 150, 171, 1000)
CASES = [(name, n) for name in ENCODINGS for n in SIZES if not (name == "lattice" and n > 216)]


def brute_sq_distances(x: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """||x - mu_k||^2 by broadcasting (B, N, d, H, W): the reference the expansion must match."""
    return (x[:, None] - mu[None, :, :, None, None]).square().sum(2)


def random_labels(num_classes: int, shape=(2, 5, 6), seed: int = 0) -> torch.Tensor:
    return torch.randint(0, num_classes, shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ centroid formulas, hand-worked


def test_kronecker_matches_hand_computed_values():
    # N = 4: c_k = frac(k sqrt 2) = sqrt2-1, 2sqrt2-2, 3sqrt2-4, 4sqrt2-5; min at k=3, max at k=2,
    # so 2 Norm(c) - 1 = (1 - sqrt2, 1, -1, sqrt2 - 1) exactly. Channel 1 (sqrt 3): min k=3, max k=4,
    # mu_1 = 2 sqrt3 - 3.
    mu = build_encoding("kronecker", 4).centroids.double()
    s2 = math.sqrt(2.0)
    assert torch.allclose(mu[:, 0], torch.tensor([1 - s2, 1.0, -1.0, s2 - 1], dtype=torch.float64), atol=1e-6)
    assert mu[0, 1].item() == pytest.approx(2 * math.sqrt(3.0) - 3, abs=1e-6)
    assert mu[2, 1].item() == pytest.approx(-1.0) and mu[3, 1].item() == pytest.approx(1.0)


def test_kronecker_other_dims_use_square_roots_of_primes():
    n, dim = 30, 5
    mu = build_encoding("kronecker", n, dim=dim).centroids.double()
    for channel, prime in enumerate((2, 3, 5, 7, 11)):
        c = [math.modf(k * math.sqrt(prime))[0] for k in range(1, n + 1)]
        expected = [2 * (v - min(c)) / (max(c) - min(c)) - 1 for v in c]
        assert torch.allclose(mu[:, channel], torch.tensor(expected, dtype=torch.float64), atol=1e-6)


def test_every_channel_spans_the_unit_box_after_minmax():
    for name in ("kronecker", "rd"):
        mu = build_encoding(name, 150).centroids
        assert torch.allclose(mu.amin(0), torch.full((3,), -1.0)) and torch.allclose(mu.amax(0), torch.ones(3))


def test_generalized_golden_ratio_known_values():
    assert generalized_golden_ratio(1) == pytest.approx((1 + math.sqrt(5)) / 2, abs=1e-12)  # golden ratio
    assert generalized_golden_ratio(2) == pytest.approx(1.324717957244746, abs=1e-12)      # plastic number


def test_rd_one_dimensional_is_the_golden_ratio_sequence():
    n = 10
    c = [math.modf(0.5 + k / ((1 + math.sqrt(5)) / 2))[0] for k in range(1, n + 1)]
    expected = torch.tensor([2 * (v - min(c)) / (max(c) - min(c)) - 1 for v in c], dtype=torch.float64)
    mu = build_encoding("rd", n, dim=1).centroids.double()
    assert torch.allclose(mu[:, 0], expected, atol=1e-6)


def test_lattice_palette_order():
    mu = build_encoding("lattice", 216).centroids
    level = lambda i: i * 50 / 127.5 - 1  # noqa: E731
    assert mu[0].tolist() == pytest.approx([-1.0, -1.0, -1.0])
    assert mu[1].tolist() == pytest.approx([-1.0, -1.0, level(1)])
    assert mu[6].tolist() == pytest.approx([-1.0, level(1), -1.0])
    assert mu[36].tolist() == pytest.approx([level(1), -1.0, -1.0])
    assert mu[215].tolist() == pytest.approx([level(5)] * 3)
    with pytest.raises(ValueError, match="at most 216"):
        build_encoding("lattice", 217)


def test_bits_and_onehot():
    bits = build_encoding("bits", 5).centroids
    assert bits.shape == (5, 3)
    assert bits[1].tolist() == [-1, -1, 1] and bits[4].tolist() == [1, -1, -1]
    assert build_encoding("bits", 2).dim == 1 and build_encoding("bits", 1000).dim == 10
    onehot = build_encoding("onehot", 3).centroids
    assert onehot.tolist() == [[1, -1, -1], [-1, 1, -1], [-1, -1, 1]]


def test_random_is_seeded_and_in_box():
    a, b = build_encoding("random", 50, seed=1), build_encoding("random", 50, seed=1)
    c = build_encoding("random", 50, dim=4, seed=2)
    assert torch.equal(a.centroids, b.centroids)
    assert c.dim == 4 and not torch.equal(a.centroids, c.centroids[:, :3])
    assert a.centroids.abs().max() <= 1.0


def test_min_spacing_hand_values():
    assert build_encoding("onehot", 10).min_spacing() == pytest.approx(2 * math.sqrt(2))
    assert build_encoding("bits", 19).min_spacing() == pytest.approx(2.0)
    assert build_encoding("lattice", 40).min_spacing() == pytest.approx(50 / 127.5, rel=1e-6)


# ------------------------------------------------------------------ encode / decode


@pytest.mark.parametrize("name,n", CASES)
def test_round_trip_exact_and_under_noise(name, n):
    enc = build_encoding(name, n)
    labels = random_labels(n)
    x1 = enc.encode(labels)
    assert x1.shape == (2, enc.dim, 5, 6)
    assert torch.equal(enc.decode(x1), labels)
    # noise of norm 0.49 * min spacing in a random direction per pixel cannot cross a Voronoi boundary
    noise = torch.randn(x1.shape, generator=torch.Generator().manual_seed(1))
    noise *= 0.49 * enc.min_spacing() / noise.norm(dim=1, keepdim=True)
    assert torch.equal(enc.decode(x1 + noise), labels)
    assert torch.equal(enc.decode(x1 + noise, class_chunk=7), labels)


@pytest.mark.parametrize("name,n", [("kronecker", 171), ("random", 19), ("bits", 150), ("onehot", 19)])
def test_decode_and_distances_match_brute_force(name, n):
    enc = build_encoding(name, n)
    x = torch.rand(2, enc.dim, 7, 5, generator=torch.Generator().manual_seed(3)) * 2.4 - 1.2
    reference = brute_sq_distances(x.double(), enc.centroids.double())
    assert torch.allclose(enc.sq_distances(x.double()), reference, atol=1e-9)
    assert torch.allclose(enc.sq_distances(x, class_chunk=4), reference.float(), atol=1e-4)
    expected = reference.argmin(1)
    assert torch.equal(enc.decode(x.double()), expected)
    assert torch.equal(enc.decode(x.double(), class_chunk=5), expected)


def test_decode_blocks_cover_every_pixel(monkeypatch):
    # a tiny block size forces many pixel blocks, including a ragged last one
    monkeypatch.setattr("flowseg.encoding.DECODE_BLOCK_ELEMENTS_CPU", 19 * 3)
    enc = build_encoding("kronecker", 19)
    labels = random_labels(19, (3, 7, 5))
    assert torch.equal(enc.decode(enc.encode(labels)), labels)
    assert torch.equal(enc.decode(enc.encode(labels), class_chunk=4), labels)


def test_encode_ignore_policy():
    enc = build_encoding("kronecker", 5)
    labels = torch.tensor([[[0, IGNORE_INDEX], [4, 2]]])
    x1 = enc.encode(labels)
    assert torch.equal(x1[0, :, 0, 1], torch.zeros(3))
    assert torch.equal(x1[0, :, 1, 0], enc.centroids[4])
    fill = torch.full((1, 3, 2, 2), 0.25)
    x1 = enc.encode(labels, ignore_fill=fill)
    assert torch.equal(x1[0, :, 0, 1], torch.full((3,), 0.25))
    assert torch.equal(x1[0, :, 0, 0], enc.centroids[0])


def test_soft_assign_closed_form_and_confidence():
    # p_k = softmax(-log(d_k + eps) / tau) = (d_k + eps)^(-1/tau) / sum_j (d_j + eps)^(-1/tau)
    enc = build_encoding("kronecker", 19)
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(5)).double() * 2 - 1
    d = brute_sq_distances(x, enc.centroids.double())
    for tau in (0.5, 1.0, 3.0):
        kernel = (d + 1e-3) ** (-1.0 / tau)
        p = enc.soft_assign(x, tau=tau)
        assert torch.allclose(p, kernel / kernel.sum(1, keepdim=True), atol=1e-10)
    conf = enc.confidence(x)
    assert ((conf >= 1 / 19) & (conf <= 1)).all()
    assert torch.equal(enc.soft_assign(x).argmax(1), enc.decode(x))


def test_posterior_mean_is_the_centroid_of_a_sure_class_and_the_mean_of_a_uniform_p():
    enc = build_encoding("kronecker", 5)
    labels = torch.tensor([[[0, 4], [2, 3]]])
    sure = torch.nn.functional.one_hot(labels, 5).permute(0, 3, 1, 2).float()  # (1, 5, 2, 2)
    assert torch.equal(enc.posterior_mean(sure), enc.centroids[labels].permute(0, 3, 1, 2))
    uniform = torch.full((1, 5, 2, 2), 0.2)
    expected = enc.centroids.mean(0).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    torch.testing.assert_close(enc.posterior_mean(uniform), expected)
    with pytest.raises(ValueError, match=r"p must have shape \(B, 5, H, W\), got \(1, 4, 2, 2\)"):
        enc.posterior_mean(torch.zeros(1, 4, 2, 2))


def test_transforms_rank_closer_classes_higher_and_weight_is_minus_slope():
    d = torch.tensor([0.0, 0.01, 0.5, 2.0, 10.0], dtype=torch.float64)
    h = 1e-7
    for name, transform in TRANSFORMS.items():
        score = transform.score(d, 1e-3)
        assert (score[:-1] > score[1:]).all(), name
        slope = (transform.score(d + h, 1e-3) - transform.score(d - h, 1e-3)) / (2 * h)  # central difference
        assert torch.allclose(transform.weight(d, 1e-3), -slope, rtol=1e-5), name
        assert torch.equal(d, torch.tensor([0.0, 0.01, 0.5, 2.0, 10.0], dtype=torch.float64))  # not modified


def test_to_device_keeps_the_table():
    enc = build_encoding("rd", 7).to("cpu")
    assert enc.name == "rd" and enc.centroids.shape == (7, 3) and enc.num_classes == 7 and enc.dim == 3


# ------------------------------------------------------------------ bad input


def test_build_encoding_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown encoding 'nope'"):
        build_encoding("nope", 5)
    with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
        build_encoding("kronecker", 1)
    with pytest.raises(ValueError, match="'bits' encoding of 19 classes has dim 5"):
        build_encoding("bits", 19, dim=3)
    with pytest.raises(ValueError, match="has dim 3"):
        build_encoding("lattice", 19, dim=4)
    with pytest.raises(ValueError, match="dim must be a positive int"):
        build_encoding("kronecker", 19, dim=0)


def test_encode_decode_reject_bad_input():
    enc = build_encoding("kronecker", 5)
    with pytest.raises(ValueError, match=r"outside \[0, 5\).*\[5, 9\]"):
        enc.encode(torch.tensor([[[0, 5], [9, IGNORE_INDEX]]]))
    with pytest.raises(ValueError, match="outside"):
        enc.encode(torch.tensor([[[-1]]]))
    with pytest.raises(TypeError, match="integer dtype"):
        enc.encode(torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match=r"shape \(B, H, W\)"):
        enc.encode(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="ignore_fill must have shape"):
        enc.encode(torch.zeros(1, 2, 2, dtype=torch.long), ignore_fill=torch.zeros(1, 3, 2, 3))
    with pytest.raises(ValueError, match=r"shape \(B, 3, H, W\)"):
        enc.decode(torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match="non-finite"):
        enc.decode(torch.tensor([math.nan, 0.0, 0.0]).view(1, 3, 1, 1))
    with pytest.raises(ValueError, match="class_chunk"):
        enc.decode(torch.zeros(1, 3, 2, 2), class_chunk=0)
    with pytest.raises(ValueError, match="unknown distance transform"):
        enc.soft_assign(torch.zeros(1, 3, 2, 2), transform="cube")
