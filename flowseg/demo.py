"""`flowseg demo`: the main job. With nothing downloaded, train the tiny model on mnist-seg within a
wall-clock budget, evaluate it on the held-out test split, and write predictions, overlays,
confidence maps and the training curves to one folder.

    OUT/run/                 the training run (config.yaml, train.log, metrics.jsonl, checkpoints/)
    OUT/test/                result.json, result.txt (mIoU, per-class IoU) on the test split
    OUT/predictions/         <name>_image.png, _truth.png, _labels.png, _overlay.png, _confidence.png
    OUT/predictions.png      those pictures side by side, a row per test image
    OUT/training_curve.png   training loss and validation mIoU against the step

The budget covers everything: training gets what is left after a reserve for the test evaluation
and the pictures (TEST_RESERVE of the budget), and its step budget (train.steps in the mnist-seg
config) ends it earlier on a fast machine.
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Sequence

import torch

from flowseg.build import load_segmenter, load_split
from flowseg.checkpoint import ensure_writable_dir
from flowseg.config import load_config
from flowseg.evaluate import EvalReport, evaluate_checkpoint
from flowseg.train import TrainResult, train
from flowseg.visualize import (colorize, confidence_image, image_to_uint8, overlay, plot_prediction_sheet,
                               plot_training_curves, save_rgb_png)

DEMO_CONFIG = "mnist-seg"
DEFAULT_MINUTES = 10.0
# share of the budget kept for the test evaluation and the pictures: the flow model's test (500 canvases,
# 5 Euler steps x 4 grid offsets) takes about 30 s on 2 cores
TEST_RESERVE = 0.09
PICTURES = 8              # test images drawn into OUT/predictions


@dataclass
class DemoReport:
    out_dir: Path
    training: TrainResult
    test: EvalReport
    wall_seconds: float


def _write_pictures(checkpoint: Path, overrides: Sequence[str], folder: Path, sheet: Path) -> None:
    """Each test picture's panels as PNGs in `folder`, and all of them side by side in `sheet`."""
    segmenter, info = load_segmenter(checkpoint, overrides)
    dataset = load_split(segmenter.config, "test")
    samples = [dataset[i] for i in range(min(PICTURES, len(dataset)))]
    images = torch.stack([s["image"] for s in samples])
    prediction = segmenter.predict(images)
    rows = []
    for sample, labels, confidence in zip(samples, prediction.labels.cpu(), prediction.confidence.cpu()):
        panels = {"image": image_to_uint8(sample["image"]), "truth": colorize(sample["label"], info.palette),
                  "labels": colorize(labels, info.palette), "overlay": overlay(sample["image"], labels, info.palette),
                  "confidence": confidence_image(confidence, 1.0 / info.num_classes)}
        for name, picture in panels.items():
            save_rgb_png(picture, folder / f"{sample['name']}_{name}.png")
        rows.append(panels)
    plot_prediction_sheet(rows, sheet)


def run_demo(out_dir: str | Path | None = None, minutes: float | None = None, twin: bool = False,
             overrides: Sequence[str] = ()) -> DemoReport:
    """Train (flow model, or the discriminative twin), evaluate on the test split, draw; print figures."""
    started = time.monotonic()
    minutes = DEFAULT_MINUTES if minutes is None else minutes
    if not minutes > 0:
        raise ValueError(f"--minutes must be > 0, got {minutes}")
    out_dir = ensure_writable_dir(out_dir or f"runs/demo-{datetime.now():%Y%m%d-%H%M%S}")
    if (out_dir / "run").exists():
        raise ValueError(f"{out_dir} already holds a demo run; choose another --out folder")
    config = load_config(DEMO_CONFIG, [f"train.out_dir={out_dir / 'run'}",
                                       f"train.minutes={minutes * (1 - TEST_RESERVE)}",
                                       *(["model.kind=discriminative"] if twin else []), *overrides])
    model = "discriminative twin" if twin else f"flow model ({config.objective.kind} objective)"
    print(f"flowseg demo: {config.model.size} {model} on mnist-seg {config.data.image_size}x"
          f"{config.data.image_size}, budget {minutes:g} min, output {out_dir}")

    training = train(config)
    test = evaluate_checkpoint(training.checkpoint, ["eval.split=test"], out_dir / "test", progress=False)
    predictions = ensure_writable_dir(out_dir / "predictions")
    _write_pictures(training.checkpoint, ["eval.split=test"], predictions, out_dir / "predictions.png")
    records = [json.loads(line) for line in (training.run_dir / "metrics.jsonl").read_text().splitlines()]
    plot_training_curves(records, out_dir / "training_curve.png")
    wall = time.monotonic() - started

    print(test.table, end="")
    metrics = test.results[0].metrics
    print(f"\nmnist-seg test mIoU {metrics.miou:.4f}, pixel accuracy {metrics.pixel_accuracy:.4f} after "
          f"{training.step} steps ({training.elapsed_seconds / 60:.1f} min training, stopped by the "
          f"{training.stopped_by} budget); demo wall time {wall / 60:.1f} min")
    print(f"wrote {out_dir}/: run/, test/result.json, predictions/, predictions.png, training_curve.png")
    print(f"see it at work in a web page: flowseg serve {shlex.quote(str(training.run_dir))}")
    return DemoReport(out_dir, training, test, wall)
