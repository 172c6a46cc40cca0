"""Tests of the PixNerd checkpoint loader.

Oracle: ReferencePixNerd, PixNerd's class-to-image denoiser (PixNerDiT) re-stated from its published
structure, independently of flowseg's layers: its parameter names come from its module tree as in
PixNerd (patch embedding `s_embedder`, time MLP `t_embedder.mlp`, label table `y_embedder` with
num_classes + 1 rows, `blocks` = trunk blocks then NeRF blocks, NeRF input `x_embedder` with 8 x 8
DCT features, `final_layer`), and its forward pass is written out with unfold/fold patches and RoPE
as complex multiplication. Its state dict, saved as PixNerd's Lightning module saves it, is what the
loader reads.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from flowseg.models import DiscriminativeFieldTransformer, ModelSize, PixelFieldTransformer, load_pixnerd_checkpoint
from flowseg.models.pixnerd import LABEL_TABLE, pixnerd_key_map

TINY = ModelSize("tiny-test", width=32, heads=2, depth=2, field_depth=2, patch_size=4, field_width=8)
TINY_CLASSES = 10


def named(**children):
    """A module holding `children` under their names: PixNerd's parameter names without its code."""
    module = nn.Module()
    for name, child in children.items():
        module.add_module(name, child)
    return module


class RMSNorm(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, v):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class ReferencePixNerd(nn.Module):
    """PixNerd's class-to-image denoiser for 3-channel images: forward(x (B, 3, H, W), t (B,), y (B,))."""

    def __init__(self, width, heads, depth, field_depth, patch=16, field_width=64, nerf_ratio=2, classes=1000):
        super().__init__()
        self.heads, self.depth, self.patch, self.nerf_ratio = heads, depth, patch, nerf_ratio
        ffn, head = int(2 * 4 * width / 3), width // heads
        self.s_embedder = named(proj=nn.Linear(3 * patch * patch, width))
        self.t_embedder = named(mlp=nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width)))
        self.y_embedder = named(embedding_table=nn.Embedding(classes + 1, width))  # row `classes`: no label
        trunk = [named(norm1=RMSNorm(width),
                       attn=named(qkv=nn.Linear(width, 3 * width, bias=False), q_norm=RMSNorm(head),
                                  k_norm=RMSNorm(head), proj=nn.Linear(width, width)),
                       norm2=RMSNorm(width),
                       mlp=named(w1=nn.Linear(width, ffn, bias=False), w3=nn.Linear(width, ffn, bias=False),
                                 w2=nn.Linear(ffn, width, bias=False)),
                       adaLN_modulation=nn.Sequential(nn.Linear(width, 6 * width)))
                 for _ in range(depth)]
        nerf = [named(param_generator1=nn.Sequential(nn.Linear(width, 2 * field_width**2 * nerf_ratio)),
                      norm=RMSNorm(field_width))
                for _ in range(field_depth)]
        self.blocks = nn.ModuleList(trunk + nerf)
        self.x_embedder = named(embedder=nn.Sequential(nn.Linear(3 + 64, field_width)))
        self.final_layer = named(norm=RMSNorm(field_width), linear=nn.Linear(field_width, 3))

    def rotations(self, grid_h, grid_w, head, dtype):
        """2-D RoPE: (L, D/2) unit complex numbers, x and y angles interleaved, positions in [0, 16]."""
        ys, xs = torch.meshgrid(torch.linspace(0, 16, grid_h, dtype=dtype), torch.linspace(0, 16, grid_w, dtype=dtype),
                                indexing="ij")
        omega = 1.0 / 10000 ** (torch.arange(0, head, 4, dtype=dtype) / head)
        angles = torch.stack([xs.reshape(-1, 1) * omega, ys.reshape(-1, 1) * omega], -1).reshape(-1, head // 2)
        return torch.polar(torch.ones_like(angles), angles)

    def dct(self, dtype):
        """(p^2, 64): cos(pi f_i x) cos(pi f_j y) / (1 + f_i f_j), f = linspace(0, 8, 8), x, y in [0, 1]."""
        pos_y, pos_x = torch.meshgrid(torch.linspace(0, 1, self.patch, dtype=dtype),
                                      torch.linspace(0, 1, self.patch, dtype=dtype), indexing="ij")
        f = torch.linspace(0, 8, 8, dtype=dtype)
        cos_x = torch.cos(torch.pi * pos_x.reshape(-1, 1) * f)
        cos_y = torch.cos(torch.pi * pos_y.reshape(-1, 1) * f)
        return (cos_x[:, :, None] * cos_y[:, None, :] / (1 + f[:, None] * f[None, :])).reshape(-1, 64)

    def forward(self, x, t, y):
        batch, _, height, width_px = x.shape
        p = self.patch
        freqs = torch.exp(-math.log(10) * torch.arange(128, dtype=x.dtype) / 128)  # max period 10
        temb = self.t_embedder.mlp(torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], -1))
        cond = F.silu(temb + self.y_embedder.embedding_table(y))[:, None]  # (B, 1, C)

        patches = F.unfold(x, p, stride=p).transpose(1, 2)  # (B, L, 3 p^2)
        s = self.s_embedder.proj(patches)
        C = s.shape[-1]
        D = C // self.heads
        rotation = self.rotations(height // p, width_px // p, D, x.dtype)

        def rotate(v):  # (B, L, h, D): channel pairs as complex numbers
            z = torch.view_as_complex(v.reshape(*v.shape[:-1], D // 2, 2).contiguous())
            return torch.view_as_real(z * rotation[None, :, None]).flatten(-2)

        for block in self.blocks[: self.depth]:
            sh1, sc1, g1, sh2, sc2, g2 = block.adaLN_modulation(cond).chunk(6, -1)
            u = block.norm1(s) * (1 + sc1) + sh1
            q, k, v = block.attn.qkv(u).view(batch, -1, 3, self.heads, D).unbind(2)  # (B, L, h, D)
            q = rotate(block.attn.q_norm(q)).transpose(1, 2)
            k = rotate(block.attn.k_norm(k)).transpose(1, 2)
            attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D), -1) @ v.transpose(1, 2)
            s = s + g1 * block.attn.proj(attn.transpose(1, 2).reshape(batch, -1, C))
            u = block.norm2(s) * (1 + sc2) + sh2
            s = s + g2 * block.mlp.w2(F.silu(block.mlp.w1(u)) * block.mlp.w3(u))
        s = F.silu(s + temb[:, None]).reshape(-1, C)  # (M, C): the time alone, not the label

        pixels = patches.reshape(-1, 3, p * p).transpose(1, 2)  # (M, p^2, 3)
        dct = self.dct(x.dtype).expand(pixels.shape[0], -1, -1)
        h = self.x_embedder.embedder(torch.cat([pixels, dct], -1))
        c, r = h.shape[-1], self.nerf_ratio
        for block in self.blocks[self.depth :]:
            generated = block.param_generator1(s)
            first = F.normalize(generated[:, : c * c * r].reshape(-1, c, c * r), dim=1)
            second = F.normalize(generated[:, c * c * r :].reshape(-1, c * r, c), dim=1)
            h = h + F.silu(block.norm(h) @ first) @ second
        out = self.final_layer.linear(self.final_layer.norm(h))  # (M, p^2, 3)
        out = out.transpose(1, 2).reshape(batch, -1, 3 * p * p).transpose(1, 2)
        return F.fold(out, (height, width_px), p, stride=p)


def tiny_reference(seed=0):
    """ReferencePixNerd at TINY's sizes with random weights, none zero: norms 1 + 0.2 N(0, 1), the rest
    0.2 N(0, 1) (the label table's null row included)."""
    generator = torch.Generator().manual_seed(seed)
    reference = ReferencePixNerd(32, 2, 2, 2, patch=4, field_width=8, classes=TINY_CLASSES)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            param.copy_(0.2 * torch.randn(param.shape, generator=generator) + ("norm" in name))
    return reference


def tiny_pixnerd_state(seed=0):
    return {name: value.clone() for name, value in tiny_reference(seed).state_dict().items()}


def null_label(batch):
    return torch.full((batch,), TINY_CLASSES)


def under_pixnerd_names(model):
    """The weights of a model with PixNerd's channel layout (dim 3, no image conditioning, patch stem),
    under PixNerd's parameter names: the loader's key map read backwards (no label table)."""
    ours = model.state_dict()
    return {theirs: ours[name] for theirs, name in pixnerd_key_map(model).items()}


def lightning_file(tmp_path, state, name="pixnerd.ckpt"):
    """A checkpoint as PixNerd's Lightning module saves it: EMA and raw denoiser copies and unrelated
    modules in "state_dict", the optimizer's Adam moments beside it."""
    noisy = {k: v + 1.0 for k, v in state.items()}
    adam = {i: {"step": torch.tensor(7.0), "exp_avg": v + 2.0, "exp_avg_sq": v.square()}
            for i, v in enumerate(state.values())}
    content = {
        "epoch": 0,
        "global_step": 7,
        "state_dict": {
            **{"ema_denoiser." + k: v for k, v in state.items()},
            **{"denoiser." + k: v for k, v in noisy.items()},
            "vae.scale": torch.tensor(1.0),
        },
        "optimizer_states": [{"state": adam, "param_groups": [{"lr": 1e-4, "params": list(adam)}]}],
    }
    path = tmp_path / name
    torch.save(content, path)
    return path


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "width", "depth", "field_depth"), [("L/16", 1024, 22, 2), ("XL/16", 1152, 26, 4)])
def test_large_sizes_have_pixnerd_shapes(size, width, depth, field_depth):
    with torch.device("meta"):
        model = PixelFieldTransformer(size, dim=3, image_conditioning=False)
        expected = {k: tuple(v.shape) for k, v in ReferencePixNerd(width, 16, depth, field_depth).state_dict().items()}
    assert expected.pop(LABEL_TABLE) == (1001, *model.null_embedding.shape)
    ours = {k: tuple(v.shape) for k, v in under_pixnerd_names(model).items()}
    assert ours == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_loaded_model_computes_pixnerd_forward(tmp_path, dtype):
    """Every weight non-zero, the null label's row included: the loaded model is PixNerd's denoiser
    without a class label, to rounding."""
    torch.manual_seed(0)
    reference = tiny_reference()
    model = PixelFieldTransformer(TINY, dim=3, image_conditioning=False)
    report = load_pixnerd_checkpoint(model, lightning_file(tmp_path, reference.state_dict()))
    assert report.prefix == "ema_denoiser."
    assert report.adapted == [f"null_embedding <- {LABEL_TABLE}[10] (the null label): (11, 32) -> (32,)"]
    assert report.missing == [] and report.unexpected == []
    assert len(report.loaded) == len(list(model.parameters())) - 1
    assert torch.equal(model.null_embedding, reference.y_embedder.embedding_table.weight[TINY_CLASSES])
    x, t = torch.randn(2, 3, 8, 12, dtype=dtype), torch.rand(2, dtype=dtype)
    model, reference = model.to(dtype), reference.to(dtype)
    with torch.no_grad():
        expected = reference(x, t, null_label(2))
        torch.testing.assert_close(model(x, t).out, expected, atol=1e-5, rtol=0)
        # the null row matters at this scale: without it the trunk is another function
        model.null_embedding.zero_()
        assert (model(x, t).out - expected).abs().max() > 1e-3


def test_image_conditioned_model_is_adapted_and_starts_as_pixnerd(tmp_path):
    torch.manual_seed(0)
    reference = tiny_reference()
    state = tiny_pixnerd_state()
    path = tmp_path / "pixnerd.safetensors"
    save_file(state, path)
    model = PixelFieldTransformer(TINY, dim=3)  # input [x_t, I]: 6 channels
    report = load_pixnerd_checkpoint(model, path)
    assert report.prefix == ""
    assert report.adapted == [
        "stem.proj.weight <- s_embedder.proj.weight: (32, 48) -> (32, 96)",
        "field.embed.weight <- x_embedder.embedder.0.weight: (8, 67) -> (8, 70)",
        f"null_embedding <- {LABEL_TABLE}[10] (the null label): (11, 32) -> (32,)",
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
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, torch.randn(1, 3, 8, 8)).out, reference(x, t, null_label(1)),
                                   atol=1e-5, rtol=0)


def test_other_encoding_dimensions_adapt_outputs(tmp_path):
    state = tiny_pixnerd_state()
    path = lightning_file(tmp_path, state)
    model = PixelFieldTransformer(TINY, dim=5, image_conditioning=False)
    report = load_pixnerd_checkpoint(model, path)
    assert len(report.adapted) == 5  # patch embedding, null label's row, field input, output weight and bias
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
    state[LABEL_TABLE] = torch.stack([torch.randn(128), source.null_embedding.detach()])  # one class, then no label
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save(state, path)
    target = PixelFieldTransformer("T/8", dim=3, image_conditioning=False)
    report = load_pixnerd_checkpoint(target, path)
    assert len(report.loaded) == len(source.state_dict()) - 1 and len(report.adapted) == 1
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
    assert f"{LABEL_TABLE} -> null_embedding: checkpoint (11, 32), model (num_classes + 1, 48)" in message
    # per trunk block all but the q/k norms (head width 16 either way), each generator's weight,
    # the patch embedding, the time MLP and the label table
    assert len(listed) == 2 * 10 + 2 * 1 + 6 + 1


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
