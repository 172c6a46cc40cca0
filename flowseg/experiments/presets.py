"""Presets: every budget of the reproduction, explicit and in one place.

A preset fixes the model size, image size, seeds and, per experiment, the training budget (optimizer
steps at a batch size). Budgets are in steps, not minutes, so a run is reproducible whatever else the
machine is doing; the minutes each preset is meant to take on 2 CPU cores are stated beside it and
the results page records the time it really took.

    micro   the test suite's end-to-end check (seconds; numbers meaningless)
    quick   <= 15 min on 2 CPU cores (2 worker processes), one seed: checks the pipeline, first indications
    full    <= 100 min on 2 CPU cores (2 worker processes), three seeds: means and spread
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Budget:
    """One training run: `steps` optimizer steps of `batch_size` images."""
    steps: int
    batch_size: int
    val_every: int       # validation (and checkpoint, read by the diagnostics) every val_every steps
    warmup_steps: int

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "val_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"Budget.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"Budget.warmup_steps must lie in [0, steps={self.steps}], got {self.warmup_steps}")


@dataclass(frozen=True)
class Preset:
    name: str
    minutes_target: float            # what the preset is sized for on 2 CPU cores
    seeds: tuple[int, ...]
    workers: int                     # processes training side by side unless --workers says otherwise
    model_size: str                  # key of flowseg.models.SIZES, the same for every run
    image_size: int
    convergence: Budget              # 1. vanilla vs reshaped on every dataset (+ diagnostics, sampling steps)
    ablation: Budget                 # 2. ablations, 3. encodings, 5. the flow side of generative vs discriminative
    val_samples: int                 # validation images behind each point of a convergence curve
    eval_samples: int                # test images behind each final mIoU
    sweep_samples: int               # test images of the sampling-step sweep
    diag_samples: int                # test images of the two failure-mode diagnostics
    diag_draws: int                  # draws of t per image for the training-signal diagnostic
    cost_rounds: int                 # interleaved timing rounds of the cost experiment
    cost_steps: int                  # training steps (or inference calls) timed per case and round
    datasets: tuple[str, ...] = ("mnist-seg", "shapes")  # convergence runs on each
    ablation_dataset: str = "mnist-seg"                  # 11 classes; its boundary_ignore option adds ignore pixels
    eval_steps: int = 10                                 # Euler steps of every evaluation but the sweep
    euler_sweep: tuple[int, ...] = (1, 2, 5, 10, 20, 50, 100)
    heun_sweep: tuple[int, ...] = (1, 2, 5, 10, 20)
    cost_inference_steps: tuple[int, ...] = (1, 2, 5, 10, 20)
    taus: tuple[float, ...] = (0.25, 0.5, 2.0)           # besides the default tau = 1
    epses: tuple[float, ...] = (1e-4, 1e-2)              # besides the default eps = 1e-3
    ignore_band: int = 1                                 # ignore-masking ablation: 255 within this many px of a boundary
    spacing_class_counts: tuple[int, ...] = (11, 19, 150, 171)
    lr: float = 1e-3

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ValueError(f"preset {self.name!r} needs at least one seed")
        if self.eval_steps not in self.euler_sweep:
            raise ValueError(f"eval_steps={self.eval_steps} must be one of euler_sweep {self.euler_sweep}")


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(
            name="micro", minutes_target=1.0, seeds=(0,), workers=1, model_size="T/8", image_size=16,
            convergence=Budget(steps=4, batch_size=2, val_every=2, warmup_steps=1),
            ablation=Budget(steps=2, batch_size=2, val_every=2, warmup_steps=1),
            val_samples=2, eval_samples=2, sweep_samples=2, diag_samples=2, diag_draws=1,
            cost_rounds=1, cost_steps=1, euler_sweep=(1, 2, 10), heun_sweep=(1,), cost_inference_steps=(1, 2),
            taus=(0.5,), epses=(1e-2,), spacing_class_counts=(11, 19),
        ),
        Preset(
            name="quick", minutes_target=15.0, seeds=(0,), model_size="T/8", image_size=32, workers=2,
            convergence=Budget(steps=300, batch_size=16, val_every=50, warmup_steps=30),
            ablation=Budget(steps=150, batch_size=16, val_every=50, warmup_steps=20),
            val_samples=32, eval_samples=64, sweep_samples=32, diag_samples=16, diag_draws=2,
            cost_rounds=3, cost_steps=3, taus=(0.5, 2.0),
        ),
        Preset(
            name="full", minutes_target=100.0, seeds=(0, 1, 2), model_size="T/8", image_size=32, workers=2,
            convergence=Budget(steps=1500, batch_size=16, val_every=150, warmup_steps=75),
            ablation=Budget(steps=750, batch_size=16, val_every=150, warmup_steps=50),
            val_samples=64, eval_samples=128, sweep_samples=64, diag_samples=32, diag_draws=4,
            cost_rounds=5, cost_steps=5,
        ),
    )
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {tuple(PRESETS)}")
    return PRESETS[name]
