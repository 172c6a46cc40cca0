"""Reproducing the paper's claims at small scale (issue 5): one command trains every run, measures
the diagnostics and the cost, and writes docs/results.md with its figures.

    python -m flowseg.experiments --preset quick --out runs/experiments-quick

presets.py  the budgets;  plan.py  which runs each experiment needs;  runner.py  resumable tasks;
diagnostics.py  the two failure modes and the vector-field picture;  cost.py  throughput and memory;
figures.py + report.py  the results page.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from flowseg.checkpoint import ensure_writable_dir
from flowseg.distributed import resolve_device
from flowseg.experiments.presets import PRESETS, Budget, Preset, get_preset
from flowseg.experiments.report import write_report
from flowseg.experiments.runner import Runner, log

__all__ = ["PRESETS", "Budget", "Preset", "get_preset", "run_experiments"]

LOG_FILE = "experiments.log"


def run_experiments(preset: str, out: str | Path, page: str | Path = "docs/results.md", threads: int | None = 1,
                    device: str = "auto", ade20k_root: str | None = None, report_only: bool = False,
                    progress: bool = True, command: str | None = None, keep_checkpoints: bool = True) -> Path:
    """Run (or resume) a preset into `out` and write the results page; returns the page's path.
    keep_checkpoints=False deletes each run's checkpoints once no task needs them."""
    chosen = get_preset(preset)
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    if ade20k_root is not None and not Path(ade20k_root).is_dir():
        raise ValueError(f"--ade20k {ade20k_root} is not a directory")
    out = ensure_writable_dir(out)
    page = Path(page)
    ensure_writable_dir(page.parent)
    command = command or f"python -m flowseg.experiments --preset {preset} --out {out}"
    with open(out / LOG_FILE, "a", buffering=1) as stream:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
        try:
            if not report_only:
                started = time.perf_counter()
                Runner(chosen, out, resolve_device(device), stream, ade20k_root, keep_checkpoints).run_all(progress)
                log.info("all tasks done in %.1f s (this session)", time.perf_counter() - started)
            written = write_report(chosen, out, page, command, ade20k_root)
            log.info("wrote %s", written)
        finally:
            log.removeHandler(handler)
    return written
