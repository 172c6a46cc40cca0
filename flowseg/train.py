"""Training: flow matching (vanilla, reshaped or categorical) or the discriminative twin, on one process or many.

One optimizer step s:
    lr_s   = lr * min(1, (s + 1) / warmup) * [r + (1 - r) (1 + cos(pi * progress)) / 2]     (cosine)
    loss   = mean over the W * A micro-batches of the objective (W ranks x A accumulation steps),
             plus objective.token_loss_weight x the token loss when the model has a token head,
             plus repa.weight x the REPA alignment loss when repa.teacher is set (flowseg/repa.py)
    theta <- AdamW(theta, clip(grad loss)),  theta_ema <- beta theta_ema + (1 - beta) theta
progress = max(s / train.steps, elapsed / train.minutes) in [0, 1], so the schedule ends with
whichever budget ends first; r = COSINE_FLOOR. The model learns from the split "train" and is
validated on "val".

The step waits for the device once, to check that the gradient is finite; the loss and its metrics
stay on the device until a log step reads them.

Determinism. Every random choice of a step is keyed by the sample's place in one global stream, not
by the process that draws it: the data order is a permutation per epoch drawn from (seed, epoch),
augmentation of the sample at stream position q is seeded from (seed, q), and the flow times t of
micro-batch m of step s come from a generator seeded with (seed, s, m). Rank r owns micro-batches
m = r A, ..., r A + A - 1. So W ranks with A micro-batches each compute the same step as one process
with W * A micro-batches, and a run resumed at a checkpoint continues exactly as if uninterrupted.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from itertools import count
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from flowseg.build import build_network, load_split, trained_encoding
from flowseg.checkpoint import (
    CHECKPOINTS_DIR, CONFIG_FILE, describe_nonfinite, ensure_writable_dir, fit_state_dict, latest_checkpoint,
    load_train_state, load_weights, nonfinite_counts, prune_checkpoints, read_checkpoint, remove_leftovers,
    save_checkpoint, step_dir_name, write_atomically,
)
from flowseg.config import Config, OptimConfig, config_from_yaml, to_yaml
from flowseg.data import SegmentationDataset
from flowseg.distributed import DistContext, autocast, broadcast_float, cleanup, setup
from flowseg.encoding import CategoryEncoding
from flowseg.evaluate import evaluate_dataset, metrics_record
from flowseg.inference import Segmenter
from flowseg.losses import LossOutput, discriminative_loss, token_classification_loss
from flowseg.metrics import SegmentationMetrics
from flowseg.models.pixnerd import load_pixnerd_checkpoint
from flowseg.objective import FlowMatchingObjective
from flowseg.repa import build_alignment
from flowseg.runlock import RunLock

log = logging.getLogger("flowseg.train")

TRAIN_SPLIT, VAL_SPLIT = "train", "val"
COSINE_FLOOR = 0.05        # the cosine schedule ends at this fraction of optim.lr
ADAM_BETAS = (0.9, 0.99)   # AdamW's decay rates of its gradient moments
# The settings a resumed run may change: where it runs, how fast, and how often it reports and saves;
# never what a step computes or what a logged figure means. (train.steps and train.minutes may grow.)
# train.out_dir: the run folder may have been moved; eval.device: only eval and predict read it.
RESUME_MAY_CHANGE = frozenset({
    "train.out_dir", "train.device", "train.threads", "data.num_workers", "eval.device",
    "train.progress", "train.log_every", "train.tensorboard", "train.val_every", "train.ckpt_every",
    "train.keep_checkpoints", "train.compile",
})


class TrainingDiverged(RuntimeError):
    """The loss, the gradient or the weights became NaN/inf; nothing was saved after the last good
    checkpoint (every checkpoint is finite: save_checkpoint refuses NaN/inf)."""

    def __init__(self, step: int, last_checkpoint: Path | None,
                 cause: str = "the network output, loss or gradient became NaN/inf"):
        self.step, self.last_checkpoint = step, last_checkpoint
        kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else \
            "no checkpoint had been written yet"
        super().__init__(f"training diverged at step {step}: {cause}; stopped without saving, {kept} (try a "
                         "lower optim.lr or a longer optim.warmup_steps)")


# what --resume reads from a checkpoint's train_state.pt, and the type of each
TRAIN_STATE = {"step": int, "elapsed": float, "ema_updates": int, "optimizer": dict, "torch_rng": torch.Tensor,
               "world_size": int}
REPA_STATE = "repa_projector"  # with REPA on, the projector's weights too (a dict); unused at inference


@dataclass
class TrainResult:
    run_dir: Path
    step: int                          # optimizer steps done
    checkpoint: Path                   # the final checkpoint
    elapsed_seconds: float             # training time, resumed sessions included
    stopped_by: str                    # "steps" or "time"
    validation: SegmentationMetrics | None


def learning_rate(optim: OptimConfig, step: int, progress: float) -> float:
    """lr_s = lr * warm-up factor * schedule factor (module docstring); step counts from 0."""
    warmup = min(1.0, (step + 1) / optim.warmup_steps) if optim.warmup_steps else 1.0
    if optim.schedule == "constant":
        return optim.lr * warmup
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return optim.lr * warmup * (COSINE_FLOOR + (1 - COSINE_FLOOR) * cosine)


class ExponentialMovingAverage:
    """theta_ema <- beta theta_ema + (1 - beta) theta with beta = min(decay, (1 + n) / (10 + n)) at the
    n-th update: the short warm-up keeps early, random weights from dominating a short run's average."""

    def __init__(self, model: nn.Module, decay: float):
        self.model = copy.deepcopy(model).requires_grad_(False).eval()
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        beta = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for averaged, current in zip(self.model.parameters(), model.parameters()):
            averaged.lerp_(current.detach(), 1.0 - beta)
        for averaged, current in zip(self.model.buffers(), model.buffers()):
            averaged.copy_(current)
        self.updates += 1


# what a derived seed is for, so that seeds drawn for different purposes never coincide
_ORDER, _AUGMENT, _TIMES, _RANK = range(4)


def mix_seed(*keys: int) -> int:
    """A 63-bit seed that depends on every key (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] >> np.uint64(1))


class StepBatches(Sampler):
    """This rank's micro-batches of (dataset index, stream position), step after step, endlessly.

    Step s covers stream positions [s B, (s + 1) B); micro-batch m of its W * A holds positions
    s B + m b ... s B + (m + 1) b - 1, b = B / (W A). Position q is sample perm_e[q mod n] of epoch
    e = q div n, perm_e a permutation of the n samples drawn from (seed, e).
    """

    def __init__(self, length: int, batch_size: int, world_size: int, rank: int, grad_accum: int,
                 seed: int, start_step: int = 0):
        if batch_size % (world_size * grad_accum):
            raise ValueError(f"train.batch_size ({batch_size}) must be divisible by the number of ranks "
                             f"({world_size}) times train.grad_accum ({grad_accum})")
        self.length, self.batch_size, self.seed = length, batch_size, seed
        self.micro = batch_size // (world_size * grad_accum)
        self.first_micro, self.grad_accum, self.start_step = rank * grad_accum, grad_accum, start_step
        self._epoch, self._permutation = -1, None

    def _index(self, position: int) -> int:
        epoch = position // self.length
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(mix_seed(self.seed, _ORDER, epoch))
            self._epoch, self._permutation = epoch, torch.randperm(self.length, generator=generator).tolist()
        return self._permutation[position % self.length]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in count(self.start_step):
            for micro in range(self.first_micro, self.first_micro + self.grad_accum):
                first = step * self.batch_size + micro * self.micro
                yield [(self._index(q), q) for q in range(first, first + self.micro)]


class KeyedSamples(Dataset):
    """dataset[index] drawn with torch's RNG seeded from (seed, stream position), so random
    augmentation depends only on the sample's place in the stream (not on rank, worker or resume)."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __getitem__(self, item: tuple[int, int]) -> dict:
        index, position = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(self.seed, _AUGMENT, position))
            return self.dataset[index]


def _param_groups(parameters: list[nn.Parameter], weight_decay: float) -> list[dict]:
    # weight decay on matrices only: decaying norm gains and biases towards 0 only hurts
    matrices = [p for p in parameters if p.requires_grad and p.dim() >= 2]
    vectors = [p for p in parameters if p.requires_grad and p.dim() < 2]
    return [{"params": matrices, "weight_decay": weight_decay}, {"params": vectors, "weight_decay": 0.0}]


def _record_step(line: str) -> float:
    """The step of a metrics.jsonl line; inf for a line cut short by a kill (dropped with the later steps)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


class MetricsLog:
    """metrics.jsonl (one JSON object per event), optional TensorBoard, on rank 0 only.

    A run that starts at step s (0, or the checkpoint it resumes) first drops the records of later
    steps, which a killed run wrote after its last checkpoint: the log then reads as one run.
    """

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, start_step: int):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.writer = None
        if enabled and self.path.exists():
            write_atomically(self.path, "".join(line for line in self.path.read_text().splitlines(keepends=True)
                                                if _record_step(line) <= start_step))
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                # TensorBoard hides the events of steps >= purge_step that earlier sessions wrote
                self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)
            except ImportError:
                log.info("tensorboard is not installed: logging to metrics.jsonl only")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("kind", "step") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class _ConsoleHandler(logging.StreamHandler):
    """Console lines through tqdm.write, so they print above a progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # logging's own convention: a failing handler must not stop the program
            self.handleError(record)


def _configure_logging(run_dir: Path, is_main: bool) -> None:
    log.setLevel(logging.DEBUG if is_main else logging.WARNING)
    log.propagate = False
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    if not is_main:
        return
    file_handler = logging.FileHandler(run_dir / "train.log")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    stream_handler = _ConsoleHandler()
    stream_handler.setLevel(logging.INFO)  # per-step lines (DEBUG) go to the file only
    stream_handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(file_handler)
    log.addHandler(stream_handler)


class _Unset:
    def __repr__(self) -> str:
        return "unset"


_UNSET = _Unset()  # a key one of two configs lacks (in data.options, or data.augment set against null)


def config_changes(saved: Config, now: Config) -> list[tuple[str, object, object]]:
    """(dotted key, saved value, current value) of every setting that differs; nested mappings
    (data.augment, data.options) are compared key by key."""
    def walk(before: dict, after: dict, prefix: str) -> Iterator[tuple[str, object, object]]:
        for key in [*before, *(key for key in after if key not in before)]:
            old, new = before.get(key, _UNSET), after.get(key, _UNSET)
            if isinstance(old, dict) and isinstance(new, dict):
                yield from walk(old, new, f"{prefix}{key}.")
            elif old != new:
                yield f"{prefix}{key}", old, new

    return list(walk(asdict(saved), asdict(now), ""))


def _budget_grows(key: str, before: object, now: object) -> bool:
    """True where a resumed run extends its budget: more train.steps, or more train.minutes (None: no limit)."""
    if key == "train.steps":
        return now > before
    if key == "train.minutes":
        return now is None or (before is not None and now > before)
    return False


class Trainer:
    """Holds one run's state; `run()` trains to the step/time budget and returns a TrainResult."""

    def __init__(self, config: Config, context: DistContext, resume: bool,
                 network: tuple[nn.Module, CategoryEncoding | None] | None,
                 datasets: tuple[SegmentationDataset, SegmentationDataset] | None):
        self.config, self.context = config, context
        self.device = context.device
        if config.train.threads:
            torch.set_num_threads(config.train.threads)
        self.run_dir = Path(config.train.out_dir)
        existing = latest_checkpoint(self.run_dir)
        if existing is not None and not resume:
            raise ValueError(f"{self.run_dir} already holds checkpoints (newest: {existing.name}); pass "
                             "--resume to continue that run, or set train.out_dir to a new folder")
        if existing is None and resume:
            raise ValueError(f"nothing to resume in {self.run_dir}: it holds no checkpoint (a run stopped before "
                             "its first one leaves none); leave out --resume to start a new run there")
        saved = self._check_resumable(existing) if existing is not None else None
        _configure_logging(self.run_dir, context.is_main)
        if context.is_main:  # saves and deletions a killed run left unfinished
            for leftover in remove_leftovers(self.run_dir):
                log.info("removed %s, left by an interrupted run", leftover)

        self.train_set, self.val_set = datasets or (load_split(config, TRAIN_SPLIT, training=True),
                                                    load_split(config, VAL_SPLIT))
        self.num_classes = self.train_set.num_classes
        if self.val_set.num_classes != self.num_classes:
            raise ValueError(f"training split has {self.num_classes} classes but validation split has "
                             f"{self.val_set.num_classes}")

        torch.manual_seed(config.train.seed)  # identical initial weights on every rank
        model, self.encoding = network or build_network(config, self.num_classes)
        # a resumed run's weights come from its checkpoint: the pretrained file is not read (nor needed)
        if config.model.pretrained and existing is None:
            log.info("%s", load_pixnerd_checkpoint(model, config.model.pretrained, strict=False))
        self.model = model.to(self.device)
        self.ema = ExponentialMovingAverage(self.model, config.optim.ema_decay)
        # built after the model, so that a seed gives the same initial network with or without REPA
        self.repa = build_alignment(config.repa, self.model.size.width, self.model.size.depth)
        self.trained = list(self.model.parameters())  # what the optimizer updates and the gradient clip sees
        if self.repa is not None:
            self.repa.to(self.device)
            self.trained += list(self.repa.projector.parameters())
            log.info("REPA: the tokens of trunk block %d aligned to %s, weight %g", self.repa.block,
                     config.repa.teacher, self.repa.weight)
        # fused: one kernel for all parameters instead of a loop of small ones per parameter
        self.optimizer = torch.optim.AdamW(
            _param_groups(self.trained, config.optim.weight_decay), lr=config.optim.lr, betas=ADAM_BETAS, fused=True)
        self.step, self.elapsed_before = 0, 0.0
        self.finite_at = -1  # the step whose weights _check_finite last found finite
        self.last_checkpoint = existing
        if existing is not None:
            self._resume_from(existing, saved)
        self.objective = FlowMatchingObjective(self.encoding.to(self.device), config.objective) \
            if self.encoding else None
        torch.manual_seed(mix_seed(config.train.seed, _RANK, context.rank, self.step))  # per-rank global RNG
        if context.is_main:
            write_atomically(self.run_dir / "config.yaml", to_yaml(config))
        self.network = DistributedDataParallel(
            self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
        ) if context.is_distributed else self.model
        if config.train.compile:
            self.network = torch.compile(self.network)
        self.metrics = MetricsLog(self.run_dir, context.is_main, config.train.tensorboard, self.step)

    def _check_resumable(self, checkpoint: Path) -> Config:
        """The config `checkpoint` was saved with, if this run's config differs from it only where
        RESUME_MAY_CHANGE allows and by budgets that grow; else a ValueError listing every difference."""
        saved = config_from_yaml(read_checkpoint(checkpoint).config_yaml, origin=f"config of checkpoint {checkpoint}")
        changes = [f"{key}: {before!r} -> {now!r}" for key, before, now in config_changes(saved, self.config)
                   if key not in RESUME_MAY_CHANGE and not _budget_grows(key, before, now)]
        if changes:
            raise ValueError(f"cannot resume {self.run_dir}: its checkpoint {checkpoint.name} was trained with "
                             f"other settings ({'; '.join(changes)}); resume with the saved ones "
                             f"({checkpoint / CONFIG_FILE}) or set train.out_dir to a new folder (a resumed run may "
                             "only grow train.steps or train.minutes, and change "
                             f"{', '.join(sorted(RESUME_MAY_CHANGE))})")
        return saved

    def _resume_from(self, checkpoint: Path, saved: Config) -> None:
        info = read_checkpoint(checkpoint)
        if info.num_classes != self.num_classes:
            raise ValueError(f"cannot resume {checkpoint}: it has {info.num_classes} classes, the dataset "
                             f"{self.config.data.name!r} has {self.train_set.describe_classes()}")
        fit_state_dict(self.model, load_weights(checkpoint, "model"), f"checkpoint {checkpoint}")
        fit_state_dict(self.ema.model, load_weights(checkpoint, "ema"), f"checkpoint {checkpoint}")
        if self.encoding is not None:
            self.encoding = trained_encoding(info, saved)
        state = load_train_state(checkpoint, {**TRAIN_STATE, **({REPA_STATE: dict} if self.repa else {})})
        if self.repa is not None:
            self.repa.projector.load_state_dict(state[REPA_STATE])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.elapsed_before, self.ema.updates = state["step"], state["elapsed"], state["ema_updates"]
        if self.context.is_main:
            torch.set_rng_state(state["torch_rng"])
        log.info("resumed %s at step %d", checkpoint, self.step)

    # ---- one step -----------------------------------------------------------------------------

    def _micro_loss(self, batch: dict, progress: float, generator: torch.Generator) -> LossOutput:
        """The loss of one micro-batch: the network's one forward pass, scored by the objective (the
        discriminative loss for the twin), with a token head by the token loss, and with REPA by the
        alignment of a trunk block's tokens to the teacher's features."""
        image = batch["image"].to(self.device, non_blocking=True)
        labels = batch["label"].to(self.device, non_blocking=True)
        path = None if self.objective is None else self.objective.sample_path(image, labels, generator)
        expose = {} if self.repa is None else {"expose_block": self.repa.block}
        # only the network runs under autocast: the correction's distance expansion needs float32
        with autocast(self.device, self.config.train.precision):
            output = self.network(image, **expose) if path is None else self.network(path.x_t, path.t, image, **expose)
        out = output.out.float()
        main = discriminative_loss(out, labels) if path is None else self.objective.loss(out, path, progress)
        loss, metrics = main.loss, dict(main.metrics)
        patch = self.model.size.patch_size
        if output.token_logits is not None:
            token = token_classification_loss(output.token_logits.float(), labels, patch)
            loss = loss + self.config.objective.token_loss_weight * token.loss
            metrics.update(token.metrics)
        if self.repa is not None:
            with autocast(self.device, self.config.train.precision):
                repa = self.repa.loss(output.block_tokens, image, (image.shape[-2] // patch, image.shape[-1] // patch))
            loss = loss + repa.loss
            metrics.update(repa.metrics)
        return LossOutput(loss, metrics)

    def train_step(self, batches: Iterator[dict], progress: float) -> dict[str, torch.Tensor | float]:
        """One optimizer step; returns its loss and metrics (means over the micro-batches) as tensors."""
        config, accum = self.config, self.config.train.grad_accum
        lr = learning_rate(config.optim, self.step, progress)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        figures: dict[str, torch.Tensor] = {}
        for micro in range(accum):
            global_micro = self.context.rank * accum + micro
            seed = mix_seed(config.train.seed, _TIMES, self.step, global_micro)
            generator = torch.Generator(self.device).manual_seed(seed)
            last = micro == accum - 1
            with nullcontext() if last or not self.context.is_distributed else self.network.no_sync():
                outputs = self._micro_loss(next(batches), progress, generator)
                (outputs.loss / accum).backward()
            for name, value in {"loss": outputs.loss.detach(), **outputs.metrics}.items():
                figures[name] = figures[name] + value / accum if name in figures else value / accum
        if self.repa is not None and dist.is_initialized():
            # DDP averages the network's gradients over the ranks; the projector's are averaged here
            for parameter in self.repa.projector.parameters():
                dist.all_reduce(parameter.grad)
                parameter.grad /= self.context.world_size
        max_norm = config.optim.grad_clip if config.optim.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trained, max_norm)
        # the step's one check: NaN/inf in any output or loss reaches the gradient, and the gradient is
        # averaged over the ranks, so every rank stops at the same step
        if not torch.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(self.step + 1, self.last_checkpoint)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.model)
        self.step += 1
        return {**figures, "grad_norm": grad_norm, "lr": lr}

    def _log_step(self, figures: dict[str, torch.Tensor | float], elapsed: float, bar: tqdm | None) -> None:
        """Write a step's figures: the loss averaged over the ranks, the rest as this rank saw them."""
        loss = figures.pop("loss")
        if dist.is_initialized():
            dist.all_reduce(loss)
            loss = loss / self.context.world_size
        record = {"kind": "train", "step": self.step, "loss": float(loss), "elapsed": elapsed,
                  **{name: float(value) for name, value in figures.items()}}
        self.metrics.write(record)
        log.debug("%s", record)
        if bar is not None:
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")

    # ---- validation and checkpoints -----------------------------------------------------------

    def _check_finite(self) -> None:
        """Raise TrainingDiverged if a raw or EMA weight is NaN/inf (an update can overflow the weights
        while the gradient was still finite). Every rank checks: their weights are the same. Weights
        change only in a training step, so a validation and a save at the same step check once."""
        if self.finite_at == self.step:
            return
        counts = {name: nonfinite_counts(module.state_dict()) for name, module in
                  (("model", self.model), ("EMA", self.ema.model))}
        if any(counts.values()):
            found = "; ".join(f"{name}: {describe_nonfinite(bad)}" for name, bad in counts.items() if bad)
            raise TrainingDiverged(self.step, self.last_checkpoint, f"the weights became NaN/inf ({found})")
        self.finite_at = self.step

    def validate(self) -> SegmentationMetrics:
        self._check_finite()
        segmenter = Segmenter(self.ema.model, self.encoding, self.config, self.device)
        result = evaluate_dataset(segmenter, self.val_set, self.num_classes, [self.config.eval.steps],
                                  self.config.train.val_samples, self.context)[0]
        metrics = result.metrics
        self.metrics.write({"kind": "val", "step": self.step, **metrics_record(metrics)})
        log.info("step %d: validation mIoU %.4f, pixel accuracy %.4f", self.step, metrics.miou,
                 metrics.pixel_accuracy)
        return metrics

    def save(self, elapsed: float) -> Path:
        self._check_finite()
        if self.context.is_main:
            train_state = {"step": self.step, "elapsed": elapsed, "ema_updates": self.ema.updates,
                           "optimizer": self.optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                           "world_size": self.context.world_size}
            if self.repa is not None:
                train_state[REPA_STATE] = self.repa.projector.state_dict()
            path = save_checkpoint(self.run_dir, self.step, self.model.state_dict(), self.ema.model.state_dict(),
                                   train_state, to_yaml(self.config), self.train_set.class_names,
                                   self.train_set.palette, None if self.encoding is None else self.encoding.centroids)
            prune_checkpoints(self.run_dir, self.config.train.keep_checkpoints)
            log.info("step %d: saved %s", self.step, path)
        if dist.is_initialized():
            dist.barrier()
        self.last_checkpoint = self.run_dir / CHECKPOINTS_DIR / step_dir_name(self.step)
        return self.last_checkpoint

    # ---- the loop -----------------------------------------------------------------------------

    def _batches(self) -> Iterator[dict]:
        config, context = self.config, self.context
        sampler = StepBatches(len(self.train_set), config.train.batch_size, context.world_size, context.rank,
                              config.train.grad_accum, config.train.seed, self.step)
        loader = DataLoader(KeyedSamples(self.train_set, config.train.seed), batch_sampler=sampler,
                            num_workers=config.data.num_workers, pin_memory=self.device.type == "cuda")
        return iter(loader)

    def run(self) -> TrainResult:
        config = self.config.train
        budget = config.minutes * 60 if config.minutes else math.inf
        started = time.monotonic() - self.elapsed_before
        batches = self._batches()
        group = f" ({dist.get_backend()} process group, DDP)" if self.context.is_distributed else ""
        log.info("training %s (%d classes) on %s x %d rank(s)%s from step %d to %d%s; run folder %s",
                 self.config.model.size, self.num_classes, self.device.type, self.context.world_size, group,
                 self.step, config.steps, f" or {config.minutes:g} min" if config.minutes else "", self.run_dir)
        bar = tqdm(total=config.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True) \
            if self.context.is_main and config.progress else None
        # a resumed run already holds the checkpoint of the step it starts at (a finished run: its final one)
        saved_at = self.step if self.last_checkpoint is not None else -1
        validation, validated_at = None, -1
        with bar or nullcontext():
            while True:
                # rank 0's clock decides, so a time budget stops every rank at the same step
                elapsed = broadcast_float(time.monotonic() - started, self.device)
                if self.step >= config.steps or elapsed >= budget:
                    break
                progress = min(1.0, max(self.step / config.steps, elapsed / budget))
                figures = self.train_step(batches, progress)
                if self.step % config.log_every == 0 or self.step == config.steps:
                    self._log_step(figures, elapsed, bar)
                if bar is not None:
                    bar.update(1)
                if config.val_every and self.step % config.val_every == 0:
                    validation, validated_at = self.validate(), self.step
                if config.ckpt_every and self.step % config.ckpt_every == 0:
                    self.save(time.monotonic() - started)
                    saved_at = self.step
        elapsed = time.monotonic() - started
        if validated_at != self.step:
            validation = self.validate()
        checkpoint = self.last_checkpoint if saved_at == self.step else self.save(elapsed)
        self.metrics.close()
        stopped_by = "steps" if self.step >= config.steps else "time"
        log.info("stopped by the %s budget at step %d after %.1f s", stopped_by, self.step, elapsed)
        return TrainResult(self.run_dir, self.step, checkpoint, elapsed, stopped_by, validation)


def train(config: Config, resume: bool = False, context: DistContext | None = None,
          network: tuple[nn.Module, CategoryEncoding | None] | None = None,
          datasets: tuple[SegmentationDataset, SegmentationDataset] | None = None) -> TrainResult:
    """Train as `config` says, in the process group torchrun set up (or one process).

    Rank 0 holds train.out_dir's lock for the whole run (flowseg.runlock): a second run into the folder
    is refused. resume=True continues the folder's newest checkpoint, whose config this one must match
    but for RESUME_MAY_CHANGE and larger budgets. network / datasets replace the ones the config
    describes (model + encoding; train and val split).
    """
    owns_group = context is None
    context = context or setup(config.train.device)
    try:
        run_dir = Path(config.train.out_dir)
        if resume and not run_dir.is_dir():
            raise ValueError(f"nothing to resume: run folder {run_dir} does not exist; leave out --resume to "
                             "start a new run there")
        ensure_writable_dir(run_dir)
        # one writer per run folder: rank 0 writes for every rank, so only rank 0 takes the lock
        lock = RunLock(run_dir) if context.is_main else None
        with lock or nullcontext():
            trainer = Trainer(config, context, resume, network, datasets)
            if lock is not None and lock.stale is not None:
                log.warning("the previous holder of %s (%s) ended without releasing it: taken over",
                            lock.path, lock.stale)
            return trainer.run()
    finally:
        if owns_group:
            cleanup()
