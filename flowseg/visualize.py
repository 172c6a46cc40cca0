"""Pictures of results: palette label maps, overlays, confidence maps, prediction sheets and training
curves.

Everything is drawn off-screen (matplotlib's Agg canvas, no pyplot state) and every file is written
atomically, so an interrupted run or a full disk never leaves a truncated PNG behind; a failed write
names its file.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor

from flowseg.checkpoint import write_atomically
from flowseg.encoding import IGNORE_INDEX

IGNORE_COLOUR = (224, 224, 192)  # the colour PASCAL VOC uses for its void border


def _as_numpy(x: Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


def colorize(labels: Tensor | np.ndarray, palette: np.ndarray) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 colours; IGNORE_INDEX gets IGNORE_COLOUR."""
    labels = _as_numpy(labels).astype(np.int64)
    palette = np.asarray(palette, dtype=np.uint8)
    known = (labels >= 0) & (labels < len(palette))
    if not (known | (labels == IGNORE_INDEX)).all():
        raise ValueError(f"labels hold values outside [0, {len(palette)}) and {IGNORE_INDEX}: "
                         f"{np.unique(labels[~known & (labels != IGNORE_INDEX)])[:10].tolist()}")
    colours = np.empty((*labels.shape, 3), dtype=np.uint8)
    colours[known] = palette[labels[known]]
    colours[~known] = IGNORE_COLOUR
    return colours


def image_to_uint8(image: Tensor | np.ndarray) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8."""
    image = _as_numpy(image)
    return np.clip(np.rint((image.transpose(1, 2, 0) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def overlay(image: Tensor | np.ndarray, labels: Tensor | np.ndarray, palette: np.ndarray,
            alpha: float = 0.5) -> np.ndarray:
    """(H, W, 3) uint8: (1 - alpha) image + alpha colour(label); ignore pixels show the image alone."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha!r}")
    rgb = image_to_uint8(image).astype(np.float32)
    colours = colorize(labels, palette).astype(np.float32)
    if rgb.shape != colours.shape:
        raise ValueError(f"image {rgb.shape[:2]} and labels {colours.shape[:2]} differ in size")
    labelled = (_as_numpy(labels) != IGNORE_INDEX)[..., None]
    blended = np.where(labelled, (1 - alpha) * rgb + alpha * colours, rgb)
    return np.rint(blended).astype(np.uint8)


def confidence_image(confidence: Tensor | np.ndarray, low: float = 0.0) -> np.ndarray:
    """(H, W) confidence in [low, 1] -> (H, W, 3) uint8 through the viridis colour map (dark = unsure)."""
    values = (_as_numpy(confidence).astype(np.float64) - low) / max(1.0 - low, 1e-12)
    return (colormaps["viridis"](np.clip(values, 0.0, 1.0))[..., :3] * 255).round().astype(np.uint8)


def _write(path: str | Path, data: bytes) -> None:
    try:
        write_atomically(path, data)
    except OSError as error:  # e.g. ENOSPC, whose own message names no file
        raise OSError(f"cannot write {path}: {error.strerror or error}") from error


def _write_png(path: str | Path, picture: Image.Image) -> None:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    _write(path, buffer.getvalue())


def save_rgb_png(rgb: np.ndarray, path: str | Path) -> None:
    _write_png(path, Image.fromarray(np.asarray(rgb, dtype=np.uint8), mode="RGB"))


def save_label_png(labels: Tensor | np.ndarray, palette: np.ndarray, path: str | Path) -> None:
    """An indexed ("P") PNG: pixel values are the class ids, the file's palette their colours."""
    labels = _as_numpy(labels)
    colorize(labels, palette)  # validates the ids
    table = np.zeros((256, 3), dtype=np.uint8)
    table[:len(palette)] = palette
    table[IGNORE_INDEX] = IGNORE_COLOUR
    picture = Image.fromarray(labels.astype(np.uint8), mode="P")
    picture.putpalette(table.flatten().tolist())
    _write_png(path, picture)


def save_figure(figure: Figure, path: str | Path) -> None:
    """A matplotlib figure as a PNG, written atomically."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    _write(path, buffer.getvalue())


LOSS_TERMS = {"loss": "total", "loss_fm": "flow matching ||v - v*||^2", "loss_ce": "cross-entropy",
              "loss_token": "token loss (unweighted)"}


def loss_series(records: Iterable[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """{label: (steps, values)} of each logged loss term (LOSS_TERMS) with finite positive values."""
    train = [r for r in records if r.get("kind") == "train"]
    series = {}
    for key, label in LOSS_TERMS.items():
        points = [(r["step"], r[key]) for r in train if 0 < r.get(key, math.nan) < math.inf]
        if points:
            series[label] = ([step for step, _ in points], [value for _, value in points])
    return series


def plot_training_curves(records: Iterable[dict], path: str | Path) -> None:
    """Training losses (total and its logged terms) and validation mIoU against the step, from
    metrics.jsonl records."""
    records = list(records)
    val = [r for r in records if r.get("kind") == "val"]
    figure = Figure(figsize=(9, 3.5), dpi=100)
    FigureCanvasAgg(figure)
    loss_axes, miou_axes = figure.subplots(1, 2)
    series = loss_series(records)
    for label, (steps, values) in series.items():
        loss_axes.plot(steps, values, lw=1, label=label)
    loss_axes.set(xlabel="step", ylabel="training loss", yscale="log" if series else "linear", title="loss")
    if len(series) > 1:
        loss_axes.legend(fontsize=7)
    miou_axes.plot([r["step"] for r in val], [r["miou"] for r in val], marker="o")
    miou_axes.set(xlabel="step", ylabel="mIoU", ylim=(0, 1), title="validation mIoU")
    for axes in (loss_axes, miou_axes):
        axes.grid(alpha=0.3)
    figure.tight_layout()
    save_figure(figure, path)


def plot_prediction_sheet(rows: Sequence[Mapping[str, np.ndarray]], path: str | Path) -> None:
    """One picture of several samples: a row per sample, a column per panel ({title: (H, W, 3) uint8},
    the same titles in every row), drawn with nearest-neighbour pixels."""
    if not rows:
        raise ValueError("a prediction sheet needs at least one row")
    titles = list(rows[0])
    if any(list(row) != titles for row in rows):
        raise ValueError(f"every row of a prediction sheet must hold the panels {titles}")
    figure = Figure(figsize=(1.6 * len(titles), 1.6 * len(rows)), dpi=100)
    FigureCanvasAgg(figure)
    grid = figure.subplots(len(rows), len(titles), squeeze=False)
    for row, axes_row in zip(rows, grid):
        for title, axes in zip(titles, axes_row):
            axes.imshow(row[title], interpolation="nearest")
            axes.set_axis_off()
    for title, axes in zip(titles, grid[0]):
        axes.set_title(title, fontsize=9)
    figure.tight_layout()
    save_figure(figure, path)
