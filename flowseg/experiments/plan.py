"""The plan: which training runs each experiment needs, as config overrides of one base run.

Every run is the base configuration (the dataset's shipped config, the preset's model, image size
and budget, the reshaped objective with method.md's defaults) plus the overrides of one variant.
Experiments share runs: the ablations' "-log(d + eps)" row, the encodings' "kronecker" row and the
flow side of generative-vs-discriminative are all the variant "reshaped" at the ablation budget, and
when the ablation budget equals the convergence budget that is also the convergence run. A run's key
hashes its complete override list, so two experiments asking for the same configuration get the same
run, and changing a budget gives a new run rather than reusing a stale one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from flowseg.experiments.presets import Budget, Preset

REFERENCE = "reshaped"  # method.md's defaults: T = -log(d + eps), tau = 1, eps = 1e-3, lambda = 1, static, v
VANILLA = "vanilla"
DISCRIMINATIVE = "discriminative"
ENCODING_ROWS = ("kronecker", "rd", "lattice", "random", "bits", "onehot")


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: tuple[str, ...]   # flowseg.config key=value overrides on top of the base run


@dataclass(frozen=True)
class RunSpec:
    dataset: str
    variant: Variant
    budget_name: str             # "convergence" | "ablation"
    budget: Budget
    seed: int
    preset: Preset
    data_root: str | None = None

    def overrides(self) -> list[str]:
        """The complete override list of this run (everything but train.out_dir)."""
        p, b = self.preset, self.budget
        base = [
            f"data.image_size={p.image_size}", "data.augment=null", f"model.size={p.model_size}",
            f"train.steps={b.steps}", f"train.batch_size={b.batch_size}", f"train.val_every={b.val_every}",
            f"train.ckpt_every={b.val_every}", "train.keep_checkpoints=0", f"train.val_samples={p.val_samples}",
            f"train.seed={self.seed}", "train.progress=false", "train.tensorboard=false",
            f"optim.lr={p.lr}", f"optim.warmup_steps={b.warmup_steps}", "optim.weight_decay=0.0",
            "optim.ema_decay=0.999", "data.num_workers=0",
            f"eval.steps={p.eval_steps}", "eval.sampler=euler", "eval.inference=resize", "eval.batch_size=16",
        ]
        if self.data_root is not None:
            base.append(f"data.root={self.data_root}")
        return base + list(self.variant.overrides)

    @property
    def key(self) -> str:
        digest = hashlib.sha256("\n".join([self.dataset, *self.overrides()]).encode()).hexdigest()[:10]
        return f"{self.dataset}/{self.variant.name}/seed{self.seed}-{digest}"


@dataclass(frozen=True)
class Row:
    label: str
    variant: str
    paper: float | None = None   # the paper's mIoU for this row (ADE20K, short schedule), where reported


@dataclass(frozen=True)
class AblationGroup:
    title: str
    rows: tuple[Row, ...]
    claim: str                   # what the paper found, in words
    judged: str = ""             # "order": the rows are the paper's order, best first;
                                 # "pair": the paper found the first row better than the second; "": no claim


def variants(preset: Preset) -> dict[str, Variant]:
    band = f"data.options.boundary_ignore={preset.ignore_band}"
    table = [
        Variant(REFERENCE, ()),
        Variant(VANILLA, ("objective.kind=vanilla",)),
        Variant("T=inverse", ("objective.transform=inverse",)),
        Variant("T=sqrt", ("objective.transform=sqrt",)),
        Variant("T=identity", ("objective.transform=identity",)),
        Variant("annealed", ("objective.lam_schedule=annealed",)),
        Variant("x-prediction", ("objective.parameterization=x",)),
        Variant("ignore-masked", (band,)),
        Variant("ignore-unmasked", (band, "objective.mask_ignore=false")),
        Variant("no-image-conditioning", ("model.image_conditioning=false",)),
        *(Variant(f"tau={tau:g}", (f"objective.tau={tau}",)) for tau in preset.taus),
        *(Variant(f"eps={eps:g}", (f"objective.eps={eps}",)) for eps in preset.epses),
        *(Variant(f"encoding={name}", (f"model.encoding={name}",)) for name in ENCODING_ROWS[1:]),
        Variant(DISCRIMINATIVE, ("model.kind=discriminative",)),  # steps: set for equal time at run time
    ]
    return {variant.name: variant for variant in table}


def encoding_variant(name: str) -> str:
    return REFERENCE if name == ENCODING_ROWS[0] else f"encoding={name}"


def ablation_groups(preset: Preset) -> list[AblationGroup]:
    return [
        AblationGroup("distance transform T(d)", (
            Row("-log(d + eps)", REFERENCE, 29.75), Row("1 / (d + eps)", "T=inverse", 29.12),
            Row("sqrt(d)", "T=sqrt", 28.32), Row("d", "T=identity", 27.15)),
            "-log > inverse > sqrt > identity", "order"),
        AblationGroup("correction schedule", (
            Row("static (constant lambda)", REFERENCE, 28.15), Row("annealed (lambda -> 0)", "annealed", 24.65)),
            "static > annealed", "pair"),
        AblationGroup("parameterisation", (
            Row("v-prediction", REFERENCE, 29.75), Row("x-prediction", "x-prediction", 29.06)),
            "v > x", "pair"),
        AblationGroup(f"ignore masking ({preset.ablation_dataset} with a {preset.ignore_band}-px ignore band at "
                      "boundaries)", (
            Row("masked", "ignore-masked"), Row("not masked (trained towards 0)", "ignore-unmasked")),
            "masked > not masked (+1.6 mIoU)", "pair"),
        AblationGroup("image conditioning", (
            Row("image as extra input channels", REFERENCE), Row("x_t only", "no-image-conditioning")),
            "not ablated in the paper (a project decision)"),
        AblationGroup("temperature tau", tuple(
            Row(f"tau = {tau:g}", REFERENCE if tau == 1.0 else f"tau={tau:g}")
            for tau in sorted((*preset.taus, 1.0))), "not reported (method.md default tau = 1)"),
        AblationGroup("eps", tuple(
            Row(f"eps = {eps:g}", REFERENCE if eps == 1e-3 else f"eps={eps:g}")
            for eps in sorted((*preset.epses, 1e-3))), "not reported (method.md default eps = 1e-3)"),
        AblationGroup("objective at the ablation budget", (
            Row("reshaped (the reference run)", REFERENCE), Row("vanilla flow matching", VANILLA)),
            "reshaped > vanilla", "pair"),
    ]


def planned_runs(preset: Preset, ade20k_root: str | None = None) -> list[RunSpec]:
    """Every training run of the preset, each once (per seed: the convergence runs on every dataset,
    then the ablation-budget runs on the ablation dataset)."""
    table = variants(preset)
    datasets = [(name, None) for name in preset.datasets] + ([("ade20k", ade20k_root)] if ade20k_root else [])
    runs: dict[str, RunSpec] = {}
    for seed in preset.seeds:
        for dataset, root in datasets:
            for name in (VANILLA, REFERENCE):
                spec = RunSpec(dataset, table[name], "convergence", preset.convergence, seed, preset, root)
                runs.setdefault(spec.key, spec)
        for name, variant in table.items():
            spec = RunSpec(preset.ablation_dataset, variant, "ablation", preset.ablation, seed, preset)
            runs.setdefault(spec.key, spec)
    return list(runs.values())
