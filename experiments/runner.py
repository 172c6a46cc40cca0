"""Running the plan: one task per unit of work, each writing its result JSON atomically, each skipped
when its JSON is already there, so an interrupted preset continues where it stopped.

    OUT/results/<task key>.json   one per task (cost, train, sweep, diagnostics)
    OUT/runs/<run key>/           the training runs (flowseg.train folders: checkpoints, metrics.jsonl)
    OUT/experiments.log           this log, and everything the trainer prints
    OUT/sessions.jsonl            wall time of every invocation that ran tasks

A training run that was interrupted resumes from its newest checkpoint (flowseg.train's --resume).
Before anything runs, every run with a result or a folder is checked against the configuration this
code plans for it (config files and dataclass defaults included, not only the run's overrides): a
run made under other settings is an error, so a page never mixes results of two configurations.
Tasks run in phases, each needing only earlier ones: 0 the cost experiment (alone, so nothing else
disturbs its timings; the discriminative twin's step budget comes from its throughput ratio),
1 the training runs, 2 the sampling sweep, 3 the diagnostics (which then release the checkpoints).
Within a phase, settings.workers processes take tasks side by side.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager, redirect_stderr
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Iterator, TextIO

import torch
from tqdm import tqdm

from experiments.cost import measure_cost
from experiments.diagnostics import measure_signal, sampled_traversal, straight_traversal
from experiments.plan import DISCRIMINATIVE, REFERENCE, VANILLA, RunSpec, planned_runs
from experiments.presets import Preset
from flowseg.build import EVAL_DATA_SEED, build_network, load_segmenter, load_split
from flowseg.checkpoint import (
    CHECKPOINTS_DIR, fit_state_dict, latest_checkpoint, list_checkpoints, load_train_state, load_weights, prune_checkpoints,
    read_checkpoint, write_atomically,
)
from flowseg.config import Config, config_from_yaml, load_config
from flowseg.data import build_dataset
from flowseg.evaluate import evaluate_dataset
from flowseg.objective import FlowMatchingObjective
from flowseg.train import TrainingDiverged, train

log = logging.getLogger("experiments")
COST_KEY = "cost"
LOG_FILE = "experiments.log"
SESSIONS_FILE = "sessions.jsonl"  # one line per invocation that ran tasks: its wall time


@dataclass(frozen=True)
class Settings:
    """What a Runner is built from; picklable, so worker processes can build their own."""
    preset: Preset
    out: Path
    device: str = "cpu"
    threads: int = 1                 # torch threads per process
    workers: int = 1                 # processes running a phase's tasks side by side
    ade20k_root: str | None = None
    keep_checkpoints: bool = True    # False: delete a run's checkpoints once no task needs them


@dataclass
class Task:
    key: str                         # result file OUT/results/<key>.json
    phase: int                       # module docstring
    run: Callable[[], dict]


@contextmanager
def open_log(out: Path) -> Iterator[TextIO]:
    """Append this process's experiment log lines (and, via redirect_stderr, the trainer's) to OUT/LOG_FILE."""
    with open(out / LOG_FILE, "a", buffering=1) as stream:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
        try:
            yield stream
        finally:
            log.removeHandler(handler)


def _run_in_worker(settings: Settings, key: str) -> None:
    torch.set_num_threads(settings.threads)
    with open_log(settings.out) as stream:
        runner = Runner(settings, stream)
        runner.execute(next(task for task in runner.tasks() if task.key == key))


def result_path(out: Path, key: str) -> Path:
    return out / "results" / f"{key}.json"


def read_result(out: Path, key: str) -> dict | None:
    path = result_path(out, key)
    return json.loads(path.read_text()) if path.is_file() else None


def run_dir(out: Path, spec: RunSpec) -> Path:
    return out / "runs" / spec.key


def validation_curve(metrics_file: Path) -> list[dict]:
    """[{step, miou}] from the trainer's metrics.jsonl; a step logged twice (a resumed run repeats
    the steps after its last checkpoint) keeps its last record."""
    by_step: dict[int, float] = {}
    for line in metrics_file.read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "val":
            by_step[record["step"]] = record["miou"]
    return [{"step": step, "miou": by_step[step]} for step in sorted(by_step)]


# where and how a run executes, not what it computes: free to differ between invocations
EXECUTION_SETTINGS = ("train.out_dir", "train.device", "train.threads", "train.progress", "data.num_workers",
                      "eval.device")


def flat_settings(config: Config) -> dict[str, object]:
    """{"section.key": value} of a config, without EXECUTION_SETTINGS."""
    flat = {f"{section}.{key}": value for section, fields in asdict(config).items() for key, value in fields.items()}
    return {key: value for key, value in flat.items() if key not in EXECUTION_SETTINGS}


def _nan_to_none(value: float) -> float | None:
    return None if math.isnan(value) else value


class Runner:
    def __init__(self, settings: Settings, log_stream: TextIO):
        self.settings, self.log_stream = settings, log_stream
        self.preset, self.out, self.device = settings.preset, settings.out, torch.device(settings.device)
        self.runs = planned_runs(settings.preset, settings.ade20k_root)

    # ---- the task list ------------------------------------------------------------------------

    def tasks(self) -> list[Task]:
        tasks = [Task(COST_KEY, 0, lambda: measure_cost(self.preset, self.device))]
        for spec in self.runs:
            diagnosed = spec.budget_name == "convergence" and spec.variant.name in (VANILLA, REFERENCE)
            tasks.append(Task(f"train/{spec.key}", 1, lambda spec=spec, later=diagnosed: self.train_run(spec, later)))
            if diagnosed and spec.variant.name == REFERENCE and spec.dataset == self.preset.ablation_dataset:
                tasks.append(Task(f"sweep/{spec.key}", 2, lambda spec=spec: self.sampling_sweep(spec)))
            if diagnosed:
                tasks.append(Task(f"diagnostics/{spec.key}", 3, lambda spec=spec: self.diagnostics(spec)))
        return tasks

    def execute(self, task: Task) -> None:
        log.info("start %s", task.key)
        started = time.perf_counter()
        with redirect_stderr(self.log_stream):
            result = task.run()
        result["task_seconds"] = time.perf_counter() - started
        result["processes"] = {"workers": self.settings.workers, "threads": self.settings.threads}
        path = result_path(self.out, task.key)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, json.dumps(result, indent=1))
        log.info("done %s in %.1f s", task.key, result["task_seconds"])

    def run_all(self, progress: bool = True) -> int:
        """Every task without a result file, phase by phase (module docstring); returns how many ran."""
        workers = self.settings.workers
        tasks = self.tasks()
        self.check_saved_configs()
        todo = [task for task in tasks if not result_path(self.out, task.key).is_file()]
        log.info("preset %s: %d tasks, %d already done (their results are kept)", self.preset.name, len(tasks),
                 len(tasks) - len(todo))
        with tqdm(total=len(tasks), initial=len(tasks) - len(todo), desc=f"experiments ({self.preset.name})",
                  unit="task", disable=not progress) as bar:
            for phase in sorted({task.phase for task in todo}):
                batch = [task for task in todo if task.phase == phase]
                if workers == 1 or phase == 0:
                    for task in batch:
                        self.execute(task)
                        bar.update()
                    continue
                with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
                    futures = [pool.submit(_run_in_worker, self.settings, task.key) for task in batch]
                    for future in as_completed(futures):
                        future.result()
                        bar.update()
        return len(todo)

    def check_saved_configs(self) -> None:
        """Raise if a run in OUT was made with settings other than those planned for it now."""
        stale = []
        for spec in self.runs:
            saved_file = run_dir(self.out, spec) / "config.yaml"
            if not saved_file.is_file():
                continue
            if spec.variant.name == DISCRIMINATIVE and read_result(self.out, COST_KEY) is None:
                continue  # its step budget comes from the cost experiment, which has not run yet
            # read by this code, so settings added since then take their defaults on both sides
            saved = flat_settings(config_from_yaml(saved_file.read_text(), origin=str(saved_file)))
            planned = flat_settings(self.run_config(spec))
            changed = [f"{key}: {saved.get(key)!r} there, {planned.get(key)!r} now"
                       for key in sorted(planned.keys() | saved.keys()) if saved.get(key) != planned.get(key)]
            if changed:
                stale.append(f"  {spec.key}: " + "; ".join(changed))
        if stale:
            raise ValueError(
                f"{len(stale)} run(s) in {self.out} were made with other settings than this code plans for them "
                f"(a config file or a default changed since):\n" + "\n".join(stale) +
                f"\nuse a new --out folder, or delete {self.out / 'runs'} and {self.out / 'results'} to redo them")

    # ---- training runs ------------------------------------------------------------------------

    def run_config(self, spec: RunSpec) -> Config:
        overrides = spec.overrides() + [f"train.out_dir={run_dir(self.out, spec)}",
                                        f"train.device={self.device.type}", f"eval.device={self.device.type}"]
        if spec.variant.name == DISCRIMINATIVE:
            overrides.append(f"train.steps={self.equal_time_steps(spec)}")
        return load_config(spec.recipe, overrides)

    def equal_time_steps(self, spec: RunSpec) -> int:
        """Steps of the twin that take as long as the reshaped run's steps, by the cost experiment's
        measured time per training step of each."""
        cases = read_result(self.out, COST_KEY)["cases"]
        ratio = cases["train/reshaped"]["seconds_per_call"] / cases["train/discriminative"]["seconds_per_call"]
        return max(1, round(spec.budget.steps * ratio))

    def release_checkpoints(self, spec: RunSpec) -> None:
        """Keep only the final checkpoint of a run whose tasks are done (or none, if so asked)."""
        folder = run_dir(self.out, spec)
        if self.settings.keep_checkpoints:
            prune_checkpoints(folder, 1)
        else:
            shutil.rmtree(folder / CHECKPOINTS_DIR, ignore_errors=True)

    def train_run(self, spec: RunSpec, needed_later: bool) -> dict:
        config = self.run_config(spec)
        folder = run_dir(self.out, spec)
        latest = latest_checkpoint(folder)
        if latest is None and folder.exists():
            shutil.rmtree(folder)  # stopped before its first checkpoint: nothing to resume
        record = {"key": spec.key, "dataset": spec.dataset, "variant": spec.variant.name,
                  "budget": spec.budget_name, "seed": spec.seed, "overrides": spec.overrides(),
                  "steps_planned": config.train.steps, "batch_size": config.train.batch_size}
        # a run whose final checkpoint exists only lacks its result file: evaluate it, do not retrain
        if latest is None or read_checkpoint(latest).step < config.train.steps:
            try:
                train(config, resume=latest is not None)
            except TrainingDiverged as error:
                log.warning("%s diverged: %s", spec.key, error)
                return {**record, "status": "diverged", "diverged_at": error.step, "message": str(error)}
        final = latest_checkpoint(folder)
        segmenter, info = load_segmenter(final)
        test = load_split(config, config.eval.split)
        evaluation = evaluate_dataset(segmenter, test, info.num_classes, [config.eval.steps],
                                      self.preset.eval_samples)[0]
        train_seconds = load_train_state(final)["elapsed"]
        if not needed_later:
            self.release_checkpoints(spec)
        metrics = evaluation.metrics
        return {**record, "status": "done", "steps": info.step, "train_seconds": train_seconds,
                "curve": validation_curve(folder / "metrics.jsonl"),
                "test": {"split": config.eval.split, "images": min(len(test), self.preset.eval_samples),
                         "sampler_steps": evaluation.steps, "miou": _nan_to_none(metrics.miou),
                         "pixel_accuracy": metrics.pixel_accuracy,
                         "mean_class_accuracy": _nan_to_none(metrics.mean_class_accuracy),
                         "iou": [_nan_to_none(v) for v in metrics.iou],
                         "seconds_per_image": evaluation.seconds_per_image}}

    def _finished_run(self, spec: RunSpec) -> tuple[Path, Config] | None:
        """The final checkpoint and config of a run that trained to the end (None if it diverged)."""
        if read_result(self.out, f"train/{spec.key}")["status"] != "done":
            return None
        final = latest_checkpoint(run_dir(self.out, spec))
        if final is None:
            raise ValueError(f"run {spec.key} has a result file but no checkpoint left in {run_dir(self.out, spec)}; "
                             f"delete {result_path(self.out, f'train/{spec.key}')} to train it again")
        return final, config_from_yaml(read_checkpoint(final).config_yaml)

    def _test_batch(self, config: Config, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `count` test samples at the training resolution (on-disk images are resized, as
        the diagnostics run the network directly, without the Segmenter's inference modes)."""
        data = config.data
        test = build_dataset(data.name, config.eval.split, root=data.root, image_size=data.image_size,
                             seed=EVAL_DATA_SEED, **data.options)
        samples = [test[i] for i in range(min(count, len(test)))]
        return (torch.stack([s["image"] for s in samples]).to(self.device),
                torch.stack([s["label"] for s in samples]).to(self.device))

    # ---- 4. sampling steps --------------------------------------------------------------------

    def sampling_sweep(self, spec: RunSpec) -> dict:
        finished = self._finished_run(spec)
        if finished is None:
            return {"key": spec.key, "status": "diverged"}
        final, config = finished
        test = load_split(config, config.eval.split)
        record = {"key": spec.key, "status": "done", "images": min(len(test), self.preset.sweep_samples)}
        for method, counts in (("euler", self.preset.euler_sweep), ("heun", self.preset.heun_sweep)):
            segmenter, info = load_segmenter(final, [f"eval.sampler={method}"])
            results = evaluate_dataset(segmenter, test, info.num_classes, list(counts), self.preset.sweep_samples)
            record[method] = [{"steps": r.steps, "miou": _nan_to_none(r.metrics.miou),
                               "seconds_per_image": r.seconds_per_image} for r in results]
        return record

    # ---- 6. diagnostics -----------------------------------------------------------------------

    def diagnostics(self, spec: RunSpec) -> dict:
        """(a) the training signal profile at every checkpoint (raw weights: the ones being trained),
        (b) traversal along the final EMA model's trajectories and along straight paths."""
        finished = self._finished_run(spec)
        if finished is None:
            return {"key": spec.key, "status": "diverged"}
        final, config = finished
        folder = run_dir(self.out, spec)
        image, labels = self._test_batch(config, self.preset.diag_samples)
        signal = []
        for checkpoint in list_checkpoints(folder):
            step = read_checkpoint(checkpoint).step
            model, encoding = build_network(config, read_checkpoint(checkpoint).num_classes)
            fit_state_dict(model, load_weights(checkpoint, "model"), f"checkpoint {checkpoint}")
            objective = FlowMatchingObjective(encoding.to(self.device), config.objective)
            model = model.to(self.device).eval()
            profile = measure_signal(objective, lambda x_t, t, img: model(x_t, t, img).out, image, labels,
                                     self.preset.diag_draws, min(1.0, step / config.train.steps), seed=spec.seed)
            signal.append({"step": step, **asdict(profile)})
        segmenter, _ = load_segmenter(final)
        sampled = sampled_traversal(
            lambda x_t, t, img: segmenter.objective.velocity(segmenter.model(x_t, t, img).out, x_t, t),
            segmenter.encoding, image, labels, config.eval.steps)
        straight = straight_traversal(segmenter.encoding, image, labels, config.eval.steps)
        self.release_checkpoints(spec)
        return {"key": spec.key, "status": "done", "images": image.shape[0], "signal": signal,
                "traversal": asdict(sampled), "straight_traversal": asdict(straight),
                "sampler_steps": config.eval.steps}
