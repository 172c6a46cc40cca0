"""Initialise a field transformer from a PixNerd checkpoint file (class-to-image, arXiv 2507.23268).

PixNerd's denoiser keeps the trunk blocks and the neural-field blocks in one list: `blocks.0` ..
`blocks.{depth-1}` are trunk blocks, `blocks.{depth}` .. are field blocks. KEY_TABLE maps every
PixNerd parameter name but the label table's to ours ({i}: trunk block, {j}: field block j = PixNerd block depth + j).

Shapes must match exactly, except where this project's network differs by design:
  - input channels: PixNerd embeds 3-channel x_t; ours embeds u = [x_t, I] (d + 3 channels) or d
    channels. PixNerd's 3 channels go to our first min(3, c_in) input channels, the rest is zero.
  - output channels: PixNerd predicts 3 channels, ours d (or N logits): first min(3, c_out) copied.
  - class labels: PixNerd conditions its trunk on c = SiLU(e_t + y_emb[label]) and keeps one row more
    than it has classes, y_emb[num_classes], for "no label". Segmentation has no class label: our
    null embedding y_0 (c = SiLU(e_t + y_0)) takes that last row, so the loaded trunk computes
    PixNerd's unconditional function.
Those parameters are reported as adapted. Anything else that disagrees is an error listing every
offending key with both shapes.

Only the tensors of one denoiser copy are read: a torch file is memory-mapped (a Lightning checkpoint
also holds the raw denoiser and the optimizer state, several times the EMA weights), a safetensors
file is read tensor by tensor.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from flowseg.models.field import FieldTransformerBase

PIXNERD_CHANNELS = 3

KEY_TABLE: tuple[tuple[str, str], ...] = (
    ("s_embedder.proj.weight", "stem.proj.weight"),
    ("s_embedder.proj.bias", "stem.proj.bias"),
    ("t_embedder.mlp.0.weight", "time_embed.fc1.weight"),
    ("t_embedder.mlp.0.bias", "time_embed.fc1.bias"),
    ("t_embedder.mlp.2.weight", "time_embed.fc2.weight"),
    ("t_embedder.mlp.2.bias", "time_embed.fc2.bias"),
    ("blocks.{i}.norm1.weight", "trunk.{i}.attn_norm.weight"),
    ("blocks.{i}.attn.qkv.weight", "trunk.{i}.attn.qkv.weight"),
    ("blocks.{i}.attn.q_norm.weight", "trunk.{i}.attn.q_norm.weight"),
    ("blocks.{i}.attn.k_norm.weight", "trunk.{i}.attn.k_norm.weight"),
    ("blocks.{i}.attn.proj.weight", "trunk.{i}.attn.proj.weight"),
    ("blocks.{i}.attn.proj.bias", "trunk.{i}.attn.proj.bias"),
    ("blocks.{i}.norm2.weight", "trunk.{i}.ffn_norm.weight"),
    ("blocks.{i}.mlp.w1.weight", "trunk.{i}.ffn.gate.weight"),
    ("blocks.{i}.mlp.w3.weight", "trunk.{i}.ffn.up.weight"),
    ("blocks.{i}.mlp.w2.weight", "trunk.{i}.ffn.down.weight"),
    ("blocks.{i}.adaLN_modulation.0.weight", "trunk.{i}.modulation.weight"),
    ("blocks.{i}.adaLN_modulation.0.bias", "trunk.{i}.modulation.bias"),
    ("blocks.{j}.param_generator1.0.weight", "field.blocks.{j}.weight_generator.weight"),
    ("blocks.{j}.param_generator1.0.bias", "field.blocks.{j}.weight_generator.bias"),
    ("blocks.{j}.norm.weight", "field.blocks.{j}.norm.weight"),
    ("x_embedder.embedder.0.weight", "field.embed.weight"),
    ("x_embedder.embedder.0.bias", "field.embed.bias"),
    ("final_layer.norm.weight", "field.norm.weight"),
    ("final_layer.linear.weight", "field.out.weight"),
    ("final_layer.linear.bias", "field.out.bias"),
)
# PixNerd's (num_classes + 1, C) class-label table: its last row, the null label's, is our y_0
LABEL_TABLE, NULL_EMBEDDING = "y_embedder.embedding_table.weight", "null_embedding"
# prefixes of the Lightning checkpoint's copies of the denoiser, preferred first
PREFIXES = ("ema_denoiser.", "denoiser.")


@dataclass
class LoadReport:
    prefix: str  # which copy of the denoiser was read ("ema_denoiser.", "denoiser." or "")
    loaded: list[str] = field(default_factory=list)  # our parameters copied unchanged
    adapted: list[str] = field(default_factory=list)  # "ours <- theirs: (checkpoint) -> (model)"
    missing: list[str] = field(default_factory=list)  # our parameters left at init (strict=False)
    unexpected: list[str] = field(default_factory=list)  # unknown checkpoint keys (strict=False)


def pixnerd_key_map(model: FieldTransformerBase) -> dict[str, str]:
    """PixNerd parameter name -> our parameter name, for this model's depths and the parameters it has
    (a conv-stem model has no counterpart of PixNerd's patch embedding, and PixNerd has no token head).
    The label table is not in it: the null embedding takes only its last row (see load_pixnerd_checkpoint)."""
    depth, field_depth = model.size.depth, model.size.field_depth
    mapping = {}
    for theirs, ours in KEY_TABLE:
        if "{i}" in theirs:
            mapping.update({theirs.format(i=i): ours.format(i=i) for i in range(depth)})
        elif "{j}" in theirs:
            mapping.update({theirs.format(j=depth + j): ours.format(j=j) for j in range(field_depth)})
        else:
            mapping[theirs] = ours
    present = model.state_dict().keys()
    return {theirs: ours for theirs, ours in mapping.items() if ours in present}


# ---------------------------------------------------------------------------------------------
# channel adaptation


@dataclass(frozen=True)
class ChannelLayout:
    """Where a parameter's channels sit: both tensors viewed so that channels are one axis."""

    pixnerd_shape: tuple[int, ...]  # the shape PixNerd gives this parameter for this model's sizes
    pixnerd_view: tuple[int, ...]
    model_view: tuple[int, ...]
    axis: int
    copies: tuple[tuple[slice, slice], ...]  # (PixNerd channels, our channels) pairs


def channel_layout(model: FieldTransformerBase, ours: str) -> ChannelLayout | None:
    """The layout of one of the parameters that touch the input or output channels, else None."""
    width, patch_pixels = model.size.width, model.size.patch_size**2
    field_width, dct = model.size.field_width, model.size.dct_freqs**2
    in_channels, out_channels = model.field.embed.in_features - dct, model.field.out.out_features
    shared_in = (slice(0, min(PIXNERD_CHANNELS, in_channels)),) * 2
    shared_out = (slice(0, min(PIXNERD_CHANNELS, out_channels)),) * 2
    if ours == "stem.proj.weight":  # patches are flattened channel-major: (C, channels, p^2)
        shape = (width, PIXNERD_CHANNELS * patch_pixels)
        view = (width, PIXNERD_CHANNELS, patch_pixels)
        return ChannelLayout(shape, view, (width, in_channels, patch_pixels), 1, (shared_in,))
    if ours == "field.embed.weight":  # columns: [pixel values | DCT features]
        shape = (field_width, PIXNERD_CHANNELS + dct)
        dct_columns = (slice(PIXNERD_CHANNELS, PIXNERD_CHANNELS + dct), slice(in_channels, in_channels + dct))
        return ChannelLayout(shape, shape, (field_width, in_channels + dct), 1, (shared_in, dct_columns))
    if ours == "field.out.weight":
        shape = (PIXNERD_CHANNELS, field_width)
        return ChannelLayout(shape, shape, (out_channels, field_width), 0, (shared_out,))
    if ours == "field.out.bias":
        return ChannelLayout((PIXNERD_CHANNELS,), (PIXNERD_CHANNELS,), (out_channels,), 0, (shared_out,))
    return None


def adapt_channels(theirs: Tensor, layout: ChannelLayout) -> Tensor:
    """Zeros in our layout, with PixNerd's channels copied to where ours sit."""
    source = theirs.reshape(layout.pixnerd_view)
    out = torch.zeros(layout.model_view, dtype=theirs.dtype, device=theirs.device)
    lead = (slice(None),) * layout.axis
    for pixnerd_channels, our_channels in layout.copies:
        out[lead + (our_channels,)] = source[lead + (pixnerd_channels,)]
    return out


# ---------------------------------------------------------------------------------------------
# loading


def denoiser_prefix(names: Iterable[str]) -> str:
    """The prefix of the EMA denoiser if a name has it, else of the denoiser, else "" (names as they are)."""
    names = list(names)
    for prefix in PREFIXES:
        if any(name.startswith(prefix) for name in names):
            return prefix
    return ""


def read_denoiser(path: str | os.PathLike) -> tuple[str, dict[str, Tensor]]:
    """The prefix of a checkpoint file's preferred denoiser copy (denoiser_prefix) and its tensors,
    named without it. The file: .safetensors, or a torch file (a Lightning checkpoint's "state_dict").
    Only that copy's tensors are read into memory (see the module docstring)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint file not found: {path!r}")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(path, framework="pt", device="cpu") as file:
                prefix = denoiser_prefix(file.keys())
                return prefix, {name[len(prefix) :]: file.get_tensor(name)
                                for name in file.keys() if name.startswith(prefix)}
        except (SafetensorError, OSError) as error:
            raise ValueError(f"cannot read {path!r} as a safetensors file: {error}") from error
    try:
        # weights_only: a checkpoint file must not be able to run code when it is read; mmap: a tensor's
        # bytes are read when it is used, so the other copy and the optimizer state are never read
        content = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        raise ValueError(f"cannot read {path!r} as a tensor-only torch checkpoint: {error}") from error
    if isinstance(content, dict) and isinstance(content.get("state_dict"), dict):
        content = content["state_dict"]
    if not isinstance(content, dict) or not all(isinstance(v, Tensor) for v in content.values()):
        raise ValueError(f"{path!r} holds no state dict (a mapping of names to tensors)")
    prefix = denoiser_prefix(content)
    return prefix, {name[len(prefix) :]: value for name, value in content.items() if name.startswith(prefix)}


def load_pixnerd_checkpoint(
    model: FieldTransformerBase, path: str | os.PathLike, strict: bool = True
) -> LoadReport:
    """Copy a PixNerd checkpoint's weights into model (see the module docstring for the rules).

    strict: missing and unexpected keys are errors; with strict=False they are reported and the
    missing parameters keep their initial values. Shape mismatches are always errors.
    """
    if not isinstance(model, FieldTransformerBase):
        raise TypeError(f"model must be a flowseg field transformer, got {type(model).__name__}")
    prefix, state = read_denoiser(path)
    report = LoadReport(prefix=prefix)
    mapping = pixnerd_key_map(model)
    ours = model.state_dict()
    updates, mismatched = {}, []
    for key, value in state.items():
        if key == LABEL_TABLE:  # (num_classes + 1, C): the null label's row is the last
            target = ours[NULL_EMBEDDING]
            if value.dim() == 2 and len(value) and value.shape[1:] == target.shape:
                updates[NULL_EMBEDDING] = value[-1]
                report.adapted.append(f"{NULL_EMBEDDING} <- {key}[{len(value) - 1}] (the null label): "
                                      f"{tuple(value.shape)} -> {tuple(target.shape)}")
            else:
                mismatched.append(f"  {key} -> {NULL_EMBEDDING}: checkpoint {tuple(value.shape)}, "
                                  f"model (num_classes + 1, {len(target)})")
            continue
        if key not in mapping:
            report.unexpected.append(key)
            continue
        name, target = mapping[key], ours[mapping[key]]
        layout = channel_layout(model, name)
        if value.shape == target.shape:
            updates[name] = value
            report.loaded.append(name)
        elif layout is not None and value.shape == layout.pixnerd_shape:
            updates[name] = adapt_channels(value, layout).reshape(target.shape)
            report.adapted.append(f"{name} <- {key}: {tuple(value.shape)} -> {tuple(target.shape)}")
        else:
            mismatched.append(f"  {key} -> {name}: checkpoint {tuple(value.shape)}, model {tuple(target.shape)}")
    if not updates and not mismatched:
        names = sorted(state)
        raise ValueError(f"{os.fspath(path)!r} holds no PixNerd weight: none of its {len(names)} tensor names "
                         f"(e.g. {names[:3]}) is a PixNerd parameter of {model.size.name} (e.g. "
                         f"{sorted(mapping)[:2]})")
    nonfinite = [name for name, value in updates.items() if not torch.isfinite(value).all()]
    if nonfinite:
        raise ValueError(f"{os.fspath(path)!r} holds NaN/inf values in {len(nonfinite)} weight(s), "
                         f"e.g. {nonfinite[:3]}")
    report.missing = sorted(set(ours) - set(updates))
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es):\n" + "\n".join(mismatched))
    if strict and report.missing:
        problems.append(f"{len(report.missing)} model parameter(s) missing from the checkpoint: {report.missing}")
    if strict and report.unexpected:
        problems.append(f"{len(report.unexpected)} unexpected checkpoint key(s): {report.unexpected}")
    if problems:
        raise ValueError(
            f"cannot load {os.fspath(path)!r} into {model.size.name} (prefix {prefix!r}):\n" + "\n".join(problems)
        )
    model.load_state_dict(updates, strict=False)
    return report
