"""Objects made from a Config: the network and its category encoding, the dataset splits, and a
trained model read back from a checkpoint folder (its saved config, weights and encoding).

    build_network(config, N)      -> (model, encoding mu_1..mu_N; None for the discriminative twin)
    load_split(config, split)     -> the dataset split the config names
    trained_encoding(info, cfg)   -> the encoding a checkpoint was trained with (its stored mu_k)
    load_trained(checkpoint)      -> TrainedModel: the network with its EMA (or raw) weights
    load_segmenter(checkpoint)    -> a Segmenter on eval.device, ready for eval and predict
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from flowseg.checkpoint import (
    ENCODING_FILE, CheckpointInfo, fit_state_dict, load_centroids, load_weights, read_checkpoint,
)
from flowseg.config import Config, config_from_yaml
from flowseg.data import GENERATED, SegmentationDataset, build_dataset
from flowseg.distributed import resolve_device
from flowseg.encoding import CategoryEncoding, build_encoding
from flowseg.inference import Segmenter
from flowseg.models import build_model

EVAL_DATA_SEED = 0  # generated validation/test splits are the same for every run, whatever train.seed
# weights that checkpoints of earlier versions lack and whose zero is what those versions computed: the
# trunk's null embedding y_0 (c = SiLU(e_t + y_0); before it, c = SiLU(e_t))
ZERO_WHEN_MISSING = ("null_embedding",)
# the objective's settings that say what a flow network outputs (v, x1_hat or class logits): fixed by its weights
OUTPUT_SETTINGS = ("kind", "parameterization")


def build_network(config: Config, num_classes: int) -> tuple[nn.Module, CategoryEncoding | None]:
    """The model a config describes, and its category encoding (None for the discriminative twin)."""
    token_classes = num_classes if config.model.token_head else None
    if config.model.kind == "discriminative":
        return build_model("discriminative", config.model.size, num_classes=num_classes,
                           token_classes=token_classes, stem=config.model.stem), None
    # random centroids mu_k are drawn from train.seed; a checkpoint stores the ones it was trained with
    encoding = build_encoding(config.model.encoding, num_classes, config.model.dim, seed=config.train.seed)
    # the categorical objective's network outputs N class logits instead of a d-channel v
    categorical = config.objective.kind == "categorical"
    model = build_model("flow", config.model.size, dim=encoding.dim,
                        image_conditioning=config.model.image_conditioning, token_classes=token_classes,
                        stem=config.model.stem, out_channels=num_classes if categorical else None)
    return model, encoding


def load_split(config: Config, split: str, training: bool = False) -> SegmentationDataset:
    """The dataset split a config names: augmented crops for training; for evaluation, generated data
    at data.image_size and on-disk images at their native resolution."""
    data = config.data
    generated = data.name in GENERATED
    dataset = build_dataset(
        data.name, split, root=data.root,
        image_size=data.image_size if training or generated else None,
        augment=data.augment if training else None,
        seed=config.train.seed if training else EVAL_DATA_SEED, **data.options)
    if len(dataset) == 0:
        where = f" under {data.root}" if data.root else ""
        raise ValueError(f"dataset {data.name!r} split {split!r}{where} is empty: no samples to "
                         f"{'train' if training else 'evaluate'} on")
    return dataset


@dataclass
class TrainedModel:
    model: nn.Module                     # on the CPU, in eval mode
    encoding: CategoryEncoding | None    # None for the discriminative twin
    config: Config                       # the checkpoint's config with the overrides applied
    info: CheckpointInfo                 # step, class names, palette


def trained_encoding(info: CheckpointInfo, saved: Config) -> CategoryEncoding | None:
    """The encoding checkpoint `info` was trained with, `saved` its own config: the centroids mu_k it
    stores, never re-derived (a random code depends on the seed). None for the twin."""
    if saved.model.kind == "discriminative":
        return None
    derived = build_encoding(saved.model.encoding, info.num_classes, saved.model.dim, seed=saved.train.seed)
    stored = load_centroids(info.path)
    if stored is None:
        raise ValueError(f"checkpoint {info.path} of a flow model holds no {ENCODING_FILE} (its centroids mu_k)")
    if stored.shape != derived.centroids.shape:
        raise ValueError(f"the encoding {info.path / ENCODING_FILE} holds centroids of shape {tuple(stored.shape)}, "
                         f"but the checkpoint's {info.num_classes} classes in model.dim "
                         f"{derived.dim} need {tuple(derived.centroids.shape)}")
    return CategoryEncoding(saved.model.encoding, stored)


def with_earlier_defaults(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """`state` with the ZERO_WHEN_MISSING weights it lacks set to zero, so a checkpoint of an earlier
    version loads with the function it was trained as."""
    expected = model.state_dict()
    zeros = {key: torch.zeros_like(expected[key]) for key in ZERO_WHEN_MISSING if key in expected and key not in state}
    return {**zeros, **state}


def load_trained(checkpoint: str | Path, overrides: Sequence[str] = ()) -> TrainedModel:
    """The network of a checkpoint (a checkpoint folder, or a run folder: its newest checkpoint) with
    the EMA weights, or the raw ones when eval.use_ema is false, and the encoding it was trained with;
    `overrides` adjust the saved config (eval.*, data.*, ...) but not model.*, which the weights fix, nor
    objective.kind and objective.parameterization, which say what the network's output is."""
    info = read_checkpoint(checkpoint)
    origin = f"config of checkpoint {info.path}"
    saved = config_from_yaml(info.config_yaml, origin=origin)
    config = config_from_yaml(info.config_yaml, overrides, origin=origin)
    # messages name the saved model, not the overridden one: that is what the weights were made for
    source = (f"checkpoint {info.path} (model.kind={saved.model.kind}, model.size={saved.model.size}, "
              f"{info.num_classes} classes)")
    fixed = [*((f"model.{key}", value, getattr(config.model, key)) for key, value in vars(saved.model).items()),
             *((f"objective.{key}", getattr(saved.objective, key), getattr(config.objective, key))
               for key in OUTPUT_SETTINGS)]
    changed = [f"{key}: {before!r} -> {now!r}" for key, before, now in fixed if before != now]
    if changed:
        fixed_objective = " and ".join(f"objective.{key}" for key in OUTPUT_SETTINGS)
        raise ValueError(f"{source} does not fit this model ({'; '.join(changed)}): the model.* settings of a "
                         f"trained network cannot be overridden, nor {fixed_objective}")
    model, _ = build_network(saved, info.num_classes)
    weights = load_weights(info.path, "ema" if config.eval.use_ema else "model")
    fit_state_dict(model, with_earlier_defaults(model, weights), source)
    return TrainedModel(model.eval(), trained_encoding(info, saved), config, info)


def load_segmenter(checkpoint: str | Path, overrides: Sequence[str] = ()) -> tuple[Segmenter, CheckpointInfo]:
    """A Segmenter of a checkpoint on eval.device (load_trained), and the checkpoint's info."""
    trained = load_trained(checkpoint, overrides)
    device = resolve_device(trained.config.eval.device)
    return Segmenter(trained.model, trained.encoding, trained.config, device), trained.info
