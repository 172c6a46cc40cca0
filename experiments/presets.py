"""Presets: every budget of the reproduction, explicit and in one place.

A preset fixes the model size, image size, seeds and, per experiment, the training budget (optimizer
steps at a batch size). Budgets are in steps, not minutes, so a run is reproducible whatever else the
machine is doing; the minutes each preset is meant to take on 2 CPU cores are stated beside it and
the results page records the time it really took.

    micro   the test suite's end-to-end check (seconds; numbers meaningless)
    quick   <= 15 min on 2 CPU cores (2 worker processes), one seed: checks the pipeline, first indications
    full    <= 100 min on 2 CPU cores (2 worker processes), three seeds: means and spread

quick and full train T/4 (an 8 x 8 token grid at 32 px) at lr 5e-3, batch 16, each dataset from its
shipped recipe (experiments/plan.py). On mnist-seg (the demo's network: convolutional stem, token
loss) validation mIoU leaves the constant-prediction floor after about 200 steps and passes 0.6 by
600 (3 seeds; docs/notes/2026-12-04-add-ons.md), which sets the budgets:

quick   convergence 500 steps on both datasets, ablations 200 steps, every ablation row: shows that
        every run trains and every section is written; the ablations are at the start of the takeoff.
        30 tasks in 11.9 min on a 2-core machine (docs/notes/2026-12-04-full-preset-800.md); the
        categorical flow's row adds one.
full    convergence 1000 steps on both datasets (vanilla, reshaped, and on mnist-seg the paper's
        unbounded correction at lambda 1), validated on 200 images (on the first 64 the seed-averaged
        speed-up on mnist-seg read 1.31x against 1.18x on all 500:
        docs/notes/2026-12-05-speedup-noise.md), ablations 800 steps (the reference run clears 0.5 test
        mIoU there; at 500 it did not), 3 seeds. To fit 100 minutes it trains fewer rows than quick:
        the encodings Kronecker and one-hot only (not rd, lattice, random: the paper's baseline set is not
        recoverable; not bits, for time), no eps sweep (eps is not a claim of the paper) and no
        ignore-masking group (on 32-px mnist-seg a 1-px band on each side of a 2-3 px stroke leaves
        almost no digit: both rows sat at the floor). 70 tasks in 92.6 min on a 2-core machine
        (docs/notes/2026-12-05-pooled-speedup.md); the runs behind these budgets:
        docs/notes/2026-12-04-full-preset.md and docs/notes/2026-12-04-full-preset-800.md.

The time each preset took (and so whether it still fits its minutes) is on the results page, under
*Time spent*.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Budget:
    """One training run: `steps` optimizer steps of `batch_size` images."""
    steps: int
    batch_size: int
    val_every: int       # validation (and checkpoint, read by the diagnostics) every val_every steps
    val_samples: int     # validation images behind each validation
    warmup_steps: int

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "val_every", "val_samples"):
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
    convergence: Budget              # 1. vanilla vs reshaped on every dataset (+ diagnostics, sampling steps),
                                     #    and the reshaped objective with each of correction_clips
    ablation: Budget                 # 2. ablations, 3. encodings, 5. the flow side of generative vs discriminative
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
    taus: tuple[float, ...] = ()     # besides ObjectiveConfig().tau and docs/method.md's tau = 1, always swept
    epses: tuple[float, ...] = (1e-2,)                   # besides ObjectiveConfig().eps
    # bounds on the correction (objective.correction_clip; None = unbounded, the paper's target) other than
    # the default, each a run at the convergence budget on the ablation dataset beside vanilla and reshaped
    correction_clips: tuple[float | None, ...] = (None,)
    # the encodings trained (experiment 3); the first, the reference run's, must be kronecker
    encodings: tuple[str, ...] = ("kronecker", "rd", "lattice", "random", "bits", "onehot")
    ignore_band: int | None = 1                          # ignore-masking ablation: 255 within this many px of a
                                                         # boundary; None: no ignore-masking group
    spacing_class_counts: tuple[int, ...] = (11, 19, 150, 171)
    lr: float = 5e-3                 # T/4 on mnist-seg learned faster at 5e-3 than at 3e-3 (batch 16, one run each)

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ValueError(f"preset {self.name!r} needs at least one seed")
        if not self.encodings or self.encodings[0] != "kronecker":
            raise ValueError(f"encodings must start with the reference run's 'kronecker', got {self.encodings}")
        if self.eval_steps not in self.euler_sweep:
            raise ValueError(f"eval_steps={self.eval_steps} must be one of euler_sweep {self.euler_sweep}")


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(
            name="micro", minutes_target=1.0, seeds=(0,), workers=1, model_size="T/8", image_size=16,
            convergence=Budget(steps=4, batch_size=2, val_every=2, val_samples=2, warmup_steps=1),
            ablation=Budget(steps=2, batch_size=2, val_every=2, val_samples=2, warmup_steps=1),
            eval_samples=2, sweep_samples=2, diag_samples=2, diag_draws=1,
            cost_rounds=1, cost_steps=1, euler_sweep=(1, 2, 10), heun_sweep=(1,), cost_inference_steps=(1, 2),
            spacing_class_counts=(11, 19),
        ),
        Preset(
            name="quick", minutes_target=15.0, seeds=(0,), model_size="T/4", image_size=32, workers=2,
            convergence=Budget(steps=500, batch_size=16, val_every=100, val_samples=32, warmup_steps=50),
            ablation=Budget(steps=200, batch_size=16, val_every=100, val_samples=32, warmup_steps=20),
            eval_samples=64, sweep_samples=32, diag_samples=16, diag_draws=2,
            cost_rounds=3, cost_steps=3,
        ),
        Preset(
            name="full", minutes_target=100.0, seeds=(0, 1, 2), model_size="T/4", image_size=32, workers=2,
            convergence=Budget(steps=1000, batch_size=16, val_every=100, val_samples=200, warmup_steps=100),
            ablation=Budget(steps=800, batch_size=16, val_every=400, val_samples=64, warmup_steps=50),
            eval_samples=128, sweep_samples=64, diag_samples=32, diag_draws=4,
            cost_rounds=5, cost_steps=5, epses=(), encodings=("kronecker", "onehot"), ignore_band=None,
        ),
    )
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {tuple(PRESETS)}")
    return PRESETS[name]
