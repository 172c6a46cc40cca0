"""Reproducing the paper's claims at small scale: one command trains every run, measures the
diagnostics and the cost, and writes docs/results.md with its figures. It lives beside the library in
the repository, not in the installed package; run it from the repository root:

    python -m experiments --preset quick --out runs/experiments-quick

presets.py  the budgets;  plan.py  which runs each experiment needs;  runner.py  resumable tasks;
diagnostics.py  the two failure modes and the vector-field picture;  cost.py  throughput and memory;
results.py  reading the result files, statistics over seeds;  verdicts.py  the paper's numbers and the
rules judging its claims;  findings.py  what each experiment found;  figures.py + report.py +
templates/results.md  the results page.

convergence_sweep.py stands apart: objective variants (vanilla, reshaped, bounded, REPA) x datasets x seeds
as `flowseg train` / `flowseg eval` processes side by side, e.g. on one GPU (benchmarks/gpu_session.sh),
and their speed-ups over vanilla:  python -m experiments.convergence_sweep --out DIR [--device cuda]
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from experiments.presets import PRESETS, Budget, Preset, get_preset
from experiments.report import write_report
from experiments.runner import SESSIONS_FILE, Runner, Settings, log, open_log
from flowseg.checkpoint import ensure_writable_dir
from flowseg.distributed import resolve_device

__all__ = ["PRESETS", "Budget", "Preset", "get_preset", "run_experiments"]


def run_experiments(preset: str, out: str | Path, page: str | Path = "docs/results.md", threads: int = 1,
                    workers: int | None = None, device: str = "auto", ade20k_root: str | None = None,
                    report_only: bool = False, progress: bool = True, command: str | None = None,
                    keep_checkpoints: bool = True) -> Path:
    """Run (or resume) a preset into `out` and write the results page; returns the page's path.

    threads: torch threads per process; workers: processes training runs side by side (None: the
    preset's);
    keep_checkpoints=False deletes each run's checkpoints once no task needs them.
    """
    chosen = get_preset(preset)
    workers = chosen.workers if workers is None else workers
    for name, value in (("threads", threads), ("workers", workers)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if ade20k_root is not None and not Path(ade20k_root).is_dir():
        raise ValueError(f"--ade20k {ade20k_root} is not a directory")
    torch.set_num_threads(threads)
    out = ensure_writable_dir(out)
    page = Path(page)
    ensure_writable_dir(page.parent)
    command = command or f"python -m experiments --preset {preset} --out {out}"
    settings = Settings(chosen, out, resolve_device(device).type, threads, workers, ade20k_root, keep_checkpoints)
    with open_log(out) as stream:
        if not report_only:
            started = time.perf_counter()
            ran = Runner(settings, stream).run_all(progress)
            wall = time.perf_counter() - started
            log.info("all tasks done; %d ran in %.1f s", ran, wall)
            if ran:
                with open(out / SESSIONS_FILE, "a") as sessions:
                    sessions.write(json.dumps({"preset": preset, "tasks": ran, "wall_seconds": wall,
                                               "workers": workers, "threads": threads}) + "\n")
        written = write_report(chosen, out, page, command, ade20k_root)
        log.info("wrote %s", written)
    return written
