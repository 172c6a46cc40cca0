"""The results page's PNG figures, drawn off-screen (matplotlib Agg) and written atomically.

Every function takes plain numbers (already read from the result files) and a path; where several
seeds are given, lines are seed means and shaded bands span the seeds' minimum to maximum.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from experiments.diagnostics import FieldPicture
from flowseg.visualize import save_figure

COLOURS = {"vanilla": "tab:blue", "reshaped": "tab:red", "straight path": "tab:grey", "discriminative": "tab:green"}
SPARE_COLOURS = ("tab:purple", "tab:orange", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")


def curve_colours(names: Sequence[str]) -> dict[str, str]:
    """COLOURS for the names it knows; the others take spare colours in order, so no two curves share one."""
    spare = iter(SPARE_COLOURS)
    return {name: COLOURS[name] if name in COLOURS else next(spare) for name in names}


def _new_figure(columns: int, width: float = 4.6, height: float = 3.6) -> tuple[Figure, list]:
    figure = Figure(figsize=(width * columns, height), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, columns, squeeze=False)[0]
    return figure, list(axes)


def _mean_band(axes, x: Sequence[float], runs: Sequence[Sequence[float]], label: str, colour: str | None,
               marker: str | None = "o", linestyle: str = "-") -> None:
    values = np.asarray(runs, dtype=float)              # (seeds, points)
    with warnings.catch_warnings():  # an all-nan column (nothing measured there) plots as a gap
        warnings.simplefilter("ignore", RuntimeWarning)
        mean, low, high = np.nanmean(values, 0), np.nanmin(values, 0), np.nanmax(values, 0)
    axes.plot(x, mean, marker=marker, ms=3, color=colour, label=label, linestyle=linestyle)
    if len(values) > 1:
        axes.fill_between(x, low, high, color=colour, alpha=0.2, lw=0)


def convergence_figure(curves: Mapping[str, Mapping[str, tuple[list[int], list[list[float]]]]], path: Path) -> None:
    """curves[dataset][variant] = (steps, per-seed validation mIoU at those steps)."""
    figure, axes = _new_figure(len(curves))
    for ax, (dataset, by_variant) in zip(axes, curves.items()):
        colours = curve_colours(list(by_variant))
        for variant, (steps, runs) in by_variant.items():
            _mean_band(ax, steps, [[100 * v for v in run] for run in runs], variant, colours[variant])
        ax.set(title=dataset, xlabel="training step", ylabel="validation mIoU (%)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)  # rising curves leave the lower right corner empty
    save_figure(figure, path)


def ablation_figure(rows: Sequence[tuple[str, list[float]]], reference: float, path: Path) -> None:
    """Horizontal bars of test mIoU (mean, error bar = seed min..max) with the reference run's mean."""
    figure = Figure(figsize=(7.5, 0.32 * len(rows) + 1.2), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    labels = [label for label, _ in rows]
    values = [100 * np.asarray(v, dtype=float) if v else np.array([np.nan]) for _, v in rows]
    means = np.array([np.nanmean(v) for v in values])
    low = means - np.array([np.nanmin(v) for v in values])
    high = np.array([np.nanmax(v) for v in values]) - means
    ax.barh(range(len(rows)), means, xerr=np.stack([low, high]), color="tab:red", alpha=0.7, capsize=2)
    ax.axvline(100 * reference, color="k", lw=0.8, ls="--", label="reference (reshaped, defaults)")
    ax.set_yticks(range(len(rows)), labels)
    ax.invert_yaxis()
    ax.set(xlabel="test mIoU (%)")
    ax.grid(alpha=0.3, axis="x")
    ax.legend(loc="lower right")
    save_figure(figure, path)


def sampling_figure(euler: Mapping[int, list[float]], heun: Mapping[int, list[float]], paper: Mapping[int, float],
                    reference_steps: int, path: Path) -> None:
    """mIoU relative to the 10-step Euler value, against the step count (Heun: 2 calls per step)."""
    figure, (ax,) = _new_figure(1, width=6.0)
    reference = np.mean(euler[reference_steps])
    for name, table, style in (("Euler (here)", euler, "-"), ("Heun (here)", heun, "--")):
        steps = sorted(table)
        with np.errstate(invalid="ignore", divide="ignore"):  # a model that scores 0 at 10 steps
            relative = np.asarray([table[s] for s in steps], dtype=float).T / reference
        _mean_band(ax, steps, relative, name, "tab:red", linestyle=style)
    steps = sorted(paper)
    ax.plot(steps, [paper[s] / paper[reference_steps] for s in steps], marker="s", ms=3, color="k",
            label="paper (ADE20K, Euler)")
    ax.set(xscale="log", xlabel="sampler steps", ylabel=f"mIoU / mIoU at {reference_steps} Euler steps")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(figure, path)


def signal_figure(profiles: Mapping[str, tuple[list[float], list[float]]],
                  near: Mapping[str, tuple[list[int], list[list[float]]]], path: Path) -> None:
    """Left: mean training signal per distance bin at the end of training (bin centres, means).
    Right: the near-centroid mean signal at every checkpoint (steps, per-seed values)."""
    figure, (left, right) = _new_figure(2)
    for variant, (centres, means) in profiles.items():
        left.plot(centres, means, marker="o", ms=3, color=COLOURS.get(variant), label=variant)
    left.set(xscale="log", yscale="log", xlabel="||x1_hat - mu_true||",
             ylabel="mean ||v_target - v_theta|| per pixel", title="training signal vs distance (end)")
    for variant, (steps, runs) in near.items():
        _mean_band(right, steps, runs, variant, COLOURS.get(variant))
    right.set(yscale="log", xlabel="training step", ylabel="mean signal, pixels near their centroid",
              title="near-centroid signal during training")
    for ax in (left, right):
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    save_figure(figure, path)


def traversal_figure(third: Mapping[str, list[list[float]]], wrong: Mapping[str, list[list[float]]],
                     times: Sequence[float], path: Path) -> None:
    """Share of valid pixels whose state decodes to a third class (left) or any wrong class (right)."""
    figure, (left, right) = _new_figure(2)
    for ax, table, title in ((left, third, "in a third class"), (right, wrong, "in a wrong class")):
        for name, runs in table.items():
            _mean_band(ax, times, [[100 * v for v in run] for run in runs], name, COLOURS.get(name))
        ax.set(xlabel="t of the state x_t", ylabel="valid pixels (%)", title=f"pixels whose state is {title}")
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(figure, path)


def field_figure(picture: FieldPicture, path: Path) -> None:
    """The paper's Figure 1 in our notation: velocity-error fields around the centroids of a 2-d code."""
    figure, axes = _new_figure(2, width=4.8, height=4.6)
    magnitudes = [np.hypot(*field) for field in (picture.vanilla, picture.reshaped)]
    norm = LogNorm(vmin=max(min(m.min() for m in magnitudes), 1e-2), vmax=max(m.max() for m in magnitudes))
    objective = picture.objective
    titles = ("vanilla: (mu_k - x) / (1 - t)",
              f"reshaped: vanilla - {objective.lam:g} dPhi/dx, tau = {objective.tau:g}")
    for ax, field, magnitude, title in zip(axes, (picture.vanilla, picture.reshaped), magnitudes, titles):
        stream = ax.streamplot(picture.grid, picture.grid, field[0], field[1], color=magnitude, norm=norm,
                               cmap="viridis", density=1.1, linewidth=0.8, arrowsize=0.8)
        others = np.delete(picture.centroids, picture.true_class, axis=0)
        ax.scatter(others[:, 0], others[:, 1], c="white", edgecolors="k", s=45, zorder=3, label="other mu")
        mu = picture.centroids[picture.true_class]
        ax.scatter([mu[0]], [mu[1]], c="red", edgecolors="k", marker="*", s=160, zorder=3, label="true mu_k")
        ax.set(title=f"{title}  (t = {picture.t:g})", xlim=picture.grid[[0, -1]], ylim=picture.grid[[0, -1]],
               aspect="equal")
    axes[0].legend(loc="lower left", fontsize=7)
    figure.colorbar(stream.lines, ax=axes, shrink=0.8, label="|field| (log scale)")
    save_figure(figure, path)
