"""Building blocks of the pixel neural-field transformer.

Notation: B batch, L tokens per image (one per p x p patch), C trunk width, h heads, D = C / h the
head width, M = B * L patches, Q query pixels per patch, c field width. Every layer that PixNerd
also has keeps PixNerd's parameter shapes and conventions (chunk order, frequency layout), so a
PixNerd checkpoint computes the same function here (see pixnerd.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NORM_EPS = 1e-6
TIME_FEATURES = 256
TIME_MAX_PERIOD = 10.0  # t lives in [0, 1], so periods up to 10 (PixNerd) rather than DiT's 10^4
ROPE_THETA = 10_000.0
ROPE_EXTENT = 16.0  # token positions span [0, 16] on each axis whatever the grid size (PixNerd)


class RMSNorm(nn.RMSNorm):
    """x / sqrt(mean(x^2) + eps) * w, with w cast to x's dtype: under bf16 autocast a float32 w keeps
    rms_norm off its fused kernel (PyTorch falls back to several elementwise kernels and warns)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation x * (1 + scale) + shift; shift and scale are (B, 1, C) per-image vectors."""
    return x * (1 + scale) + shift


# ---------------------------------------------------------------------------------------------
# time embedding


def timestep_features(t: Tensor, num_features: int = TIME_FEATURES) -> Tensor:
    """Sinusoidal features of t in [0, 1]: [cos(t w_k), sin(t w_k)], w_k = 10^(-k / (F/2)), k < F/2."""
    half = num_features // 2
    exponents = torch.arange(half, dtype=torch.float32, device=t.device) / half
    frequencies = torch.exp(-math.log(TIME_MAX_PERIOD) * exponents)  # (F/2,)
    angles = t.float()[:, None] * frequencies[None, :]  # (B, F/2)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # (B, F)


class TimestepEmbedder(nn.Module):
    """e_t = W_2 SiLU(W_1 features(t) + b_1) + b_2, a (B, C) vector."""

    def __init__(self, width: int, num_features: int = TIME_FEATURES):
        super().__init__()
        self.num_features = num_features
        self.fc1 = nn.Linear(num_features, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, t: Tensor) -> Tensor:
        features = timestep_features(t, self.num_features).to(self.fc1.weight.dtype)  # (B, F)
        return self.fc2(F.silu(self.fc1(features)))


# ---------------------------------------------------------------------------------------------
# 2-D rotary position embedding


def rope_2d_angles(grid_h: int, grid_w: int, head_dim: int, device=None) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotation angles of 2-D RoPE on a grid_h x grid_w token grid, each (L, D/2).

    The head is split into D/2 channel pairs (2q, 2q+1). Pair q rotates by pos_a * omega_j with
    j = q // 2, omega_j = theta^(-4j / D), and axis a = x for even q, y for odd q. Positions are
    pos_x = 16 * col / (grid_w - 1), pos_y = 16 * row / (grid_h - 1): the grid is stretched over the
    same extent at every resolution, so a token keeps its relative place when the image size changes.
    """
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head width divisible by 4, got {head_dim}")
    omega = ROPE_THETA ** (-torch.arange(0, head_dim, 4, device=device).float() / head_dim)  # (D/4,)
    pos_y = torch.linspace(0, ROPE_EXTENT, grid_h, device=device)
    pos_x = torch.linspace(0, ROPE_EXTENT, grid_w, device=device)
    pos_y, pos_x = torch.meshgrid(pos_y, pos_x, indexing="ij")
    angle_x = pos_x.reshape(-1, 1) * omega  # (L, D/4)
    angle_y = pos_y.reshape(-1, 1) * omega  # (L, D/4)
    angles = torch.stack([angle_x, angle_y], dim=-1).flatten(1)  # (L, D/2): x, y interleaved
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each channel pair (a, b) of x (B, h, L, D) by its angle: (a cos - b sin, a sin + b cos)."""
    a, b = x.unflatten(-1, (-1, 2)).unbind(-1)  # (B, h, L, D/2) each
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


# ---------------------------------------------------------------------------------------------
# trunk


class Attention(nn.Module):
    """Multi-head self-attention with RMS-normalised queries/keys and 2-D RoPE."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        head_dim = width // heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_norm = RMSNorm(head_dim, eps=NORM_EPS)
        self.k_norm = RMSNorm(head_dim, eps=NORM_EPS)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        batch, length, width = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, L, D) each
        q = apply_rope(self.q_norm(q), *rope)
        k = apply_rope(self.k_norm(k), *rope)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, L, D)
        return self.proj(out.transpose(1, 2).reshape(batch, length, width))


class SwiGLU(nn.Module):
    """FFN(x) = W_down (SiLU(W_gate x) * W_up x), no biases."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(width, hidden, bias=False)
        self.up = nn.Linear(width, hidden, bias=False)
        self.down = nn.Linear(hidden, width, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def swiglu_hidden(width: int, mlp_ratio: float) -> int:
    """Hidden width of a SwiGLU with the parameter count of a mlp_ratio * width GELU MLP."""
    return int(2 * int(width * mlp_ratio) / 3)


class TrunkBlock(nn.Module):
    """DiT block with adaLN-Zero, conditioning vector c (B, C):

        (beta_1, gamma_1, alpha_1, beta_2, gamma_2, alpha_2) = W_mod c + b_mod
        s <- s + alpha_1 * Attn(RMSNorm(s) * (1 + gamma_1) + beta_1)
        s <- s + alpha_2 * SwiGLU(RMSNorm(s) * (1 + gamma_2) + beta_2)
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.attn_norm = RMSNorm(width, eps=NORM_EPS)
        self.attn = Attention(width, heads)
        self.ffn_norm = RMSNorm(width, eps=NORM_EPS)
        self.ffn = SwiGLU(width, swiglu_hidden(width, mlp_ratio))
        self.modulation = nn.Linear(width, 6 * width)

    def forward(self, s: Tensor, c: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = self.modulation(c)[:, None].chunk(6, dim=-1)
        s = s + gate_a * self.attn(modulate(self.attn_norm(s), shift_a, scale_a), rope)
        return s + gate_f * self.ffn(modulate(self.ffn_norm(s), shift_f, scale_f))


# ---------------------------------------------------------------------------------------------
# neural field


def dct_features(side: int, num_freqs: int, device=None) -> Tensor:
    """DCT position features of the side x side query pixels of one patch, (side^2, F^2).

    Pixel (row, col) sits at (x, y) = (col, row) / (side - 1) in [0, 1]^2; feature (i, j) is
    cos(pi f_i x) cos(pi f_j y) / (1 + f_i f_j) with f evenly spaced in [0, F] (PixNerd's layout:
    i major, pixels row-major). The same [0, 1] square is sampled more finely when side grows, which
    is what lets the field be queried at a finer resolution than the one it was trained on.
    """
    coords = torch.linspace(0, 1, side, device=device)
    freqs = torch.linspace(0, num_freqs, num_freqs, device=device)
    pos_y, pos_x = torch.meshgrid(coords, coords, indexing="ij")
    cos_x = torch.cos(torch.pi * pos_x.reshape(-1, 1, 1) * freqs[None, :, None])  # (Q, F, 1)
    cos_y = torch.cos(torch.pi * pos_y.reshape(-1, 1, 1) * freqs[None, None, :])  # (Q, 1, F)
    damping = 1 / (1 + freqs[:, None] * freqs[None, :])  # (F, F)
    return (cos_x * cos_y * damping).flatten(1)  # (Q, F^2)


def normalize_columns(w: Tensor, eps: float = 1e-12) -> Tensor:
    """w / max(||w||_2, eps) over the input axis -2: every generated unit's weight vector has norm 1.

    The same as F.normalize(w, dim=-2), written out because on CPU its strided norm kernel makes the
    forward and backward several times slower, and the field blocks normalise a matrix per patch.
    """
    return w * w.square().sum(-2, keepdim=True).clamp_min(eps * eps).rsqrt()


class FieldBlock(nn.Module):
    """Residual MLP block whose weights are generated from the patch token s (M, C):

        [A, B] = W_gen s + b_gen,   A (c, r c),  B (r c, c),  columns L2-normalised
        h <- h + SiLU(RMSNorm(h) A_hat) B_hat
    """

    def __init__(self, token_width: int, field_width: int, mlp_ratio: int):
        super().__init__()
        self.field_width = field_width
        self.hidden = field_width * mlp_ratio
        self.weight_generator = nn.Linear(token_width, 2 * field_width * self.hidden)
        self.norm = RMSNorm(field_width, eps=NORM_EPS)

    def forward(self, h: Tensor, tokens: Tensor) -> Tensor:
        first, second = self.weight_generator(tokens).chunk(2, dim=-1)
        # normalising over the input axis bounds each generated unit's gain, whatever the token's scale
        first = normalize_columns(first.view(-1, self.field_width, self.hidden))  # (M, c, rc)
        second = normalize_columns(second.view(-1, self.hidden, self.field_width))  # (M, rc, c)
        return h + torch.bmm(F.silu(torch.bmm(self.norm(h), first)), second)  # (M, Q, c)
