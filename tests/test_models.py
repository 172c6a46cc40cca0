"""Tests of flowseg.models: layers against closed forms, the networks' contracts, locality, sizes."""

import math
import warnings

import pytest
import torch
from torch import nn

from flowseg.models import SIZES, DiscriminativeFieldTransformer, PixelFieldTransformer, build_model
from flowseg.models.field import ConvStem, NeuralFieldDecoder, PatchEmbedding, patchify, unpatchify
from flowseg.models.layers import (
    FieldBlock,
    RMSNorm,
    TrunkBlock,
    apply_rope,
    dct_features,
    rope_2d_angles,
    timestep_features,
)


@pytest.fixture(autouse=True)
def one_thread():
    """Run single-threaded: these tensors are small, and on a loaded 2-core machine every 2-thread
    parallel region waits for a descheduled thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomise_zero_inits(model: nn.Module, seed: int = 0) -> None:
    """Give the zero-initialised layers (adaLN modulation, output) random weights, so every path is live."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("field.out") or ".modulation." in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))


# ---------------------------------------------------------------------------------------------
# layers against closed forms


def test_timestep_features_closed_form():
    t = torch.tensor([0.0, 0.3])
    features = timestep_features(t, num_features=8)  # frequencies 10^(-k/4), k = 0..3
    freqs = torch.tensor([10 ** (-k / 4) for k in range(4)])
    expected = torch.cat([torch.cos(0.3 * freqs), torch.sin(0.3 * freqs)])
    assert torch.allclose(features[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    assert torch.allclose(features[1], expected)


def test_rms_norm_closed_form_and_bf16_input_keeps_its_dtype_without_a_fallback_warning():
    norm = RMSNorm(4, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, -1.0, 0.5]))
    x = torch.tensor([[3.0, 4.0, 0.0, 0.0]])  # mean(x^2) = 25 / 4, rms = 2.5
    expected = torch.tensor([[3 / 2.5, 2 * 4 / 2.5, 0.0, 0.0]])
    torch.testing.assert_close(norm(x), expected, atol=1e-6, rtol=0)
    # a float32 weight with a bf16 input is what autocast hands it; nn.RMSNorm warns there and falls back
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = norm(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=0)


def test_dct_features_hand_worked():
    # side 3: coordinates 0, 0.5, 1; F = 2: frequencies 0 and 2, damping 1 / (1 + f_i f_j)
    features = dct_features(side=3, num_freqs=2)
    assert features.shape == (9, 4)
    # pixel (row 0, col 1): x = 0.5, y = 0 -> cos(pi f x) = (1, cos(pi) = -1), cos(pi f y) = (1, 1)
    # feature (i, j), i major: (0,0) 1, (0,1) 1 * 1, (1,0) -1 * 1, (1,1) -1 * 1 / 5
    assert torch.allclose(features[1], torch.tensor([1.0, 1.0, -1.0, -0.2]), atol=1e-6)
    # pixel (row 2, col 2): x = y = 1 -> cos(2 pi) = 1 on both axes
    assert torch.allclose(features[8], torch.tensor([1.0, 1.0, 1.0, 0.2]), atol=1e-6)


def test_rope_matches_complex_rotation():
    grid_h, grid_w, head_dim = 3, 4, 8
    cos, sin = rope_2d_angles(grid_h, grid_w, head_dim)
    x = torch.randn(2, 1, grid_h * grid_w, head_dim)
    rotated = apply_rope(x, cos, sin)
    for token in range(grid_h * grid_w):
        row, col = divmod(token, grid_w)
        pos = {"x": 16 * col / (grid_w - 1), "y": 16 * row / (grid_h - 1)}
        for pair in range(head_dim // 2):
            omega = 10_000 ** (-4 * (pair // 2) / head_dim)
            angle = pos["x" if pair % 2 == 0 else "y"] * omega
            z = torch.complex(x[..., token, 2 * pair], x[..., token, 2 * pair + 1]) * complex(
                math.cos(angle), math.sin(angle)
            )
            assert torch.allclose(rotated[..., token, 2 * pair], z.real, atol=1e-5)
            assert torch.allclose(rotated[..., token, 2 * pair + 1], z.imag, atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    grid, head_dim = 5, 16
    cos, sin = rope_2d_angles(grid, grid, head_dim)
    q, k = torch.randn(head_dim), torch.randn(head_dim)
    tokens = torch.stack([q, k]).expand(grid * grid, 2, head_dim).transpose(0, 1)  # (2, L, D)
    rq, rk = apply_rope(tokens, cos, sin).unbind(0)  # q and k placed at every token

    def score(a, b):  # tokens given as (row, col)
        return torch.dot(rq[a[0] * grid + a[1]], rk[b[0] * grid + b[1]])

    assert torch.allclose(score((0, 0), (1, 2)), score((2, 1), (3, 3)), atol=1e-4)
    assert torch.allclose(score((4, 4), (0, 1)), score((4, 3), (0, 0)), atol=1e-4)
    assert not torch.allclose(score((0, 0), (1, 2)), score((0, 0), (2, 1)), atol=1e-3)


def test_rope_rejects_head_width_not_divisible_by_4():
    with pytest.raises(ValueError, match="divisible by 4"):
        rope_2d_angles(2, 2, head_dim=6)


def test_trunk_block_is_identity_with_zero_modulation_and_matches_reference_otherwise():
    torch.manual_seed(0)
    block = TrunkBlock(width=16, heads=2, mlp_ratio=4.0)
    s, c = torch.randn(2, 6, 16), torch.randn(2, 16)
    rope = rope_2d_angles(2, 3, 8)
    nn.init.zeros_(block.modulation.weight)
    nn.init.zeros_(block.modulation.bias)
    assert torch.equal(block(s, c, rope), s)

    nn.init.normal_(block.modulation.weight, std=0.3)
    mod = block.modulation(c)[:, None]  # (B, 1, 6C)
    shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = mod.split(16, dim=-1)

    def rms(x, weight):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight

    # attention written out: softmax(q k^T / sqrt(D)) v per head, q/k RMS-normalised then rotated
    u = rms(s, block.attn_norm.weight) * (1 + scale_a) + shift_a
    q, k, v = (u @ block.attn.qkv.weight.T).split(16, dim=-1)
    heads = []
    for h in range(2):
        qh, kh, vh = (z[..., 8 * h : 8 * h + 8] for z in (q, k, v))
        qh = apply_rope(rms(qh, block.attn.q_norm.weight)[:, None], *rope)[:, 0]
        kh = apply_rope(rms(kh, block.attn.k_norm.weight)[:, None], *rope)[:, 0]
        heads.append(torch.softmax(qh @ kh.transpose(1, 2) / math.sqrt(8), dim=-1) @ vh)
    s1 = s + gate_a * block.attn.proj(torch.cat(heads, dim=-1))
    u = rms(s1, block.ffn_norm.weight) * (1 + scale_f) + shift_f
    ffn = block.ffn
    expected = s1 + gate_f * ffn.down(torch.nn.functional.silu(ffn.gate(u)) * ffn.up(u))
    assert torch.allclose(block(s, c, rope), expected, atol=1e-5)


def test_field_block_matches_per_patch_reference():
    torch.manual_seed(0)
    block = FieldBlock(token_width=12, field_width=4, mlp_ratio=2)
    h, tokens = torch.randn(3, 5, 4), torch.randn(3, 12)
    out = block(h, tokens)
    for m in range(3):
        generated = block.weight_generator(tokens[m])
        first = generated[:32].reshape(4, 8)
        second = generated[32:].reshape(8, 4)
        first = first / first.norm(dim=0, keepdim=True)  # every generated unit (column) has norm 1
        second = second / second.norm(dim=0, keepdim=True)
        hn = h[m] / torch.sqrt(h[m].pow(2).mean(-1, keepdim=True) + 1e-6) * block.norm.weight
        expected = h[m] + torch.nn.functional.silu(hn @ first) @ second
        assert torch.allclose(out[m], expected, atol=1e-5)


def test_patchify_layout_and_round_trip():
    x = torch.randn(2, 3, 8, 12)
    patches = patchify(x, 4)  # (B, 6, 3, 16)
    assert patches.shape == (2, 6, 3, 16)
    # patch l = (gy, gx) row-major, pixel k = (ky, kx) row-major, channel-major flattening
    assert patches[1, 4, 2, 7] == x[1, 2, 1 * 4 + 1, 1 * 4 + 3]
    assert torch.equal(unpatchify(patches.transpose(-1, -2), 2, 3), x)


# ---------------------------------------------------------------------------------------------
# the networks


@pytest.mark.parametrize("size", ["T/4", "T/8", "S/8"])
def test_forward_backward_reaches_every_parameter(size):
    torch.manual_seed(0)
    model = PixelFieldTransformer(size, dim=3)
    randomise_zero_inits(model)
    x_t, image, t = torch.randn(2, 3, 16, 24), torch.rand(2, 3, 16, 24) * 2 - 1, torch.rand(2)
    out = model(x_t, t, image).out
    assert out.shape == (2, 3, 16, 24) and torch.isfinite(out).all()
    out.square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


@pytest.mark.slow
def test_forward_backward_base_size():
    model = PixelFieldTransformer("B/16", dim=3)
    out = model(torch.randn(1, 3, 32, 32), torch.rand(1), torch.randn(1, 3, 32, 32)).out
    out.sum().backward()
    assert out.shape == (1, 3, 32, 32) and model.field.out.weight.grad.abs().sum() > 0


def test_output_is_zero_at_init():
    model = PixelFieldTransformer("T/8", dim=5)
    output = model(torch.randn(2, 5, 16, 16), torch.rand(2), torch.randn(2, 3, 16, 16))
    assert output.out.shape == (2, 5, 16, 16) and torch.equal(output.out, torch.zeros_like(output.out))
    assert output.token_logits is None
    logits = DiscriminativeFieldTransformer("T/8", num_classes=7)(torch.randn(2, 3, 16, 16)).out
    assert logits.shape == (2, 7, 16, 16) and torch.equal(logits, torch.zeros_like(logits))


def test_field_decoder_is_local_to_each_patch():
    torch.manual_seed(0)
    size = SIZES["T/8"]
    decoder = NeuralFieldDecoder(size, in_channels=6, out_channels=3)
    nn.init.normal_(decoder.out.weight)
    grid, side = (2, 3), 8
    tokens = torch.randn(1, 6, size.width)  # (B, L, C)
    pixels = patchify(torch.randn(1, 6, 16, 24), side).transpose(-1, -2)  # (B, L, Q, c_in)

    def decode(tok):
        out = decoder(tok.flatten(0, 1), pixels.flatten(0, 1))  # (L, Q, 3)
        return unpatchify(out[None], *grid)  # (1, 3, 16, 24)

    before = decode(tokens)
    moved = tokens.clone()
    moved[0, 4] += torch.randn(size.width)  # patch 4 = grid row 1, column 1
    changed = (decode(moved) - before).abs().amax(dim=1)[0] > 0  # (16, 24)
    expected = torch.zeros(16, 24, dtype=torch.bool)
    expected[8:16, 8:16] = True
    assert torch.equal(changed, expected)


def test_query_scale_shapes_and_agreement_with_the_coarse_grid():
    """At query_scale 2 the trunk sees the 2x2-average of the input, and each patch is a 16 x 16 grid
    over the same [0, 1]^2 square: its four corner pixels sit where the coarse 8 x 8 grid's do."""
    torch.manual_seed(0)
    model = PixelFieldTransformer("T/8", dim=3)
    randomise_zero_inits(model)
    x_t, image, t = torch.randn(2, 3, 16, 32), torch.randn(2, 3, 16, 32), torch.rand(2)
    coarse = model(x_t, t, image).out
    up = dict(scale_factor=2, mode="nearest")
    fine = model(
        torch.nn.functional.interpolate(x_t, **up), t, torch.nn.functional.interpolate(image, **up), query_scale=2
    ).out
    assert coarse.shape == (2, 3, 16, 32) and fine.shape == (2, 3, 32, 64)
    corners_fine = torch.tensor([0, 15, 16, 31])
    corners_coarse = torch.tensor([0, 7, 8, 15])
    assert torch.allclose(
        fine[..., corners_fine[:, None], corners_fine[None, :]],
        coarse[..., corners_coarse[:, None], corners_coarse[None, :]],
        atol=1e-5,
    )
    assert not torch.allclose(fine[..., ::2, ::2], coarse, atol=1e-3)  # in between, new queries
    logits = DiscriminativeFieldTransformer("T/8", 4)(torch.randn(1, 3, 48, 32), query_scale=2).out
    assert logits.shape == (1, 4, 48, 32)


def test_image_conditioning_switch():
    torch.manual_seed(0)
    x_t, t = torch.randn(1, 3, 16, 16), torch.rand(1)
    images = torch.randn(2, 1, 3, 16, 16)
    conditioned = PixelFieldTransformer("T/8", dim=3)
    plain = PixelFieldTransformer("T/8", dim=3, image_conditioning=False)
    assert isinstance(conditioned.stem, PatchEmbedding)  # the default stem
    assert conditioned.stem.proj.in_features == 6 * 64 and plain.stem.proj.in_features == 3 * 64
    for model in (conditioned, plain):
        randomise_zero_inits(model)
    assert not torch.allclose(conditioned(x_t, t, images[0]).out, conditioned(x_t, t, images[1]).out)
    assert torch.equal(plain(x_t, t, images[0]).out, plain(x_t, t, images[1]).out)
    assert torch.equal(plain(x_t, t).out, plain(x_t, t, images[0]).out)


def test_scalar_time_is_broadcast():
    torch.manual_seed(0)
    model = PixelFieldTransformer("T/8", dim=3, image_conditioning=False)
    randomise_zero_inits(model)
    x_t = torch.randn(2, 3, 16, 16)
    assert torch.equal(model(x_t, torch.tensor(0.25)).out, model(x_t, torch.full((2,), 0.25)).out)


def test_runs_in_bfloat16():
    torch.manual_seed(0)
    model = PixelFieldTransformer("T/8", dim=3)
    randomise_zero_inits(model)
    x_t, t, image = torch.randn(1, 3, 16, 16), torch.rand(1), torch.randn(1, 3, 16, 16)
    reference = model(x_t, t, image).out
    model.to(torch.bfloat16)
    out = model(x_t.bfloat16(), t, image.bfloat16()).out
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), reference, atol=0.05 * reference.abs().max().item())


def test_discriminative_twin_matches_flow_model_size():
    flow = PixelFieldTransformer("T/8", dim=3, image_conditioning=False)
    twin = DiscriminativeFieldTransformer("T/8", num_classes=3)
    shapes = lambda m: [(n, p.shape) for n, p in m.named_parameters()]  # noqa: E731
    assert shapes(flow) == shapes(twin)


def test_discriminative_twin_trains_with_cross_entropy():
    torch.manual_seed(0)
    twin = build_model("discriminative", "T/8", num_classes=3)
    image = torch.randn(2, 3, 16, 16)
    labels = torch.randint(0, 3, (2, 16, 16))
    labels[0, :4] = 255
    optimiser = torch.optim.Adam(twin.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        logits = twin(image).out
        loss = nn.functional.cross_entropy(logits, labels, ignore_index=255)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(3), rel=1e-5)  # zero logits: uniform over 3 classes
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(
    ("size", "reference"), [("L/16", 452e6), ("XL/16", 700e6)]  # PixNerd paper's counts
)
def test_large_sizes_parameter_counts(size, reference):
    with torch.device("meta"):
        model = PixelFieldTransformer(size, dim=3, image_conditioning=False)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - reference) / reference < 0.02


def test_registry_sizes_have_valid_heads():
    for size in SIZES.values():
        assert size.width % size.heads == 0 and (size.width // size.heads) % 4 == 0, size.name


# ---------------------------------------------------------------------------------------------
# bad input


def test_token_head_classifies_each_patch_token_and_leaves_the_rest_of_the_model_alone():
    torch.manual_seed(0)
    plain = PixelFieldTransformer("T/8", dim=3)
    torch.manual_seed(0)
    headed = PixelFieldTransformer("T/8", dim=3, token_classes=5)
    plain_state, headed_state = plain.state_dict(), headed.state_dict()
    assert sorted(set(headed_state) - set(plain_state)) == ["token_head.bias", "token_head.weight"]
    assert all(torch.equal(plain_state[name], headed_state[name]) for name in plain_state)

    randomise_zero_inits(headed)
    randomise_zero_inits(plain)
    x_t, image, t = torch.randn(2, 3, 16, 24), torch.randn(2, 3, 16, 24), torch.rand(2)
    output = headed(x_t, t, image)
    assert output.token_logits.shape == (2, 2 * 3, 5)  # a (2, 3) grid of 8 x 8 patches
    torch.testing.assert_close(output.out, plain(x_t, t, image).out)
    # the head reads the trunk's tokens; the field's output does not depend on it
    output.token_logits.square().sum().backward()
    assert headed.field.out.weight.grad is None and headed.token_head.weight.grad.abs().sum() > 0
    twin = DiscriminativeFieldTransformer("T/8", num_classes=4, token_classes=4)
    assert twin(torch.randn(1, 3, 16, 16)).token_logits.shape == (1, 4, 4)
    assert plain(x_t, t, image).token_logits is None and plain.token_head is None
    with pytest.raises(ValueError, match="token_classes must be an integer >= 2 or None, got 1"):
        build_model("flow", "T/8", dim=3, token_classes=1)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="unknown model size 'Z/3'"):
        PixelFieldTransformer("Z/3", dim=3)
    with pytest.raises(ValueError, match="dim"):
        PixelFieldTransformer("T/8", dim=0)
    with pytest.raises(ValueError, match="num_classes"):
        DiscriminativeFieldTransformer("T/8", num_classes=1)
    with pytest.raises(ValueError, match="needs dim"):
        build_model("flow", "T/8")
    with pytest.raises(ValueError, match="needs num_classes"):
        build_model("discriminative", "T/8")
    with pytest.raises(ValueError, match="unknown model kind 'gan'"):
        build_model("gan", "T/8", dim=3)


def test_bad_forward_inputs():
    model = PixelFieldTransformer("T/8", dim=3)
    x, image, t = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16), torch.rand(2)
    with pytest.raises(ValueError, match=r"x_t must have shape \(B, 3, H, W\), got \(2, 4, 16, 16\)"):
        model(torch.randn(2, 4, 16, 16), t, image)
    with pytest.raises(TypeError, match="x_t must be a floating-point tensor"):
        model(torch.zeros(2, 3, 16, 16, dtype=torch.long), t, image)
    with pytest.raises(ValueError, match=r"t must have shape \(2,\)"):
        model(x, torch.rand(3), image)
    with pytest.raises(ValueError, match="pass image"):
        model(x, t)
    with pytest.raises(ValueError, match=r"image must have shape \(2, 3, H, W\)"):
        model(x, t, torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="same H, W"):
        model(x, t, torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="divisible by patch_size \\* query_scale = 8 \\* 1 = 8"):
        model(torch.randn(2, 3, 12, 16), t, torch.randn(2, 3, 12, 16))
    with pytest.raises(ValueError, match="divisible by patch_size \\* query_scale = 8 \\* 4 = 32"):
        model(x, t, image, query_scale=4)
    with pytest.raises(ValueError, match="query_scale must be an integer >= 1, got 0"):
        model(x, t, image, query_scale=0)
    with pytest.raises(ValueError, match="query_scale must be an integer >= 1, got 1.5"):
        model(x, t, image, query_scale=1.5)


# ---------------------------------------------------------------------------------------------
# overfitting one batch of the synthetic shapes data


def test_tiny_model_overfits_one_batch():
    """T/8 trained on one fixed batch of 8 shapes images (64 x 64) with the reshaped objective reaches
    < 5% pixel error of the 10-step Euler sample within 300 steps (30 with this seed)."""
    from flowseg.data import build_dataset
    from flowseg.encoding import build_encoding
    from flowseg.objective import FlowMatchingObjective, ObjectiveConfig
    from flowseg.sampling import segment

    torch.manual_seed(0)
    dataset = build_dataset("shapes", "train", image_size=64)
    samples = [dataset[i] for i in range(8)]
    image = torch.stack([s["image"] for s in samples])
    labels = torch.stack([s["label"] for s in samples])
    encoding = build_encoding("kronecker", dataset.num_classes)
    objective = FlowMatchingObjective(encoding, ObjectiveConfig(kind="reshaped"))
    model = PixelFieldTransformer("T/8", dim=encoding.dim)
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    valid = labels != 255
    for step in range(1, 301):
        loss = objective(lambda *inputs: model(*inputs).out, image, labels, generator=generator).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % 10 == 0:
            with torch.no_grad():
                predicted, _ = segment(lambda *inputs: model(*inputs).out, image, encoding, steps=10)
            error = ((predicted != labels) & valid).sum().item() / valid.sum().item()
            if error < 0.05:
                break
    assert error < 0.05, f"pixel error {error:.3f} after {step} steps"


# ---------------------------------------------------------------------------------------------
# the convolutional stem


def test_conv_stem_token_grid_is_the_patch_grid_in_row_major_order():
    """T/4's stem: two 3x3 layers at full resolution (+-1 pixel each), then two stride-2 3x3 stages,
    so token (u, v) reads input rows 4u - 5 .. 4u + 5 and columns 4v - 5 .. 4v + 5, and one input
    pixel reaches exactly the tokens whose window holds it."""
    torch.manual_seed(0)
    stem = ConvStem(in_channels=6, width=32, patch_size=4)
    inputs = torch.randn(1, 6, 16, 24)
    before = stem(inputs)
    assert before.shape == (1, 4 * 6, 32)  # (B, L, C): a 4 x 6 token grid
    moved = inputs.clone()
    moved[0, :, 7, 11] += 1.0  # the bottom-right pixel of patch (1, 2)
    changed = ((stem(moved) - before).abs().amax(-1) > 0).view(4, 6)
    rows, cols = torch.arange(4)[:, None], torch.arange(6)[None, :]
    expected = ((4 * rows - 5 <= 7) & (7 <= 4 * rows + 5)) & ((4 * cols - 5 <= 11) & (11 <= 4 * cols + 5))
    assert torch.equal(changed, expected)
    assert expected.nonzero().tolist() == [[r, c] for r in (1, 2, 3) for c in (2, 3, 4)]


@pytest.mark.parametrize("kind", ["flow", "discriminative"])
def test_conv_stem_model_trains_every_parameter_and_keeps_the_field(kind):
    torch.manual_seed(0)
    if kind == "flow":
        model = build_model("flow", "T/4", dim=3, stem="conv")
        run = lambda: model(torch.randn(2, 3, 16, 24), torch.rand(2), torch.randn(2, 3, 16, 24))  # noqa: E731
    else:
        model = build_model("discriminative", "T/4", num_classes=5, stem="conv")
        run = lambda: model(torch.randn(2, 3, 16, 24))  # noqa: E731
    assert isinstance(model.stem, ConvStem)
    randomise_zero_inits(model)
    out = run().out
    assert out.shape[-2:] == (16, 24) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []


def test_conv_stem_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"unknown stem 'mlp'; expected one of \('patch', 'conv'\)"):
        build_model("flow", "T/4", dim=3, stem="mlp")
    with pytest.raises(ValueError, match="power-of-two patch size >= 2, got 6"):
        ConvStem(in_channels=3, width=32, patch_size=6)
