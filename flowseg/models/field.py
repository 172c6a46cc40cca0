"""The pixel neural-field transformer (PixNerd-style) and its discriminative twin.

    stem    s_0 = W_patch patchify(avgpool_qs(u)) + b       u = [x_t, I]: network input (B, c_in, H, W)
            (PatchEmbedding; or ConvStem: 3x3 convolutions down to the same patch grid)
    time    e_t = MLP(sinusoid(t)),  c = SiLU(e_t + y_0)
            y_0: a learned vector, zero at init; PixNerd's embedding of its null class label, which is
            what a PixNerd checkpoint brings (pixnerd.py)
    trunk   s_{l+1} = TrunkBlock(s_l, c)                     adaLN-Zero DiT blocks, 2-D RoPE
    field   per patch token s = SiLU(s_L + e_t) and each of its query pixels (i, j):
            h_0 = W_in [u(i, j), DCT(i, j)],  h_{k+1} = FieldBlock_k(h_k; s),  out = W_out RMSNorm(h_K)
    tokens  optional token head (token_classes = N): z_l = W_tok s_L,l, N class logits per patch token,
            trained by an auxiliary loss (losses.token_classification_loss) and unused when sampling

Both networks return a FieldOutput: the per-pixel output and, with a token head, the token logits
(and, when asked, the tokens of one trunk block, which REPA aligns: flowseg/repa.py).

query_scale = qs: the inputs come at the query resolution (H, W). The trunk sees them area-downsampled
by qs, so each token covers a (p qs) x (p qs) block of query pixels; the field decoder evaluates every
one of them with that pixel's own input values and its DCT position on the finer grid. qs = 1 is
ordinary use; qs = 2 gives a label map at twice the resolution the trunk works at.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowseg.models.layers import (
    NORM_EPS,
    FieldBlock,
    RMSNorm,
    TimestepEmbedder,
    TrunkBlock,
    dct_features,
    rope_2d_angles,
)

IMAGE_CHANNELS = 3


@dataclass(frozen=True)
class ModelSize:
    name: str
    width: int  # C, trunk token width
    heads: int
    depth: int  # trunk blocks
    field_depth: int  # neural-field blocks
    patch_size: int  # p
    field_width: int = 64  # c, per-pixel hidden width of the field MLP
    field_mlp_ratio: int = 2  # the field MLP's hidden layer is field_mlp_ratio * c wide
    mlp_ratio: float = 4.0  # trunk SwiGLU sized like a mlp_ratio * C GELU MLP
    dct_freqs: int = 8  # F, the field sees F^2 DCT position features


SIZES: dict[str, ModelSize] = {
    size.name: size
    for size in (
        ModelSize("T/8", width=128, heads=4, depth=4, field_depth=2, patch_size=8, field_width=32),
        ModelSize("T/4", width=128, heads=4, depth=4, field_depth=2, patch_size=4, field_width=16),
        ModelSize("S/8", width=256, heads=4, depth=8, field_depth=2, patch_size=8, field_width=32),
        ModelSize("B/16", width=768, heads=12, depth=12, field_depth=2, patch_size=16),
        # PixNerd's shapes (configs pix256std1_repa_pixnerd_{large,xl}): hidden 64, nerf_mlpratio 2
        ModelSize("L/16", width=1024, heads=16, depth=22, field_depth=2, patch_size=16),
        ModelSize("XL/16", width=1152, heads=16, depth=26, field_depth=4, patch_size=16),
    )
}


def resolve_size(size: str | ModelSize) -> ModelSize:
    if isinstance(size, ModelSize):
        return size
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; expected one of {sorted(SIZES)}")
    return SIZES[size]


# ---------------------------------------------------------------------------------------------
# patches


def patchify(x: Tensor, side: int) -> Tensor:
    """(B, c, H, W) -> (B, L, c, side^2): L = (H / side)(W / side) patches, row-major everywhere."""
    batch, channels, height, width = x.shape
    x = x.view(batch, channels, height // side, side, width // side, side)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(batch, -1, channels, side * side)


def unpatchify(patches: Tensor, grid_h: int, grid_w: int) -> Tensor:
    """(B, L, side^2, c) -> (B, c, grid_h * side, grid_w * side), the inverse of patchify's layout."""
    batch, _, pixels, channels = patches.shape
    side = int(pixels**0.5)
    x = patches.view(batch, grid_h, grid_w, side, side, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(batch, channels, grid_h * side, grid_w * side)


# ---------------------------------------------------------------------------------------------
# token stems: u (B, c_in, H, W) -> tokens (B, L, C), L = (H / p)(W / p) in row-major patch order


class PatchEmbedding(nn.Module):
    """s_0 = W patchify(u) + b: one linear map per p x p patch (PixNerd's s_embedder)."""

    def __init__(self, in_channels: int, width: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(in_channels * patch_size * patch_size, width)

    def forward(self, inputs: Tensor) -> Tensor:
        return self.proj(patchify(inputs, self.patch_size).flatten(2))  # (B, L, c_in p^2) -> (B, L, C)


class ConvStem(nn.Module):
    """Tokens from 3x3 convolutions instead of one linear map per patch:

        s_0 = W_1x1 (SiLU o Conv3x3_s2)^k (SiLU o Conv3x3)^2 (u),   k = log2(p) stride-2 stages

    with 32 channels at full resolution and in the first stage, doubling at every later stage (capped
    at C). The (H/p, W/p) output grid is the patch grid, so token l still stands for patch l; it also
    sees a few pixels beyond its patch. The convolutions bring the locality prior that a linear patch
    embedding lacks and that a small model trained for minutes cannot learn from attention alone
    (docs/model.md, "Convolutional stem").
    """

    full_resolution_layers = 2
    base_channels = 32

    def __init__(self, in_channels: int, width: int, patch_size: int):
        super().__init__()
        stages = patch_size.bit_length() - 1
        if patch_size < 2 or 2**stages != patch_size:
            raise ValueError(f"the conv stem needs a power-of-two patch size >= 2, got {patch_size}")
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(self.full_resolution_layers):
            layers += [nn.Conv2d(channels, self.base_channels, 3, padding=1), nn.SiLU()]
            channels = self.base_channels
        for stage in range(stages):
            out = min(self.base_channels * 2**stage, width)
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1), nn.SiLU()]
            channels = out
        layers.append(nn.Conv2d(channels, width, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, inputs: Tensor) -> Tensor:
        return self.layers(inputs).flatten(2).transpose(1, 2)  # (B, C, H/p, W/p) -> (B, L, C)


STEMS: dict[str, type[nn.Module]] = {"patch": PatchEmbedding, "conv": ConvStem}


# ---------------------------------------------------------------------------------------------
# the field decoder


class NeuralFieldDecoder(nn.Module):
    """Maps each patch token and its query pixels' inputs to per-pixel outputs; patches are independent."""

    def __init__(self, size: ModelSize, in_channels: int, out_channels: int):
        super().__init__()
        self.dct_freqs = size.dct_freqs
        self.embed = nn.Linear(in_channels + size.dct_freqs**2, size.field_width)
        self.blocks = nn.ModuleList(
            FieldBlock(size.width, size.field_width, size.field_mlp_ratio) for _ in range(size.field_depth)
        )
        self.norm = RMSNorm(size.field_width, eps=NORM_EPS)
        self.out = nn.Linear(size.field_width, out_channels)

    def forward(self, tokens: Tensor, pixels: Tensor) -> Tensor:
        """tokens (M, C), pixels (M, Q, c_in) with Q = side^2 query pixels -> (M, Q, c_out)."""
        queries = pixels.shape[1]
        side = int(round(queries**0.5))
        if side * side != queries:
            raise ValueError(f"a patch must hold a square number of query pixels, got {queries}")
        dct = dct_features(side, self.dct_freqs, device=pixels.device).to(pixels.dtype)  # (Q, F^2)
        # embed([u, dct]) = W_u u + (W_dct dct + b): the position term is the same for every patch,
        # so it is computed once instead of concatenating F^2 features to every pixel
        channels = pixels.shape[-1]
        position = F.linear(dct, self.embed.weight[:, channels:], self.embed.bias)  # (Q, c)
        h = F.linear(pixels, self.embed.weight[:, :channels]) + position  # (M, Q, c)
        for block in self.blocks:
            h = block(h, tokens)
        return self.out(self.norm(h))


# ---------------------------------------------------------------------------------------------
# initialisation


def init_linear_xavier(model: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for every Linear (the DiT/PixNerd default)."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def init_time_embedding(embedder: TimestepEmbedder) -> None:
    nn.init.normal_(embedder.fc1.weight, std=0.02)
    nn.init.normal_(embedder.fc2.weight, std=0.02)


def init_adaln_zero(blocks: nn.ModuleList) -> None:
    """Zero modulation: gates alpha = 0, so every trunk block starts as the identity."""
    for block in blocks:
        nn.init.zeros_(block.modulation.weight)
        nn.init.zeros_(block.modulation.bias)


def init_output_zero(decoder: NeuralFieldDecoder) -> None:
    """Zero final layer: the network's output is exactly 0 at init (v = 0, or uniform logits)."""
    nn.init.zeros_(decoder.out.weight)
    nn.init.zeros_(decoder.out.bias)


# ---------------------------------------------------------------------------------------------
# the networks


@dataclass
class FieldOutput:
    """What a forward pass returns."""
    out: Tensor                  # (B, c_out, H, W): v (or x1_hat) of the flow model, the twin's N logits
    token_logits: Tensor | None  # (B, L, N) from the token head, tokens in row-major patch order; None without one
    block_tokens: Tensor | None = None  # (B, L, C) the tokens after trunk block `expose_block` when asked (REPA)


def _check_image_like(name: str, x: object, channels: int, batch: int | None = None) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != channels or (batch is not None and x.shape[0] != batch):
        expected = f"({batch if batch is not None else 'B'}, {channels}, H, W)"
        raise ValueError(f"{name} must have shape {expected}, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


class FieldTransformerBase(nn.Module):
    """Token stem (STEMS[stem]), time embedding, trunk and field decoder over a generic input u
    (B, c_in, H, W), and the optional token head."""

    def __init__(self, size: str | ModelSize, in_channels: int, out_channels: int, token_classes: int | None = None,
                 stem: str = "patch"):
        super().__init__()
        self.size = resolve_size(size)
        width, patch = self.size.width, self.size.patch_size
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r}; expected one of {tuple(STEMS)}")
        self.stem = STEMS[stem](in_channels, width, patch)
        self.time_embed = TimestepEmbedder(width)
        self.null_embedding = nn.Parameter(torch.zeros(width))  # y_0; zero: c = SiLU(e_t) until trained or loaded
        self.trunk = nn.ModuleList(
            TrunkBlock(width, self.size.heads, self.size.mlp_ratio) for _ in range(self.size.depth)
        )
        self.field = NeuralFieldDecoder(self.size, in_channels, out_channels)
        init_linear_xavier(self)
        init_time_embedding(self.time_embed)
        init_adaln_zero(self.trunk)
        init_output_zero(self.field)
        # built last, so a seed gives the same trunk and field whether or not the head is there
        self.token_head: nn.Linear | None = None
        if token_classes is not None:
            if isinstance(token_classes, bool) or not isinstance(token_classes, int) or token_classes < 2:
                raise ValueError(f"token_classes must be an integer >= 2 or None, got {token_classes!r}")
            self.token_head = nn.Linear(width, token_classes)
            init_linear_xavier(self.token_head)

    def trunk_tokens(self, coarse: Tensor, time: Tensor, expose_block: int | None = None
                     ) -> tuple[Tensor, Tensor | None]:
        """The stem and trunk on the trunk-resolution input u (B, c_in, p grid_h, p grid_w) with e_t (B, C):
        s_L (B, L, C) and, for expose_block = k, s_k (else None)."""
        grid_h, grid_w = (side // self.size.patch_size for side in coarse.shape[-2:])
        tokens = self.stem(coarse)  # (B, L, C)
        condition = F.silu(time + self.null_embedding)  # (B, C)
        head_dim = self.size.width // self.size.heads
        rope = tuple(a.to(tokens.dtype) for a in rope_2d_angles(grid_h, grid_w, head_dim, device=coarse.device))
        exposed = None
        for index, block in enumerate(self.trunk, 1):
            tokens = block(tokens, condition, rope)
            exposed = tokens if index == expose_block else exposed
        return tokens, exposed

    def forward_field(self, inputs: Tensor, t: Tensor, query_scale: int = 1,
                      expose_block: int | None = None) -> FieldOutput:
        """u (B, c_in, H, W), t (B,) -> out (B, c_out, H, W) and, with a token head, the token logits
        (B, L, N), L = grid_h * grid_w; see the module docstring for query_scale. expose_block = k also
        returns s_k, the tokens after the first k trunk blocks."""
        if expose_block is not None and not 1 <= expose_block <= len(self.trunk):
            raise ValueError(f"expose_block must be in 1..{len(self.trunk)} (the trunk's blocks), got {expose_block!r}")
        if isinstance(query_scale, bool) or not isinstance(query_scale, int) or query_scale < 1:
            raise ValueError(f"query_scale must be an integer >= 1, got {query_scale!r}")
        batch, _, height, width = inputs.shape
        side = self.size.patch_size * query_scale  # query pixels per patch side
        if height % side or width % side:
            raise ValueError(
                f"input size {height}x{width} must be divisible by patch_size * query_scale = "
                f"{self.size.patch_size} * {query_scale} = {side}"
            )
        grid_h, grid_w = height // side, width // side
        coarse = F.avg_pool2d(inputs, query_scale) if query_scale > 1 else inputs
        time = self.time_embed(t)  # (B, C)
        tokens, exposed = self.trunk_tokens(coarse, time, expose_block)
        token_logits = self.token_head(tokens) if self.token_head is not None else None  # (B, L, N)
        # the field's weights come from the token; adding e_t lets them depend on t directly too
        tokens = F.silu(tokens + time[:, None])  # (B, L, C)
        pixels = patchify(inputs, side).transpose(-1, -2)  # (B, L, Q, c_in)
        out = self.field(tokens.flatten(0, 1), pixels.flatten(0, 1))  # (M, Q, c_out)
        out = unpatchify(out.view(batch, grid_h * grid_w, *out.shape[1:]), grid_h, grid_w)  # (B, c_out, H, W)
        return FieldOutput(out, token_logits, exposed)


class PixelFieldTransformer(FieldTransformerBase):
    """The flow model on x_t (B, d, H, W): FieldOutput with out (B, d, H, W), v or x1_hat, or with
    out_channels = N the logits (B, N, H, W) of p_theta(x_1 = mu_k | x_t, t, I) (the categorical objective).

    With image_conditioning the network input is u = [x_t, I] (d + 3 channels) for both the stem and
    the per-pixel field input; without it u = x_t, as in PixNerd, and image is ignored.
    """

    def __init__(self, size: str | ModelSize, dim: int, image_conditioning: bool = True,
                 token_classes: int | None = None, stem: str = "patch", out_channels: int | None = None):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim (the encoding dimension d) must be a positive integer, got {dim!r}")
        if out_channels is not None and (isinstance(out_channels, bool) or not isinstance(out_channels, int)
                                         or out_channels < 2):
            raise ValueError(f"out_channels must be an integer >= 2 or None (d), got {out_channels!r}")
        super().__init__(size, dim + IMAGE_CHANNELS * image_conditioning, out_channels or dim, token_classes, stem)
        self.dim = dim
        self.image_conditioning = image_conditioning

    def forward(self, x_t: Tensor, t: Tensor, image: Tensor | None = None, query_scale: int = 1,
                expose_block: int | None = None) -> FieldOutput:
        _check_image_like("x_t", x_t, self.dim)
        batch = x_t.shape[0]
        if not isinstance(t, Tensor):
            raise TypeError(f"t must be a torch.Tensor of shape ({batch},), got {type(t).__name__}")
        if t.dim() == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"t must have shape ({batch},) (one time per image), got {tuple(t.shape)}")
        inputs = x_t
        if self.image_conditioning:
            if image is None:
                raise ValueError("this model is image-conditioned (image_conditioning=True): pass image")
            _check_image_like("image", image, IMAGE_CHANNELS, batch)
            if image.shape[2:] != x_t.shape[2:]:
                raise ValueError(
                    f"image {tuple(image.shape[2:])} and x_t {tuple(x_t.shape[2:])} must have the same H, W"
                )
            inputs = torch.cat([x_t, image.to(x_t.dtype)], dim=1)  # (B, d + 3, H, W)
        return self.forward_field(inputs, t, query_scale, expose_block)


class DiscriminativeFieldTransformer(FieldTransformerBase):
    """The same trunk and field decoder mapping an image to N-class logits (FieldOutput.out, (B, N, H, W)).

    There is no time: t is held at 0, so the time embedding becomes a learned constant conditioning
    vector, and parameter count and compute equal the flow model's up to the input/output channels.
    """

    def __init__(self, size: str | ModelSize, num_classes: int, token_classes: int | None = None,
                 stem: str = "patch"):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        super().__init__(size, IMAGE_CHANNELS, num_classes, token_classes, stem)
        self.num_classes = num_classes

    def forward(self, image: Tensor, query_scale: int = 1, expose_block: int | None = None) -> FieldOutput:
        _check_image_like("image", image, IMAGE_CHANNELS)
        t = torch.zeros(image.shape[0], device=image.device)
        return self.forward_field(image, t, query_scale, expose_block)


def build_model(
    kind: Literal["flow", "discriminative"],
    size: str | ModelSize,
    dim: int | None = None,
    num_classes: int | None = None,
    image_conditioning: bool = True,
    token_classes: int | None = None,
    stem: str = "patch",
    out_channels: int | None = None,
) -> FieldTransformerBase:
    """The flow model (kind="flow", needs dim; out_channels = N for class logits, default d) or its
    discriminative twin (needs num_classes); token_classes = N adds the token head (N logits per patch
    token) to either."""
    if kind == "flow":
        if dim is None:
            raise ValueError("build_model('flow', ...) needs dim, the encoding dimension d")
        return PixelFieldTransformer(size, dim, image_conditioning, token_classes, stem, out_channels)
    if kind == "discriminative":
        if num_classes is None:
            raise ValueError("build_model('discriminative', ...) needs num_classes")
        return DiscriminativeFieldTransformer(size, num_classes, token_classes, stem)
    raise ValueError(f"unknown model kind {kind!r}; expected 'flow' or 'discriminative'")
