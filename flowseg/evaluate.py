"""Benchmark evaluation: one confusion matrix per sampler step count over a whole split.

Each rank segments its shard of the split (indices rank, rank + W, ...), the matrices are summed
across ranks, and mIoU = mean_k TP_k / (TP_k + FP_k + FN_k) over classes present in prediction or
ground truth (flowseg.metrics). Predictions are made at each image's own resolution (see
flowseg.inference for the inference modes), so the metric is computed against the original labels.
A sweep over step counts segments every batch once per count, reading the data only once.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from flowseg.build import load_segmenter, load_split
from flowseg.checkpoint import CHECKPOINTS_DIR, ensure_writable_dir, write_atomically
from flowseg.config import to_yaml
from flowseg.distributed import DistContext, shard_indices
from flowseg.inference import Segmenter
from flowseg.metrics import ConfusionMatrix, SegmentationMetrics

EVAL_DIR = "eval"  # RUN/eval/ holds the results of `flowseg eval` by default


@dataclass
class EvalResult:
    steps: int | None              # sampler steps; None for the discriminative twin
    metrics: SegmentationMetrics
    seconds_per_image: float       # this rank's segmentation time for this step count


def _same_size_groups(samples: list[dict]) -> list[list[dict]]:
    groups: dict[tuple[int, int], list[dict]] = {}
    for sample in samples:
        groups.setdefault(tuple(sample["label"].shape), []).append(sample)
    return list(groups.values())


@torch.no_grad()
def evaluate_dataset(segmenter: Segmenter, dataset: Dataset, num_classes: int,
                     step_counts: Sequence[int] | None = None, max_samples: int | None = None,
                     context: DistContext | None = None, progress: bool = False) -> list[EvalResult]:
    """Metrics of `segmenter` on `dataset`, one EvalResult per step count (one for the twin)."""
    counts: list[int | None] = list(step_counts or [segmenter.config.eval.steps]) if segmenter.is_flow else [None]
    total = len(dataset) if max_samples is None else min(max_samples, len(dataset))
    rank, world = (context.rank, context.world_size) if context else (0, 1)
    indices = shard_indices(total, rank, world)
    matrices = [ConfusionMatrix(num_classes, device=segmenter.device) for _ in counts]
    seconds = [0.0 for _ in counts]
    batch_size = segmenter.config.eval.batch_size
    starts = range(0, len(indices), batch_size)
    for start in tqdm(starts, desc="evaluate", unit="batch", leave=False) if progress else starts:
        samples = [dataset[i] for i in indices[start:start + batch_size]]
        for group in _same_size_groups(samples):
            image = torch.stack([s["image"] for s in group]).to(segmenter.device)
            label = torch.stack([s["label"] for s in group]).to(segmenter.device)
            for position, (matrix, steps) in enumerate(zip(matrices, counts)):
                began = time.perf_counter()
                prediction = segmenter.predict(image, steps)
                seconds[position] += time.perf_counter() - began
                matrix.update(prediction.labels, label)
    for matrix in matrices:
        matrix.all_reduce()
    per_image = [s / max(1, len(indices)) for s in seconds]
    return [EvalResult(steps, matrix.compute(), spent) for steps, matrix, spent in zip(counts, matrices, per_image)]


def format_table(results: Sequence[EvalResult], class_names: Sequence[str], title: str) -> str:
    """A plain-text summary: one row per step count, then per-class IoU of the best step count."""
    def pct(value: float) -> str:
        return "   n/a" if math.isnan(value) else f"{100 * value:6.2f}"

    lines = [title, "", f"{'steps':>6} {'mIoU':>6} {'pixAcc':>6} {'mAcc':>6} {'s/img':>7}"]
    for r in results:
        steps = "-" if r.steps is None else str(r.steps)
        lines.append(f"{steps:>6} {pct(r.metrics.miou)} {pct(r.metrics.pixel_accuracy)} "
                     f"{pct(r.metrics.mean_class_accuracy)} {r.seconds_per_image:7.4f}")
    best = max(results, key=lambda r: -1.0 if math.isnan(r.metrics.miou) else r.metrics.miou)
    width = max(len(name) for name in class_names)
    lines += ["", f"per-class IoU / accuracy (steps={'-' if best.steps is None else best.steps}), %:",
              f"{'class':<{width}} {'IoU':>6} {'acc':>6}"]
    for name, iou, accuracy in zip(class_names, best.metrics.iou, best.metrics.class_accuracy):
        lines.append(f"{name:<{width}} {pct(iou)} {pct(accuracy)}")
    return "\n".join(lines) + "\n"


def metrics_record(metrics: SegmentationMetrics, class_names: Sequence[str] | None = None) -> dict:
    """The JSON form of `metrics`, NaN as null (strict JSON has no NaN): mIoU, pixel and mean class
    accuracy; given the class names, also per-class IoU and accuracy and the confusion matrix."""
    def clean(value: float) -> float | None:
        return None if math.isnan(value) else value

    record = {"miou": clean(metrics.miou), "pixel_accuracy": clean(metrics.pixel_accuracy),
              "mean_class_accuracy": clean(metrics.mean_class_accuracy)}
    if class_names is not None:
        record["per_class"] = {name: {"iou": clean(iou), "accuracy": clean(accuracy)}
                               for name, iou, accuracy in zip(class_names, metrics.iou, metrics.class_accuracy)}
        record["confusion"] = metrics.confusion.tolist()
    return record


@dataclass
class EvalReport:
    results: list[EvalResult]
    table: str
    json_path: Path
    table_path: Path


def default_out_dir(checkpoint: Path, split: str) -> Path:
    """RUN/eval/<checkpoint>-<split>: beside the checkpoints, not inside one, so that a resumed run
    pruning the checkpoint leaves its results (a checkpoint outside a run: beside the checkpoint)."""
    run = checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINTS_DIR else checkpoint.parent
    return run / EVAL_DIR / f"{checkpoint.name}-{split}"


def new_folder(path: Path) -> Path:
    """Create and return `path`, or path-2, path-3, ... where it exists: an evaluation never
    overwrites an earlier one's results, and mkdir's atomicity keeps two at once apart."""
    for number in count(1):
        folder = path if number == 1 else path.with_name(f"{path.name}-{number}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue


def evaluate_checkpoint(checkpoint: str | Path, overrides: Sequence[str] = (),
                        out_dir: str | Path | None = None, progress: bool = True) -> EvalReport:
    """Evaluate a checkpoint on config split eval.split; write result.json, result.txt and the
    config used to out_dir (default: a new folder RUN/eval/<checkpoint>-<split>[-n], see new_folder)."""
    segmenter, info = load_segmenter(checkpoint, overrides)
    config = segmenter.config
    dataset = load_split(config, config.eval.split)
    if dataset.num_classes != info.num_classes:
        raise ValueError(f"checkpoint {info.path} was trained on {info.num_classes} classes but dataset "
                         f"{config.data.name!r} has {dataset.describe_classes()}")
    default = None if out_dir else default_out_dir(info.path, config.eval.split)
    ensure_writable_dir(out_dir or default.parent)  # before any work is done
    evaluated = min(len(dataset), config.eval.max_samples or len(dataset))
    results = evaluate_dataset(segmenter, dataset, info.num_classes, config.eval.step_counts,
                               config.eval.max_samples, progress=progress)
    sampler = config.eval.sampler if segmenter.is_flow else "argmax"
    title = (f"checkpoint {info.path} (step {info.step}), {config.data.name} split {config.eval.split!r}, "
             f"{evaluated} images, {config.eval.inference} inference, sampler {sampler}")
    table = format_table(results, info.class_names, title)
    record = {"checkpoint": str(info.path), "step": info.step, "dataset": config.data.name,
              "split": config.eval.split, "images": evaluated, "inference": config.eval.inference,
              "sampler": sampler, "class_names": info.class_names,
              "results": [{"steps": r.steps, "seconds_per_image": r.seconds_per_image,
                           **metrics_record(r.metrics, info.class_names)} for r in results]}
    out_dir = Path(out_dir) if out_dir else new_folder(default)
    json_path, table_path = out_dir / "result.json", out_dir / "result.txt"
    write_atomically(out_dir / "config.yaml", to_yaml(config))
    write_atomically(json_path, json.dumps(record, indent=1))
    write_atomically(table_path, table)
    return EvalReport(results, table, json_path, table_path)
