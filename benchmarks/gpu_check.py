"""The GPU path of flowseg, checked and measured in one run.

    python benchmarks/gpu_check.py --out DIR                       # on a CUDA machine (docs/gpu.md)
    python benchmarks/gpu_check.py --out DIR --device cpu --tiny   # the same code on the CPU, toy sizes
    python benchmarks/gpu_check.py --out DIR --sizes L/16 --skip attention adamw ddp   # one size's parts

Parts, each timed with CUDA events (host clock on the CPU) after warm-up, median over --iters:
    machine    GPU, versions, and the measured bf16 matrix-product rate (the MFU denominator)
    attention  which scaled_dot_product_attention backend runs for the trunk's shapes, and each
               backend's time alone
    adamw      one AdamW step over L/16's parameters, fused (what training uses) vs foreach
    train      per size and image side: one training step through flowseg's Trainer (the reshaped
               objective over 150 classes, bf16 autocast, fused AdamW, EMA), images/s and peak memory;
               forward + backward of the whole network and of the trunk alone (stem and blocks), whose
               difference is the neural-field decoder's share; the trunk's FLOPs (FlopCounterMode) over
               its time = the trunk's model FLOP utilisation (MFU)
    compile    the training step with train.compile on and off (and the compile time)
    inference  Segmenter.probabilities on whole images at 1 and 10 Euler steps, images/s, peak memory
    ddp        `torchrun --nproc_per_node 1 -m flowseg.cli train` on the device: one rank in an nccl
               (gloo on the CPU) process group, the model in DDP
Writes DIR/gpu_check.json and prints a table. A part that fails is recorded with its error and the
run goes on. Prints figures only; asserts nothing (the test suite runs the CPU form).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flowseg.build import build_network  # noqa: E402
from flowseg.config import load_config  # noqa: E402
from flowseg.distributed import DistContext, autocast  # noqa: E402
from flowseg.inference import Segmenter  # noqa: E402
from flowseg.train import Trainer  # noqa: E402

CLASSES = 150            # ADE20K's class count: the correction's cost grows with it
PIXELS_PER_BATCH = 2**22  # batch = this / side^2: 64 images at 256 px, 16 at 512
DATASHEET_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, SXM


@dataclass(frozen=True)
class Plan:
    device: torch.device
    sizes: tuple[str, ...]
    sides: tuple[int, ...]
    compile_cases: tuple[tuple[str, int], ...]
    pixels_per_batch: int
    warmup: int
    iters: int
    matmul_side: int
    ddp_steps: int

    @property
    def precision(self) -> str:
        return "bf16" if self.device.type == "cuda" else "fp32"


def full_plan(device: torch.device) -> Plan:
    return Plan(device, ("S/8", "B/16", "L/16"), (256, 512), (("L/16", 256),), PIXELS_PER_BATCH,
                warmup=3, iters=10, matmul_side=8192, ddp_steps=40)


def tiny_plan(device: torch.device) -> Plan:
    return Plan(device, ("T/8",), (32,), (("T/8", 32),), 2 * 32 * 32, warmup=1, iters=2, matmul_side=128,
                ddp_steps=2)


# ---- timing --------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(call: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median wall time of call() after `warmup` calls: CUDA events on the GPU, the host clock on the CPU."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            began = time.perf_counter()
            call()
            times.append(time.perf_counter() - began)
    return statistics.median(times)


def peak_memory_gib(device: torch.device, call: Callable[[], object]) -> float | None:
    """Peak allocated device memory of one call (None on the CPU, where torch keeps no such count)."""
    if device.type != "cuda":
        call()
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    call()
    sync(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


# ---- parts ---------------------------------------------------------------------------------------

def machine(plan: Plan) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": str(plan.device)}
    dtype = torch.bfloat16 if plan.device.type == "cuda" else torch.float32
    if plan.device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(plan.device), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(),
                    memory_gib=torch.cuda.get_device_properties(plan.device).total_memory / 2**30)
    n = plan.matmul_side
    a, b = (torch.randn(n, n, device=plan.device, dtype=dtype) for _ in range(2))
    seconds = median_seconds(lambda: a @ b, plan.device, plan.warmup, plan.iters)
    info["matmul_tflops"] = 2 * n**3 / seconds / 1e12  # measured peak of this dtype: the MFU denominator
    name = info.get("gpu", "")
    info["datasheet_bf16_tflops"] = next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in name), None)
    return info


# the aten op each SDPA backend dispatches to (cuDNN's own kernel names contain "flash" too)
BACKEND_OPS = {"aten::_scaled_dot_product_flash_attention": "flash",
               "aten::_scaled_dot_product_efficient_attention": "efficient",
               "aten::_scaled_dot_product_cudnn_attention": "cudnn",
               "aten::_scaled_dot_product_attention_math": "math"}


def attention(plan: Plan, size_name: str, side: int) -> dict:
    """The SDPA backend the trunk's attention gets at (size, side), and each backend's time alone."""
    from flowseg.models.field import resolve_size
    size = resolve_size(size_name)
    tokens = (side // size.patch_size) ** 2
    batch = max(1, plan.pixels_per_batch // side**2)
    dtype = torch.bfloat16 if plan.device.type == "cuda" else torch.float32
    q, k, v = (torch.randn(batch, size.heads, tokens, size.width // size.heads, device=plan.device, dtype=dtype)
               for _ in range(3))
    result: dict = {"shape": [batch, size.heads, tokens, size.width // size.heads], "dtype": str(dtype)}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.MATH):
        try:
            with sdpa_kernel(backend):
                seconds = median_seconds(lambda: F.scaled_dot_product_attention(q, k, v), plan.device,
                                         plan.warmup, plan.iters)
            result[backend.name.lower()] = seconds * 1e3  # ms
        except RuntimeError as error:  # the backend does not support this device, dtype or shape
            result[backend.name.lower()] = f"unavailable: {str(error).splitlines()[0][:120]}"
    activities = [torch.profiler.ProfilerActivity.CPU]
    if plan.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profile:
        F.scaled_dot_product_attention(q, k, v)
        sync(plan.device)
    names = [event.key for event in profile.key_averages()]
    result["default_picks"] = sorted({backend for name in names for op, backend in BACKEND_OPS.items()
                                      if name.startswith(op)})
    result["default_ops"] = [name for name in names if "attention" in name.lower() or "fmha" in name.lower()][:6]
    return result


def adamw(plan: Plan) -> dict:
    """One AdamW step over the parameters of the largest size, fused vs foreach."""
    config = load_config("ade20k", [f"model.size={plan.sizes[-1]}"])
    model, _ = build_network(config, CLASSES)
    params = list(model.to(plan.device).parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    result = {"size": plan.sizes[-1], "params_m": sum(p.numel() for p in params) / 1e6}
    for mode in ("fused", "foreach"):
        optimizer = torch.optim.AdamW(params, lr=1e-4, **{mode: True})
        result[f"{mode}_ms"] = median_seconds(optimizer.step, plan.device, plan.warmup, plan.iters) * 1e3
    return result


class RandomSplit:
    """Stands in for a dataset where the Trainer only asks for the class count: batches come from
    random_batch, so loading and augmentation stay out of the timings."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes


def random_batch(batch: int, side: int, device: torch.device) -> dict:
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(batch, 3, side, side, generator=generator) * 2 - 1
    blocks = torch.randint(0, CLASSES, (batch, 1, side // 16, side // 16), generator=generator)
    label = F.interpolate(blocks.float(), size=(side, side), mode="nearest")[:, 0].long()  # regions of 16 px
    return {"image": image.to(device), "label": label.to(device)}


def make_trainer(plan: Plan, size: str, side: int, batch: int, run_dir: Path, compiled: bool = False) -> Trainer:
    config = load_config("ade20k", [
        f"model.size={size}", f"data.image_size={side}", f"train.batch_size={batch}",
        f"train.precision={plan.precision}", f"train.compile={str(compiled).lower()}", f"train.out_dir={run_dir}",
        "train.tensorboard=false", "train.progress=false", f"train.device={plan.device.type}"])
    run_dir.mkdir(parents=True)
    context = DistContext(rank=0, world_size=1, local_rank=plan.device.index or 0, device=plan.device)
    return Trainer(config, context, resume=False, network=None, datasets=(RandomSplit(CLASSES),) * 2)


def trunk_tokens(model: torch.nn.Module, inputs: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The stem and trunk blocks of the network alone (FieldTransformerBase.trunk_tokens): tokens (B, L, C)."""
    return model.trunk_tokens(inputs, model.time_embed(t))[0]


def trunk_figures(model: torch.nn.Module, inputs: torch.Tensor, t: torch.Tensor, plan: Plan, info: dict,
                  forward: Callable = trunk_tokens) -> dict:
    """Forward + backward time of the trunk (`forward`: trunk_tokens, or it compiled), its FLOPs as
    FlopCounterMode counts them in the eager trunk, and their ratio to the bf16 peak: the trunk's MFU."""
    def step() -> None:
        with autocast(plan.device, plan.precision):
            tokens = forward(model, inputs, t)
        tokens.float().square().mean().backward()

    seconds = median_seconds(step, plan.device, plan.warmup, plan.iters)
    with FlopCounterMode(display=False) as counter:
        with autocast(plan.device, plan.precision):
            tokens = trunk_tokens(model, inputs, t)
        tokens.float().square().mean().backward()
    model.zero_grad(set_to_none=True)
    achieved = counter.get_total_flops() / seconds / 1e12
    peak, datasheet = info.get("matmul_tflops"), info.get("datasheet_bf16_tflops")
    return {"trunk_forward_backward_ms": seconds * 1e3, "trunk_tflop": counter.get_total_flops() / 1e12,
            "trunk_tflops_per_s": achieved, "trunk_mfu_measured_peak": achieved / peak if peak else None,
            "trunk_mfu_datasheet": achieved / datasheet if datasheet else None}


def train_case(plan: Plan, size: str, side: int, work: Path, info: dict) -> dict:
    batch = max(1, plan.pixels_per_batch // side**2)
    trainer = make_trainer(plan, size, side, batch, work / f"train-{size.replace('/', '_')}-{side}")
    batches = itertools.repeat(random_batch(batch, side, plan.device))
    step = lambda: trainer.train_step(batches, 0.5)  # noqa: E731
    seconds = median_seconds(step, plan.device, plan.warmup, plan.iters)
    result = {"batch": batch, "step_ms": seconds * 1e3, "train_images_per_s": batch / seconds,
              "train_peak_gib": peak_memory_gib(plan.device, step),
              "params_m": sum(p.numel() for p in trainer.model.parameters()) / 1e6}

    model, device = trainer.model, plan.device
    dim = model.dim
    inputs = torch.randn(batch, dim + 3, side, side, device=device)
    t = torch.rand(batch, device=device)

    def whole() -> None:
        with autocast(device, plan.precision):
            out = model(inputs[:, :dim], t, inputs[:, dim:]).out
        out.float().square().mean().backward()

    whole_s = median_seconds(whole, device, plan.warmup, plan.iters)
    trunk = trunk_figures(model, inputs, t, plan, info)
    result.update(forward_backward_ms=whole_s * 1e3, field_share=1 - trunk["trunk_forward_backward_ms"] / 1e3 / whole_s,
                  **trunk)

    config = replace(trainer.config, eval=replace(trainer.config.eval, inference="whole", grid_shifts=1))
    segmenter = Segmenter(trainer.ema.model, trainer.encoding, config, device)
    images = random_batch(batch, side, device)["image"]
    for steps in (1, 10):
        call = lambda: segmenter.probabilities(images, steps)  # noqa: E731
        infer_s = median_seconds(call, device, 1, max(1, plan.iters // 3))
        result[f"infer_{steps}_images_per_s"] = batch / infer_s
        result[f"infer_{steps}_peak_gib"] = peak_memory_gib(device, call)
    del trainer, segmenter
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def compile_case(plan: Plan, size: str, side: int, work: Path, info: dict) -> dict:
    batch = max(1, plan.pixels_per_batch // side**2)
    result: dict = {"batch": batch}
    for compiled in (False, True):
        trainer = make_trainer(plan, size, side, batch, work / f"compile-{compiled}-{size.replace('/', '_')}-{side}",
                               compiled)
        batches = itertools.repeat(random_batch(batch, side, plan.device))
        began = time.perf_counter()
        trainer.train_step(batches, 0.5)  # the first step compiles
        sync(plan.device)
        first = time.perf_counter() - began
        seconds = median_seconds(lambda: trainer.train_step(batches, 0.5), plan.device, plan.warmup, plan.iters)
        key = "compiled" if compiled else "eager"
        result[f"{key}_step_ms"], result[f"{key}_first_step_s"] = seconds * 1e3, first
        result[f"{key}_images_per_s"] = batch / seconds
        model = trainer.model
        inputs = torch.randn(batch, model.dim + 3, side, side, device=plan.device)
        trunk = trunk_figures(model, inputs, torch.rand(batch, device=plan.device), plan, info,
                              torch.compile(trunk_tokens) if compiled else trunk_tokens)
        result.update({f"{key}_{name}": value for name, value in trunk.items()})
        del trainer
    result["speedup"] = result["eager_step_ms"] / result["compiled_step_ms"]
    return result


def ddp(plan: Plan, work: Path) -> dict:
    """One rank of `torchrun -m flowseg.cli train` on the device: nccl on CUDA, gloo on the CPU."""
    run_dir = work / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
               "-m", "flowseg.cli", "train", "shapes", f"train.out_dir={run_dir}", f"train.steps={plan.ddp_steps}",
               "train.val_samples=8", "train.progress=false", "train.tensorboard=false",
               f"train.device={plan.device.type}", "train.val_every=0", "train.ckpt_every=0"]
    path = os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))  # keep the caller's packages
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**os.environ, "PYTHONPATH": path})
    log = (run_dir / "train.log").read_text() if (run_dir / "train.log").exists() else ""
    group = next((line.split("training ", 1)[1] for line in log.splitlines() if "process group" in line), None)
    return {"returncode": done.returncode, "seconds": time.perf_counter() - began, "group": group,
            "stopped": next((line for line in log.splitlines() if "stopped by" in line), None),
            "stderr_tail": done.stderr[-1500:] if done.returncode else ""}


# ---- driver --------------------------------------------------------------------------------------

def run_part(results: dict, name: str, call: Callable[[], dict], path: Path) -> None:
    began = time.perf_counter()
    try:
        results[name] = call()
    except Exception as error:  # a failing part is a finding: record it and go on
        results[name] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-3000:]}
    results[name]["part_seconds"] = time.perf_counter() - began
    path.write_text(json.dumps(results, indent=1, default=str))
    print(f"[{name}] {json.dumps(results[name], default=str)[:600]}", flush=True)


def figure(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(results: dict) -> None:
    print("\nsize   side batch  train img/s  peak GiB  field share  trunk TFLOP/s  MFU(meas)  "
          "infer1 img/s  infer10 img/s  infer10 GiB")
    for key, case in results.items():
        if not key.startswith("train ") or "error" in case:
            continue
        size, side = key.split()[1:]
        print(f"{size:6s} {side:>4s} {case['batch']:5d} {case['train_images_per_s']:12.1f} "
              f"{figure(case['train_peak_gib'], '.1f'):>9} {case['field_share']:11.1%} "
              f"{case['trunk_tflops_per_s']:14.1f} {figure(case['trunk_mfu_measured_peak'], '.1%'):>10} "
              f"{case['infer_1_images_per_s']:13.1f} {case['infer_10_images_per_s']:14.1f} "
              f"{figure(case['infer_10_peak_gib'], '.1f'):>12}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--tiny", action="store_true", help="toy sizes (the CPU form the tests run)")
    parser.add_argument("--skip", nargs="*", default=[], help="parts to leave out, e.g. compile ddp")
    parser.add_argument("--sizes", nargs="*", default=[], help="measure only these of the plan's sizes, e.g. L/16")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device (use --device cpu --tiny for the CPU form)")
    plan = tiny_plan(device) if args.tiny else full_plan(device)
    if args.sizes:
        unknown = set(args.sizes) - set(plan.sizes)
        if unknown:
            parser.error(f"--sizes: {sorted(unknown)} not in this plan's sizes {plan.sizes}")
        plan = replace(plan, sizes=tuple(args.sizes),
                       compile_cases=tuple(case for case in plan.compile_cases if case[0] in args.sizes))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "gpu_check.json"
    results: dict = {"command": " ".join(sys.argv), "plan": {k: str(v) for k, v in vars(plan).items()}}
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        run_part(results, "machine", lambda: machine(plan), path)
        if "attention" not in args.skip:
            for size in plan.sizes:
                run_part(results, f"attention {size} {plan.sides[-1]}",
                         lambda: attention(plan, size, plan.sides[-1]), path)
        if "adamw" not in args.skip:
            run_part(results, "adamw", lambda: adamw(plan), path)
        for size in plan.sizes:
            for side in plan.sides:
                run_part(results, f"train {size} {side}", lambda: train_case(plan, size, side, work, results["machine"]),
                         path)
        if "ddp" not in args.skip:
            run_part(results, "ddp", lambda: ddp(plan, work), path)
        if "compile" not in args.skip:  # last: compiling the largest size takes the longest
            for size, side in plan.compile_cases:
                run_part(results, f"compile {size} {side}",
                         lambda: compile_case(plan, size, side, work, results["machine"]), path)
    print_table(results)
    return results


if __name__ == "__main__":
    main()
