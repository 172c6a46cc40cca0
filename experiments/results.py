"""Reading a preset's result files, and the statistics over seeds the results page is built from.

Where several seeds ran, a figure is "mean ± sample standard deviation"; differences are paired by seed.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Iterator, Sequence

import torch

from experiments.plan import RunSpec, variants
from experiments.presets import Preset
from experiments.runner import COST_KEY, SESSIONS_FILE, read_result
from flowseg.build import EVAL_DATA_SEED
from flowseg.config import load_config
from flowseg.data import build_dataset
from flowseg.metrics import ConfusionMatrix

# ---- numbers ----------------------------------------------------------------------------------


def mean_sd(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    """'mean ± sample sd' of the finite values (just the value if there is one), scaled (percent by
    default); 'n/a' if there are none."""
    finite = [scale * v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return "n/a"
    if len(finite) == 1:
        return f"{finite[0]:.{digits}f}"
    return f"{statistics.mean(finite):.{digits}f} ± {statistics.stdev(finite):.{digits}f}"


def steps_to_reach(curve: Sequence[dict], target: float) -> float | None:
    """First training step at which a validation curve reaches `target`, linearly interpolated between
    validations; the first validation's step if it is already there; None if it never is."""
    previous = None
    for point in curve:
        if point["miou"] >= target:
            if previous is None or point["miou"] == previous["miou"]:
                return float(point["step"])
            share = (target - previous["miou"]) / (point["miou"] - previous["miou"])
            return previous["step"] + share * (point["step"] - previous["step"])
        previous = point
    return None


def ratio(a: float, b: float) -> float:
    """a / b, nan where b is 0 or either is missing (tiny runs can score 0 mIoU)."""
    return a / b if a is not None and b and math.isfinite(a) and math.isfinite(b) else math.nan


def paired_differences(a: dict[int, float | None], b: dict[int, float | None]) -> list[float]:
    return [a[s] - b[s] for s in a if s in b and a[s] is not None and b[s] is not None]


def status_note(runs: Sequence[dict]) -> str:
    diverged = [f"seed {r['seed']} diverged at step {r['diverged_at']}" for r in runs if r["status"] == "diverged"]
    return "; ".join(diverged)


def constant_prediction_miou(dataset: str, preset: Preset, root: str | None = None) -> float:
    """mIoU of predicting the most frequent class everywhere, on the images the final test mIoU uses:
    the floor a trained model has to clear."""
    split = load_config(dataset).eval.split
    data = build_dataset(dataset, split, root=root, image_size=preset.image_size, seed=EVAL_DATA_SEED)
    labels = torch.stack([data[i]["label"] for i in range(min(preset.eval_samples, len(data)))])
    valid = labels[labels != data.ignore_index]
    majority = int(torch.bincount(valid, minlength=data.num_classes).argmax())
    matrix = ConfusionMatrix(data.num_classes)
    matrix.update(torch.full_like(labels, majority), labels)
    return matrix.compute().miou


# ---- reading the results ------------------------------------------------------------------------


class Results:
    """The result files of one preset's output folder, looked up by experiment, variant and seed."""

    def __init__(self, preset: Preset, out: Path, ade20k_root: str | None = None):
        self.preset, self.out = preset, out
        self.variants = variants(preset)
        self.datasets = list(preset.datasets) + (["ade20k"] if ade20k_root else [])
        self.roots = {"ade20k": ade20k_root}
        self.cost = read_result(out, COST_KEY)
        self._floors: dict[str, float] = {}

    def floor(self, dataset: str) -> float:
        """constant_prediction_miou of a dataset, computed once (it generates or reads the images)."""
        if dataset not in self._floors:
            self._floors[dataset] = constant_prediction_miou(dataset, self.preset, self.roots.get(dataset))
        return self._floors[dataset]

    def spec(self, dataset: str, variant: str, budget: str, seed: int) -> RunSpec:
        amount = self.preset.convergence if budget == "convergence" else self.preset.ablation
        return RunSpec(dataset, self.variants[variant], budget, amount, seed, self.preset, self.roots.get(dataset))

    def runs(self, dataset: str, variant: str, budget: str) -> list[dict]:
        """Train results of every seed that has one (done or diverged), in seed order."""
        found = (read_result(self.out, f"train/{self.spec(dataset, variant, budget, seed).key}")
                 for seed in self.preset.seeds)
        return [result for result in found if result is not None]

    def by_seed(self, kind: str, dataset: str, variant: str, budget: str) -> dict[int, dict]:
        table = {}
        for seed in self.preset.seeds:
            result = read_result(self.out, f"{kind}/{self.spec(dataset, variant, budget, seed).key}")
            if result is not None and result.get("status") == "done":
                table[seed] = result
        return table

    def test_miou(self, dataset: str, variant: str, budget: str) -> dict[int, float | None]:
        """seed -> test mIoU (None for a diverged run)."""
        return {r["seed"]: (r["test"]["miou"] if r["status"] == "done" else None)
                for r in self.runs(dataset, variant, budget)}

    def every_result(self) -> Iterator[tuple[str, dict]]:
        """(kind of task: cost, train, sweep, diagnostics; its result) for every result file."""
        results = self.out / "results"
        for path in sorted(results.rglob("*.json")):
            key = path.relative_to(results).with_suffix("")
            yield key.parts[0], read_result(self.out, str(key))

    def task_seconds(self) -> dict[str, float]:
        spent: dict[str, float] = {}
        for kind, result in self.every_result():
            spent[kind] = spent.get(kind, 0.0) + result.get("task_seconds", 0.0)
        return spent

    def sessions(self) -> list[dict]:
        path = self.out / SESSIONS_FILE
        return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []

    def process_layouts(self) -> set[tuple[int, int]]:
        """(workers, threads) of the sessions that made the results."""
        return {(r["processes"]["workers"], r["processes"]["threads"]) for _, r in self.every_result() if "processes" in r}
