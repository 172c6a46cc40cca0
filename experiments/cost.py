"""Experiment 7, cost: throughput and peak memory of training and inference, as ratios from one run.

Cases, all at the preset's model size, image size and ablation batch size, on one fixed real batch:
    train/vanilla, train/reshaped, train/discriminative    one AdamW step (forward, loss, backward)
    infer/flow-S (S sampler steps), infer/discriminative  labels for the batch
Timing: `rounds` rounds, each timing `calls` calls of every case in turn, so a slow spell of a shared
machine hits every case alike; a case's time is the median over rounds of its per-call time.
Subnormal floats are flushed to zero while timing: dozens of steps on one batch drive some gradients
into the subnormal range, where a CPU's matmuls run several times slower (the reshaped case then read
+27% over vanilla), while training on fresh batches does not get there (its step time is the same with
and without flushing).
Peak memory: after the timing (so one-time library set-up is done), every case is built afresh and
called once. On CPU the figure is the growth of the process's peak resident set (VmHWM, reset just
before, with freed heap pages handed back to the OS) over that span: weights, optimizer state and the
call's temporaries. On CUDA it is torch.cuda.max_memory_allocated over the same span.
"""

from __future__ import annotations

import ctypes
import gc
import math
import os
import platform
import statistics
import time
from typing import Callable

import torch

from experiments.presets import Preset
from flowseg.data import build_dataset
from flowseg.encoding import build_encoding
from flowseg.memory import process_status_kib
from flowseg.models import build_model
from flowseg.losses import discriminative_loss
from flowseg.objective import FlowMatchingObjective, ObjectiveConfig
from flowseg.sampling import segment

TRAIN_CASES = ("train/vanilla", "train/reshaped", "train/discriminative")


def inference_cases(preset: Preset) -> list[str]:
    return [f"infer/flow-{steps}" for steps in preset.cost_inference_steps] + ["infer/discriminative"]


def fixed_batch(preset: Preset) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The first `batch_size` validation samples of the ablation dataset: image, labels, class count."""
    dataset = build_dataset(preset.ablation_dataset, "val", image_size=preset.image_size)
    samples = [dataset[i] for i in range(preset.ablation.batch_size)]
    return (torch.stack([s["image"] for s in samples]), torch.stack([s["label"] for s in samples]),
            dataset.num_classes)


def make_case(name: str, preset: Preset, image: torch.Tensor, labels: torch.Tensor,
              num_classes: int) -> tuple[Callable[[], None], int]:
    """One call of case `name` as a closure over a freshly built model, and the model's parameter count."""
    torch.manual_seed(0)
    kind = "discriminative" if name.endswith("discriminative") else "flow"
    encoding = build_encoding("kronecker", num_classes).to(image.device)
    model = build_model(kind, preset.model_size, dim=encoding.dim, num_classes=num_classes).to(image.device)
    parameters = sum(p.numel() for p in model.parameters())

    def velocity(x_t: torch.Tensor, t: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        return model(x_t, t, img).out

    if name.startswith("train/"):
        optimizer = torch.optim.AdamW(model.parameters(), lr=preset.lr)
        objective = None if kind == "discriminative" else \
            FlowMatchingObjective(encoding, ObjectiveConfig(kind=name.removeprefix("train/")))

        def call() -> None:
            loss = discriminative_loss(model(image).out, labels) if objective is None else \
                objective(velocity, image, labels)
            loss.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return call, parameters
    model.eval()
    if kind == "discriminative":
        return torch.no_grad()(lambda: model(image).out.argmax(1)), parameters
    steps = int(name.removeprefix("infer/flow-"))
    return lambda: segment(velocity, image, encoding, steps), parameters


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_cases(cases: dict[str, Callable[[], None]], rounds: int, calls: int, device: torch.device) -> dict[str, float]:
    """Median over rounds of seconds per call, every case timed once per round (after one warm-up call)."""
    for call in cases.values():
        call()
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, call in cases.items():
            _synchronize(device)
            start = time.perf_counter()
            for _ in range(calls):
                call()
            _synchronize(device)
            samples[name].append((time.perf_counter() - start) / calls)
    return {name: statistics.median(values) for name, values in samples.items()}


def _reset_cpu_peak() -> int:
    """Hand freed heap pages back to the OS, reset the peak resident set to the current one (Linux
    clear_refs 5) and return it in KiB: new allocations now show up as growth of the peak."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return process_status_kib("VmRSS")


def peak_memory(name: str, preset: Preset, image: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """MiB of peak extra memory of building case `name` and making one call (module docstring);
    nan where neither CUDA nor Linux's /proc interface is there to measure it."""
    device = image.device
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        make_case(name, preset, image, labels, num_classes)[0]()
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    try:
        before = _reset_cpu_peak()
    except OSError:
        return math.nan
    make_case(name, preset, image, labels, num_classes)[0]()
    return (process_status_kib("VmHWM") - before) / 1024


def machine() -> dict:
    """What the numbers were measured on: CPU model, cores, accelerator, library versions."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}


def measure_cost(preset: Preset, device: torch.device) -> dict:
    """Experiment 7 (module docstring): a JSON-ready record of times, throughputs and peak memory per
    case, naming the reference cases the results page divides by."""
    image, labels, num_classes = fixed_batch(preset)
    image, labels = image.to(device), labels.to(device)
    batch = image.shape[0]
    names = [*TRAIN_CASES, *inference_cases(preset)]
    built = {name: make_case(name, preset, image, labels, num_classes) for name in names}
    parameters = {name: count for name, (_, count) in built.items()}
    torch.set_flush_denormal(True)  # module docstring; a no-op where the CPU cannot flush
    try:
        seconds = time_cases({name: call for name, (call, _) in built.items()}, preset.cost_rounds,
                             preset.cost_steps, device)
    finally:
        torch.set_flush_denormal(False)  # the process default
    del built  # the memory probes build every case afresh, after one warm-up each above
    memory = {name: peak_memory(name, preset, image, labels, num_classes) for name in names}
    cases = {name: {"seconds_per_call": seconds[name], "images_per_second": batch / seconds[name],
                    "peak_memory_mib": memory[name], "parameters": parameters[name]} for name in names}
    return {
        "machine": machine(), "device": str(device), "batch_size": batch,
        "image_size": preset.image_size, "model_size": preset.model_size, "cases": cases,
        "train_reference": "train/vanilla", "infer_reference": "infer/discriminative",
    }

