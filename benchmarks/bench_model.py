"""Benchmark of the pixel neural-field transformer on CPU (float32).

    .venv/bin/python benchmarks/bench_model.py [--sizes T/8 S/8] [--repeats 2]

Prints, for each size at 64 x 64 (batch 16) and 256 x 256 (batch 2):
  - parameters of the flow model (d = 3, image-conditioned);
  - forward throughput (no_grad) and training-step throughput (reshaped objective, N = 150, backward,
    AdamW step), each as images per wall-clock second at the default thread count ("wall") and as
    images per CPU-second of one thread ("cpu1"), and each call's peak extra memory;
  - the time of 1-step Euler sampling (x_0, one forward, Euler update, nearest-centroid decoding,
    N = 150) over the time of one forward pass of the discriminative twin with its argmax (target <= 1.1);
  - at 256 x 256: the training-step time of the reshaped objective over vanilla flow matching at
    N = 150 (target <= 1.10).
Times are the minimum over repeats, the measured calls interleaved. On a shared machine wall time
(and multi-thread CPU time, which counts spin-waiting) varies with other processes' load far more
than single-thread CPU time, so the ratios and the "cpu1" figures use process CPU time with one
thread; the load average is printed beside the figures. Peak extra memory is measured in a fresh
subprocess per case (a process reuses freed heap pages, which would hide later peaks): its peak
resident set (VmHWM) after one call minus its resident set just before, with model, optimiser and
inputs already built.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from flowseg.encoding import build_encoding
from flowseg.memory import process_status_kib
from flowseg.models import DiscriminativeFieldTransformer, PixelFieldTransformer
from flowseg.objective import FlowMatchingObjective, ObjectiveConfig
from flowseg.sampling import segment

NUM_CLASSES = 150
RESOLUTIONS = ((64, 16), (256, 2))  # (side, batch)


def peak_extra_mib(size: str, side: int, batch: int, case: str) -> float:
    """Peak extra memory of one call of case ("forward" or "train"), in a fresh subprocess."""
    command = [sys.executable, __file__, "--memory-case", size, str(side), str(batch), case]
    return float(subprocess.run(command, check=True, capture_output=True, text=True).stdout)


def interleaved_best(fns: list[Callable[[], object]], repeats: int, clock=time.perf_counter) -> list[float]:
    """Minimum time of each fn over repeats, the fns run alternately (after one warm-up each)."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = clock()
            fn()
            best[i] = min(best[i], clock() - start)
    return best


@contextmanager
def single_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def best_cpu_times(fns: list[Callable[[], object]], repeats: int) -> list[float]:
    with single_thread():
        return interleaved_best(fns, repeats, clock=time.process_time)


def workload(size: str, side: int, batch: int) -> tuple[int, dict[str, Callable[..., None]]]:
    """The flow model's parameter count and the measured calls, everything they need already built."""
    torch.manual_seed(0)
    encoding = build_encoding("kronecker", NUM_CLASSES)
    image = torch.rand(batch, 3, side, side) * 2 - 1
    labels = torch.randint(0, NUM_CLASSES, (batch, side, side))
    x_t, t = torch.randn(batch, 3, side, side), torch.rand(batch)
    model = PixelFieldTransformer(size, dim=encoding.dim)
    twin = DiscriminativeFieldTransformer(size, NUM_CLASSES)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-4)
    objectives = {kind: FlowMatchingObjective(encoding, ObjectiveConfig(kind=kind)) for kind in ("reshaped", "vanilla")}

    def velocity(x: torch.Tensor, time: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        return model(x, time, img).out

    @torch.no_grad()
    def forward():
        model(x_t, t, image)

    def train_step(kind: str = "reshaped"):
        loss = objectives[kind](velocity, image, labels).loss
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    @torch.no_grad()
    def sample_one_step():
        segment(velocity, image, encoding, steps=1)

    @torch.no_grad()
    def twin_forward():
        twin(image).out.argmax(1)

    params = sum(p.numel() for p in model.parameters())
    return params, {"forward": forward, "train": train_step, "sample": sample_one_step, "twin": twin_forward}


def bench(size: str, side: int, batch: int, repeats: int) -> None:
    params, calls = workload(size, side, batch)
    forward, train_step = calls["forward"], calls["train"]
    memory = {case: peak_extra_mib(size, side, batch, case) for case in ("forward", "train")}
    wall = dict(zip(("forward", "train"), interleaved_best([forward, train_step], repeats)))
    cases = dict(calls)
    if side == 256:
        cases["vanilla"] = lambda: train_step("vanilla")
    cpu = dict(zip(cases, best_cpu_times(list(cases.values()), repeats)))
    line = f"{size:5s} {side:4d}px b={batch:<3d} {params / 1e6:6.2f}M params"
    for case in ("forward", "train"):
        line += (
            f" | {case} {batch / wall[case]:5.1f} img/s wall, {batch / cpu[case]:5.1f} img/s cpu1,"
            f" peak +{memory[case]:5.0f} MiB"
        )
    line += f" | sample(1)/twin {cpu['sample'] / cpu['twin']:5.3f}x"
    if side == 256:
        line += f" | reshaped/vanilla step {cpu['train'] / cpu['vanilla']:5.3f}x"
    print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["T/8", "S/8"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--memory-case", nargs=4, metavar=("SIZE", "SIDE", "BATCH", "CASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_case:
        size, side, batch, case = args.memory_case
        call = workload(size, int(side), int(batch))[1][case]
        before = process_status_kib("VmRSS") / 1024
        call()
        print(process_status_kib("VmHWM") / 1024 - before)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, N = {NUM_CLASSES} classes, float32 CPU")
    # other processes' load changes wall-clock throughput a lot: print it beside the figures
    print("load average (1, 5, 15 min) before: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    for size in args.sizes:
        for side, batch in RESOLUTIONS:
            bench(size, side, batch, args.repeats)
    print("load average (1, 5, 15 min) after:  {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()
