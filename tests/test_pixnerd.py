"""Tests of the PixNerd checkpoint loader.

Oracles: PixNerd's parameter shapes written out from its published configuration (class-to-image
PixNerDiT: patch embedding `s_embedder`, time MLP `t_embedder`, label table `y_embedder` with
num_classes + 1 rows, `blocks` = trunk blocks then NeRF blocks, NeRF input `x_embedder` with 8 x 8
DCT features, `final_layer`), and an independent functional re-statement of PixNerd's forward pass
(unfold/fold patches, RoPE as complex multiplication) that reads PixNerd-named tensors directly.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from flowseg.models import DiscriminativeFieldTransformer, ModelSize, PixelFieldTransformer, load_pixnerd_checkpoint
from flowseg.models.pixnerd import pixnerd_key_map

TINY = ModelSize("tiny-test", width=32, heads=2, depth=2, field_depth=2, patch_size=4, field_width=8)


def pixnerd_shapes(width, heads, depth, field_depth, patch=16, field_width=64, nerf_ratio=2, classes=1000):
    """PixNerd's parameter shapes for a 3-channel model, from its architecture description."""
    ffn = int(2 * 4 * width / 3)
    head = width // heads
    shapes = {
        "s_embedder.proj.weight": (width, 3 * patch * patch),
        "s_embedder.proj.bias": (width,),
        "t_embedder.mlp.0.weight": (width, 256),
        "t_embedder.mlp.0.bias": (width,),
        "t_embedder.mlp.2.weight": (width, width),
        "t_embedder.mlp.2.bias": (width,),
        "y_embedder.embedding_table.weight": (classes + 1, width),
        "x_embedder.embedder.0.weight": (field_width, 3 + 64),
        "x_embedder.embedder.0.bias": (field_width,),
        "final_layer.norm.weight": (field_width,),
        "final_layer.linear.weight": (3, field_width),
        "final_layer.linear.bias": (3,),
    }
    for i in range(depth):
        shapes.update({
            f"blocks.{i}.norm1.weight": (width,),
            f"blocks.{i}.attn.qkv.weight": (3 * width, width),
            f"blocks.{i}.attn.q_norm.weight": (head,),
            f"blocks.{i}.attn.k_norm.weight": (head,),
            f"blocks.{i}.attn.proj.weight": (width, width),
            f"blocks.{i}.attn.proj.bias": (width,),
            f"blocks.{i}.norm2.weight": (width,),
            f"blocks.{i}.mlp.w1.weight": (ffn, width),
            f"blocks.{i}.mlp.w3.weight": (ffn, width),
            f"blocks.{i}.mlp.w2.weight": (width, ffn),
            f"blocks.{i}.adaLN_modulation.0.weight": (6 * width, width),
            f"blocks.{i}.adaLN_modulation.0.bias": (6 * width,),
        })
    for j in range(depth, depth + field_depth):
        shapes.update({
            f"blocks.{j}.param_generator1.0.weight": (2 * field_width**2 * nerf_ratio, width),
            f"blocks.{j}.param_generator1.0.bias": (2 * field_width**2 * nerf_ratio,),
            f"blocks.{j}.norm.weight": (field_width,),
        })
    return shapes


def tiny_pixnerd_state(seed=0):
    """Random PixNerd-named weights for TINY (head width 16, 10 classes)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = pixnerd_shapes(32, 2, 2, 2, patch=4, field_width=8, classes=10)
    return {k: 0.2 * torch.randn(s, generator=generator) + ("norm" in k) for k, s in shapes.items()}


def pixnerd_reference(w, x, t, heads=2, depth=2, field_depth=2, patch=4, nerf_ratio=2):
    """PixNerd's forward without the class label: x (B, 3, H, W), t (B,) -> (B, 3, H, W)."""
    batch, _, height, width_px = x.shape
    grid_h, grid_w = height // patch, width_px // patch
    lin = lambda v, name: v @ w[name + ".weight"].T + w.get(name + ".bias", 0)  # noqa: E731
    rms = lambda v, weight: v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6) * weight  # noqa: E731

    half = 128
    freqs = torch.exp(-math.log(10) * torch.arange(half) / half)
    temb = lin(F.silu(lin(torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], -1),
                          "t_embedder.mlp.0")), "t_embedder.mlp.2")  # (B, C)
    cond = F.silu(temb)[:, None]

    patches = F.unfold(x, patch, stride=patch).transpose(1, 2)  # (B, L, 3 p^2)
    s = lin(patches, "s_embedder.proj")
    C = s.shape[-1]
    D = C // heads
    ys, xs = torch.meshgrid(torch.linspace(0, 16, grid_h), torch.linspace(0, 16, grid_w), indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(0, D, 4).float() / D)
    angles = torch.stack([xs.reshape(-1, 1) * omega, ys.reshape(-1, 1) * omega], -1).reshape(-1, D // 2)
    rotation = torch.polar(torch.ones_like(angles), angles)  # (L, D/2)

    def rotate(v):  # v (B, L, h, D)
        z = torch.view_as_complex(v.reshape(*v.shape[:-1], D // 2, 2).contiguous())
        return torch.view_as_real(z * rotation[None, :, None]).flatten(-2)

    for i in range(depth):
        b = f"blocks.{i}."
        sh1, sc1, g1, sh2, sc2, g2 = lin(cond, b + "adaLN_modulation.0").chunk(6, -1)
        u = rms(s, w[b + "norm1.weight"]) * (1 + sc1) + sh1
        q, k, v = lin(u, b + "attn.qkv").view(batch, -1, 3, heads, D).unbind(2)  # (B, L, h, D)
        q = rotate(rms(q, w[b + "attn.q_norm.weight"])).transpose(1, 2)
        k = rotate(rms(k, w[b + "attn.k_norm.weight"])).transpose(1, 2)
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D), -1) @ v.transpose(1, 2)
        s = s + g1 * lin(attn.transpose(1, 2).reshape(batch, -1, C), b + "attn.proj")
        u = rms(s, w[b + "norm2.weight"]) * (1 + sc2) + sh2
        swiglu = F.silu(u @ w[b + "mlp.w1.weight"].T) * (u @ w[b + "mlp.w3.weight"].T)
        s = s + g2 * (swiglu @ w[b + "mlp.w2.weight"].T)
    s = F.silu(s + temb[:, None]).reshape(-1, C)  # (M, C)

    pixels = patches.reshape(-1, 3, patch * patch).transpose(1, 2)  # (M, p^2, 3)
    pos_y, pos_x = torch.meshgrid(torch.linspace(0, 1, patch), torch.linspace(0, 1, patch), indexing="ij")
    f = torch.linspace(0, 8, 8)
    cos_x = torch.cos(torch.pi * pos_x.reshape(-1, 1) * f)  # (p^2, 8)
    cos_y = torch.cos(torch.pi * pos_y.reshape(-1, 1) * f)
    dct = torch.einsum("qi,qj->qij", cos_x, cos_y)
    dct = (dct / (1 + f[:, None] * f[None, :])).reshape(patch * patch, 64)
    h = lin(torch.cat([pixels, dct.expand(pixels.shape[0], -1, -1)], -1), "x_embedder.embedder.0")
    c = h.shape[-1]
    for j in range(depth, depth + field_depth):
        b = f"blocks.{j}."
        generated = lin(s, b + "param_generator1.0")
        first = F.normalize(generated[:, : c * c * nerf_ratio].reshape(-1, c, c * nerf_ratio), dim=1)
        second = F.normalize(generated[:, c * c * nerf_ratio :].reshape(-1, c * nerf_ratio, c), dim=1)
        h = h + F.silu(rms(h, w[b + "norm.weight"]) @ first) @ second
    out = lin(rms(h, w["final_layer.norm.weight"]), "final_layer.linear")  # (M, p^2, 3)
    out = out.transpose(1, 2).reshape(batch, -1, 3 * patch * patch).transpose(1, 2)
    return F.fold(out, (height, width_px), patch, stride=patch)


def under_pixnerd_names(model):
    """The weights of a model with PixNerd's channel layout (dim 3, no image conditioning, patch stem),
    under PixNerd's parameter names: the loader's key map read backwards."""
    ours = model.state_dict()
    return {theirs: ours[name] for theirs, name in pixnerd_key_map(model).items()}


def lightning_file(tmp_path, state, name="pixnerd.ckpt"):
    """A Lightning-style checkpoint: EMA and raw denoiser copies plus unrelated modules."""
    noisy = {k: v + 1.0 for k, v in state.items()}
    content = {"state_dict": {
        **{"ema_denoiser." + k: v for k, v in state.items()},
        **{"denoiser." + k: v for k, v in noisy.items()},
        "vae.scale": torch.tensor(1.0),
    }}
    path = tmp_path / name
    torch.save(content, path)
    return path


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "width", "depth", "field_depth"), [("L/16", 1024, 22, 2), ("XL/16", 1152, 26, 4)])
def test_large_sizes_have_pixnerd_shapes(size, width, depth, field_depth):
    with torch.device("meta"):
        model = PixelFieldTransformer(size, dim=3, image_conditioning=False)
    expected = pixnerd_shapes(width, 16, depth, field_depth)
    del expected["y_embedder.embedding_table.weight"]
    ours = {k: tuple(v.shape) for k, v in under_pixnerd_names(model).items()}
    assert ours == expected


def test_loaded_model_computes_pixnerd_forward(tmp_path):
    torch.manual_seed(0)
    state = tiny_pixnerd_state()
    model = PixelFieldTransformer(TINY, dim=3, image_conditioning=False)
    report = load_pixnerd_checkpoint(model, lightning_file(tmp_path, state))
    assert report.prefix == "ema_denoiser."
    assert report.skipped == ["y_embedder.embedding_table.weight"]
    assert report.adapted == [] and report.missing == [] and report.unexpected == []
    assert len(report.loaded) == len(list(model.parameters()))
    x, t = torch.randn(2, 3, 8, 12), torch.rand(2)
    assert torch.allclose(model(x, t).out, pixnerd_reference(state, x, t), atol=1e-4)


def test_image_conditioned_model_is_adapted_and_starts_as_pixnerd(tmp_path):
    torch.manual_seed(0)
    state = tiny_pixnerd_state()
    path = tmp_path / "pixnerd.safetensors"
    save_file(state, path)
    model = PixelFieldTransformer(TINY, dim=3)  # input [x_t, I]: 6 channels
    report = load_pixnerd_checkpoint(model, path)
    assert report.prefix == ""
    assert report.adapted == [
        "stem.proj.weight <- s_embedder.proj.weight: (32, 48) -> (32, 96)",
        "field.embed.weight <- x_embedder.embedder.0.weight: (8, 67) -> (8, 70)",
    ]
    patch_weight = model.stem.proj.weight.view(32, 6, 16)
    assert torch.equal(patch_weight[:, :3], state["s_embedder.proj.weight"].view(32, 3, 16))
    assert torch.equal(patch_weight[:, 3:], torch.zeros(32, 3, 16))
    embed = model.field.embed.weight  # columns: x_t (3), image (3), DCT (64)
    assert torch.equal(embed[:, :3], state["x_embedder.embedder.0.weight"][:, :3])
    assert torch.equal(embed[:, 3:6], torch.zeros(8, 3))
    assert torch.equal(embed[:, 6:], state["x_embedder.embedder.0.weight"][:, 3:])
    # the image channels start at zero weight: the network is exactly PixNerd whatever the image
    x, t = torch.randn(1, 3, 8, 8), torch.rand(1)
    assert torch.allclose(model(x, t, torch.randn(1, 3, 8, 8)).out, pixnerd_reference(state, x, t), atol=1e-4)


def test_other_encoding_dimensions_adapt_outputs(tmp_path):
    state = tiny_pixnerd_state()
    path = lightning_file(tmp_path, state)
    model = PixelFieldTransformer(TINY, dim=5, image_conditioning=False)
    report = load_pixnerd_checkpoint(model, path)
    assert len(report.adapted) == 4  # patch embedding, field input, output weight and bias
    assert torch.equal(model.field.out.weight[:3], state["final_layer.linear.weight"])
    assert torch.equal(model.field.out.weight[3:], torch.zeros(2, 8))
    twin = DiscriminativeFieldTransformer(TINY, num_classes=2)  # fewer outputs than PixNerd: a slice
    load_pixnerd_checkpoint(twin, path)
    assert torch.equal(twin.field.out.bias, state["final_layer.linear.bias"][:2])
    assert torch.equal(twin.stem.proj.weight, state["s_embedder.proj.weight"])


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_round_trip_of_the_models_own_weights(tmp_path, suffix):
    torch.manual_seed(0)
    source = PixelFieldTransformer("T/8", dim=3, image_conditioning=False)
    with torch.no_grad():
        for param in source.parameters():
            param.normal_()
    state = {k: v.contiguous() for k, v in under_pixnerd_names(source).items()}
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save(state, path)
    target = PixelFieldTransformer("T/8", dim=3, image_conditioning=False)
    report = load_pixnerd_checkpoint(target, path)
    assert report.skipped == [] and len(report.loaded) == len(source.state_dict())
    for (name, a), (_, b) in zip(source.state_dict().items(), target.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_shape_mismatches_are_all_listed(tmp_path):
    path = lightning_file(tmp_path, tiny_pixnerd_state())
    wider = ModelSize("wider", width=48, heads=3, depth=2, field_depth=2, patch_size=4, field_width=8)
    with pytest.raises(ValueError) as error:
        load_pixnerd_checkpoint(PixelFieldTransformer(wider, dim=3, image_conditioning=False), path)
    message = str(error.value)
    assert "shape mismatch" in message
    assert "s_embedder.proj.weight -> stem.proj.weight: checkpoint (32, 48), model (48, 48)" in message
    assert "blocks.3.param_generator1.0.weight -> field.blocks.1.weight_generator.weight: " \
        "checkpoint (256, 32), model (256, 48)" in message
    listed = [line for line in message.splitlines() if line.startswith("  ")]
    assert len(listed) == int(message.split(" shape mismatch")[0].split()[-1])
    # per trunk block all but the q/k norms (head width 16 either way), each generator's weight,
    # the patch embedding and the time MLP
    assert len(listed) == 2 * 10 + 2 * 1 + 6


def test_missing_and_unexpected_keys(tmp_path):
    state = tiny_pixnerd_state()
    del state["blocks.1.attn.proj.bias"]
    state["blocks.9.attn.qkv.weight"] = torch.zeros(96, 32)
    path = lightning_file(tmp_path, state)
    with pytest.raises(ValueError, match=r"missing from the checkpoint: \['trunk.1.attn.proj.bias'\]") as error:
        load_pixnerd_checkpoint(PixelFieldTransformer(TINY, 3, image_conditioning=False), path)
    assert "unexpected checkpoint key(s): ['blocks.9.attn.qkv.weight']" in str(error.value)
    model = PixelFieldTransformer(TINY, 3, image_conditioning=False)
    initial = model.trunk[1].attn.proj.bias.clone()
    report = load_pixnerd_checkpoint(model, path, strict=False)
    assert report.missing == ["trunk.1.attn.proj.bias"] and report.unexpected == ["blocks.9.attn.qkv.weight"]
    assert torch.equal(model.trunk[1].attn.proj.bias, initial)
    assert torch.equal(model.trunk[0].attn.proj.bias, state["blocks.0.attn.proj.bias"])


def test_bad_files_and_models(tmp_path):
    with pytest.raises(ValueError, match="checkpoint file not found"):
        load_pixnerd_checkpoint(PixelFieldTransformer(TINY, 3), tmp_path / "absent.ckpt")
    path = tmp_path / "numbers.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(ValueError, match="holds no state dict"):
        load_pixnerd_checkpoint(PixelFieldTransformer(TINY, 3), path)
    with pytest.raises(TypeError, match="must be a flowseg field transformer"):
        load_pixnerd_checkpoint(torch.nn.Linear(2, 2), path)


def test_conv_stem_model_takes_everything_but_the_patch_embedding(tmp_path):
    """PixNerd has no convolutional stem: its patch embedding is unexpected, the stem stays at init,
    and strict loading says both."""
    state = tiny_pixnerd_state()
    path = lightning_file(tmp_path, state)
    with pytest.raises(ValueError, match=r"unexpected checkpoint key\(s\): \['s_embedder.proj.weight', "
                                         r"'s_embedder.proj.bias'\]") as error:
        load_pixnerd_checkpoint(PixelFieldTransformer(TINY, 3, image_conditioning=False, stem="conv"), path)
    assert "stem.layers.0.weight" in str(error.value)
    model = PixelFieldTransformer(TINY, 3, image_conditioning=False, stem="conv")
    initial = model.stem.layers[0].weight.clone()
    report = load_pixnerd_checkpoint(model, path, strict=False)
    assert sorted(report.unexpected) == ["s_embedder.proj.bias", "s_embedder.proj.weight"]
    assert report.missing and all(name.startswith("stem.layers.") for name in report.missing)
    assert torch.equal(model.stem.layers[0].weight, initial)
    assert torch.equal(model.trunk[0].attn.proj.bias, state["blocks.0.attn.proj.bias"])


@pytest.mark.parametrize("damage", ["empty", "garbage", "truncated"])
def test_a_corrupt_safetensors_file_is_refused_by_name(tmp_path, damage):
    path = tmp_path / "pixnerd.safetensors"
    save_file(tiny_pixnerd_state(), path)
    path.write_bytes({"empty": b"", "garbage": b"not a safetensors file",
                      "truncated": path.read_bytes()[:-100]}[damage])
    with pytest.raises(ValueError, match=f"cannot read '{path}' as a safetensors file: "):
        load_pixnerd_checkpoint(PixelFieldTransformer(TINY, 3), path, strict=False)


@pytest.mark.parametrize("strict", [True, False])
def test_a_file_matching_no_parameter_is_refused(tmp_path, strict):
    """Not a PixNerd file, e.g. a flowseg checkpoint's own weights (our names): loading it would
    silently keep every initial weight."""
    path = tmp_path / "ours.safetensors"
    save_file(PixelFieldTransformer(TINY, 3).state_dict(), path)
    model = PixelFieldTransformer(TINY, 3)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"'{path}' holds no PixNerd weight: none of its \d+ tensor names "
                                         r"\(e.g. \['field.blocks.0.norm.weight', .*\) is a PixNerd parameter of "
                                         r"tiny-test \(e.g. \['blocks.0.adaLN_modulation"):
        load_pixnerd_checkpoint(model, path, strict=strict)
    assert all(torch.equal(v, initial[k]) for k, v in model.state_dict().items())


def test_nonfinite_pretrained_weights_are_refused(tmp_path):
    state = tiny_pixnerd_state()
    state["blocks.1.attn.proj.bias"][3] = float("nan")
    path = tmp_path / "pixnerd.safetensors"
    save_file(state, path)
    model = PixelFieldTransformer(TINY, 3, image_conditioning=False)
    initial = model.trunk[0].attn.proj.bias.clone()
    with pytest.raises(ValueError, match=r"NaN/inf values in 1 weight\(s\), e.g. \['trunk.1.attn.proj.bias'\]"):
        load_pixnerd_checkpoint(model, path)
    assert torch.equal(model.trunk[0].attn.proj.bias, initial)  # nothing was copied
