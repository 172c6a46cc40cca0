"""Process-group set-up for single-process and torchrun launches.

`torchrun --nproc_per_node G [--nnodes M --node_rank R --rdzv_endpoint HOST:PORT] -m flowseg.cli train ...`
sets RANK / WORLD_SIZE / LOCAL_RANK in the environment; without them flowseg runs as one process and
every collective below is the identity. gloo is used on CPU, nccl on CUDA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    # launched by torchrun: the ranks form a process group and the model is wrapped in DDP, also when
    # there is one rank (a one-GPU torchrun runs the same code path as eight)
    launched: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.launched or self.world_size > 1


DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def setup(device: str = "auto") -> DistContext:
    """Join the torchrun process group if launched by torchrun, and pick this rank's device.

    device: "auto" (CUDA when available, else CPU), "cpu" or "cuda". Each rank drives the GPU of its
    LOCAL_RANK, so one node runs one process per GPU.
    """
    launched = "WORLD_SIZE" in os.environ
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    torch_device = resolve_device(device, local_rank)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    if launched and not dist.is_initialized():
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=torch_device,
                       launched=launched)


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """"auto" = this rank's GPU when CUDA is available, else the CPU; "cpu"; "cuda"."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for (train.device) but torch sees no CUDA device")
    if device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast_float(value: float, device: torch.device) -> float:
    """Rank 0's `value` on every rank (e.g. rank 0's clock, so a time budget ends everywhere at once)."""
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=0)
    return float(tensor.item())


def shard_indices(length: int, rank: int, world_size: int) -> list[int]:
    """Indices rank, rank + W, ... of range(length): the ranks' shards partition the split exactly.

    Unlike DistributedSampler nothing is padded, so no sample is counted twice in the confusion matrix.
    """
    return list(range(rank, length, world_size))


def autocast(device: torch.device, precision: str = "auto"):
    """bf16 autocast on CUDA ("auto" or "bf16"); a no-op context on CPU and for "fp32"."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16" and device.type != "cuda":
        raise ValueError("precision='bf16' needs a CUDA device; use 'auto' or 'fp32' on CPU")
    enabled = device.type == "cuda" and precision != "fp32"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)
