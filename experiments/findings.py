"""What each experiment found: plain functions from a preset's Results to one dataclass per section of
the results page, holding its tables' cells, its figures' data, the numbers its prose quotes and the
verdicts on the paper's claims it tests. report.py fills the page's template from them.

Figures over seeds are "mean ± sample sd" (results.mean_sd); claims are judged on per-seed
differences, paired by seed (verdicts.py).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import numpy as np

from experiments.diagnostics import FieldPicture, field_picture
from experiments.plan import (
    CATEGORICAL, DISCRIMINATIVE, REFERENCE, VANILLA, AblationGroup, ablation_groups, ablation_variants,
    bounded_variants, encoding_variant,
)
from experiments.results import Results, mean_sd, paired_differences, ratio, status_note, steps_to_reach
from experiments.verdicts import (
    PAPER_ONE_STEP_SHARE, PAPER_SAMPLING, PAPER_SPEEDUP, Verdict, all_of_verdict, best_steps_verdict, judge,
    measured_order, one_step_verdict, order_verdict, seed_note, speed_verdict,
)
from flowseg.encoding import ENCODINGS, build_encoding

FIELD_CLASSES = 6  # the 2-d Kronecker code drawn in the vector-field picture
Cells = list[object]  # one row of a table
Curves = dict[str, tuple[list[int], list[list[float]]]]  # name -> (steps, per-seed values at those steps)


# ---- 1. convergence ----------------------------------------------------------------------------


@dataclass
class Convergence:
    rows: list[Cells]                    # one per dataset
    curves: dict[str, Curves]            # dataset -> validation mIoU of vanilla, reshaped and bounded runs
    bounded_rows: list[Cells]            # the bounded-correction runs on the ablation dataset
    verdicts: list[Verdict]


def convergence(results: Results) -> Convergence:
    """Vanilla against reshaped at equal steps on every dataset: final mIoU, and the steps the reshaped
    run takes to reach vanilla's final validation mIoU."""
    preset, seeds_run = results.preset, len(results.preset.seeds)
    rows, curves, verdicts = [], {}, []
    for dataset in results.datasets:
        vanilla, reshaped = (results.by_seed("train", dataset, name, "convergence") for name in (VANILLA, REFERENCE))
        seeds = [s for s in preset.seeds if s in vanilla and s in reshaped]
        if not seeds:
            rows.append([dataset] + ["n/a"] * 8)
            continue
        finals = {name: {s: runs[s]["curve"][-1]["miou"] for s in seeds}
                  for name, runs in (("vanilla", vanilla), ("reshaped", reshaped))}
        steps = [point["step"] for point in vanilla[seeds[0]]["curve"]]
        # per seed, and on the seed-averaged curves: one seed's ratio swings with its draw (and with the CPU
        # that trained it, docs/notes/2026-12-05-speedup-noise.md), so the verdict reads the averaged one
        reach = {s: steps_to_reach(reshaped[s]["curve"], finals["vanilla"][s]) for s in seeds}
        mean_curve = [{"step": step, "miou": statistics.mean(reshaped[s]["curve"][i]["miou"] for s in seeds)}
                      for i, step in enumerate(steps)]
        pooled_reach = steps_to_reach(mean_curve, statistics.mean(finals["vanilla"].values()))
        pooled = steps[-1] / pooled_reach if pooled_reach else None
        at_first = pooled_reach is not None and pooled_reach <= steps[0]
        never = [s for s in seeds if reach[s] is None]
        per_seed = ", ".join(f"{steps[-1] / reach[s]:.2f}x" if reach[s] else "never" for s in seeds)
        gap = paired_differences(finals["reshaped"], finals["vanilla"])
        test_v = {s: vanilla[s]["test"]["miou"] for s in seeds}
        test_r = {s: reshaped[s]["test"]["miou"] for s in seeds}
        rows.append([dataset, mean_sd(list(finals["vanilla"].values())), mean_sd(list(finals["reshaped"].values())),
                     mean_sd(gap), f"{pooled:.2f}x" if pooled else "never", per_seed,
                     mean_sd(list(test_v.values())), mean_sd(list(test_r.values())),
                     f"{100 * results.floor(dataset):.1f}"])
        curves[dataset] = {name: (steps, [[p["miou"] for p in runs[s]["curve"]] for s in seeds])
                           for name, runs in (("vanilla", vanilla), ("reshaped", reshaped))}
        test_gap = paired_differences(test_r, test_v)
        verdicts.append(Verdict(f"{dataset}: reshaped beats vanilla at equal steps", "yes (ADE20K)",
                                f"{mean_sd(gap)} mIoU points (test: {mean_sd(test_gap)})", judge(test_gap, seeds_run)))
        here = (f"{pooled:.2f}x" if pooled else "never") + f" on the seed-averaged curves (per seed: {per_seed})"
        verdicts.append(Verdict(f"{dataset}: reshaped reaches vanilla's final mIoU about 2x sooner",
                                f"{PAPER_SPEEDUP:g}x", here,
                                speed_verdict(pooled, len(never), at_first)))
    return Convergence(rows, curves, bounded_correction(results, curves), verdicts)


def bounded_correction(results: Results, curves: dict[str, Curves]) -> list[Cells]:
    """The reshaped objective at the preset's other bounds on its correction (objective.correction_clip;
    None: the paper's target, unbounded at lambda = 1) at the convergence budget on the ablation dataset,
    against vanilla and the reference run of the same seeds: one row per bound; adds each run's curves to
    `curves`."""
    preset = results.preset
    dataset = preset.ablation_dataset
    vanilla, reshaped = (results.by_seed("train", dataset, name, "convergence") for name in (VANILLA, REFERENCE))
    rows = []
    for variant, c in bounded_variants(preset).items():
        bounded = results.by_seed("train", dataset, variant, "convergence")
        seeds = [s for s in preset.seeds if s in bounded and s in vanilla and s in reshaped]
        if not seeds:
            continue
        test = {name: {s: runs[s]["test"]["miou"] for s in seeds}
                for name, runs in (("bounded", bounded), ("reshaped", reshaped), ("vanilla", vanilla))}
        label = ("reshaped, the paper's correction (unbounded, lambda 1)" if c is None
                 else f"reshaped, correction <= {c:g}")
        rows.append([label, mean_sd([bounded[s]["curve"][-1]["miou"] for s in seeds]),
                     mean_sd(list(test["bounded"].values())),
                     mean_sd(paired_differences(test["bounded"], test["reshaped"])),
                     mean_sd(paired_differences(test["bounded"], test["vanilla"])), len(seeds)])
        if dataset in curves:
            steps = [point["step"] for point in bounded[seeds[0]]["curve"]]
            curves[dataset][label] = (steps, [[p["miou"] for p in bounded[s]["curve"]] for s in seeds])
    return rows


# ---- 2. ablations --------------------------------------------------------------------------------


@dataclass
class AblationTable:
    title: str
    claim: str                           # what the paper found, in words
    rows: list[Cells]                    # setting, test mIoU, the paper's mIoU, note


@dataclass
class Ablations:
    tables: list[AblationTable]
    bars: list[tuple[str, list[float]]]  # "group: setting" -> per-seed test mIoU
    reference: float | None              # the reference run's mean test mIoU (None if no seed finished)
    verdicts: list[Verdict]


def ablations(results: Results) -> Ablations:
    """Each group of ablation_groups: one setting of the reference run changed, at the ablation budget."""
    dataset, tables, bars, verdicts = results.preset.ablation_dataset, [], [], []
    for group in ablation_groups(results.preset):
        values = {row.label: results.test_miou(dataset, row.variant, "ablation") for row in group.rows}
        table = []
        for row in group.rows:
            note = status_note(results.runs(dataset, row.variant, "ablation"))
            table.append([row.label, mean_sd(list(values[row.label].values())),
                          "" if row.paper is None else f"{row.paper:.2f}", note])
            bars.append((f"{group.title.split(' (')[0]}: {row.label}",
                         [v for v in values[row.label].values() if v is not None]))
        tables.append(AblationTable(group.title, group.claim, table))
        verdicts += ablation_verdicts(group, values, len(results.preset.seeds))
    finite = [v for v in results.test_miou(dataset, REFERENCE, "ablation").values() if v is not None]
    return Ablations(tables, bars, statistics.mean(finite) if finite else None, verdicts)


def ablation_verdicts(group: AblationGroup, values: dict[str, dict[int, float | None]], seeds: int) -> list[Verdict]:
    """The group's claim (AblationGroup.judged) against per-seed test mIoU by row label; none if it makes none."""
    rows = group.rows
    if group.judged == "order":
        means = {row.label: np.mean([v for v in values[row.label].values() if v is not None] or [np.nan])
                 for row in rows}
        paper = [row.label for row in rows]
        return [Verdict(f"{group.title} ordering", " > ".join(paper), " > ".join(measured_order(means)),
                        order_verdict(means, paper, seeds))]
    if group.judged == "pair":
        diffs = paired_differences(values[rows[0].label], values[rows[1].label])
        return [Verdict(f"{rows[0].label} beats {rows[1].label}", group.claim, f"{mean_sd(diffs)} mIoU points",
                        judge(diffs, seeds))]
    return []


# ---- 3. encodings --------------------------------------------------------------------------------


@dataclass
class Encodings:
    num_classes: int
    trained: list[Cells]                 # per encoding: name, d, min spacing, test mIoU, note
    spacing: list[Cells]                 # per encoding: min spacing at each of preset.spacing_class_counts
    verdicts: list[Verdict]


def encodings(results: Results) -> Encodings:
    """The reference run with only the encoding changed, and each encoding's minimum centroid spacing."""
    preset = results.preset
    dataset = preset.ablation_dataset
    reference = results.runs(dataset, REFERENCE, "ablation")
    num_classes = len(reference[0]["test"]["iou"]) if reference and reference[0]["status"] == "done" else 11
    trained, values = [], {}
    for name in preset.encodings:
        encoding = build_encoding(name, num_classes)
        values[name] = results.test_miou(dataset, encoding_variant(name), "ablation")
        trained.append([name, encoding.dim, f"{encoding.min_spacing():.3f}", mean_sd(list(values[name].values())),
                        status_note(results.runs(dataset, encoding_variant(name), "ablation"))])
    spacing = []
    for name in ENCODINGS:
        cells = []
        for count in preset.spacing_class_counts:
            try:
                encoding = build_encoding(name, count)
                cells.append(f"{encoding.min_spacing():.3f} (d={encoding.dim})")
            except ValueError as error:  # e.g. the lattice holds at most 216 classes
                cells.append(f"n/a: {error}")
        spacing.append([name, *cells])
    seeds = len(preset.seeds)
    against = {name: paired_differences(values["kronecker"], values[name]) for name in preset.encodings[1:]}
    each = {name: judge(diffs, seeds) for name, diffs in against.items()}
    worse = [name for name, verdict in each.items() if verdict.startswith("disagrees")]
    verdict = Verdict("the Kronecker code beats the baselines", "yes (comparison set not recoverable)",
                      "; ".join(f"vs {name}: {mean_sd(diffs)}" for name, diffs in against.items()) + " mIoU points",
                      all_of_verdict(list(each.values())) + (f" (worse than {', '.join(worse)})" if worse else "")
                      + seed_note(seeds))
    return Encodings(num_classes, trained, spacing, [verdict])


# ---- 4. sampling steps --------------------------------------------------------------------------


@dataclass
class Sampling:
    images: int
    rows: list[Cells]                    # per step count: Euler, rel., Heun, paper, paper rel.
    euler: dict[int, list[float]]        # steps -> per-seed mIoU
    heun: dict[int, list[float]]
    verdicts: list[Verdict]


def sampling(results: Results) -> Sampling | None:
    """mIoU of the reference convergence run against Euler and Heun step counts (None without a sweep)."""
    preset = results.preset
    sweeps = results.by_seed("sweep", preset.ablation_dataset, REFERENCE, "convergence")
    if not sweeps:
        return None
    euler = {s: [r["miou"] for sweep in sweeps.values() for r in sweep["euler"] if r["steps"] == s]
             for s in preset.euler_sweep}
    heun = {s: [r["miou"] for sweep in sweeps.values() for r in sweep["heun"] if r["steps"] == s]
            for s in preset.heun_sweep}
    reference = statistics.mean(euler[preset.eval_steps])
    rows = []
    for steps in sorted(set(preset.euler_sweep) | set(preset.heun_sweep)):
        paper = PAPER_SAMPLING.get(steps)
        rows.append([steps, mean_sd(euler.get(steps, [])),
                     f"{ratio(statistics.mean(euler[steps]), reference):.3f}" if steps in euler else "",
                     mean_sd(heun.get(steps, [])),
                     "" if paper is None else f"{paper:.2f}",
                     "" if paper is None else f"{paper / PAPER_SAMPLING[10]:.3f}"])
    best = max(euler, key=lambda s: statistics.mean(euler[s]))
    one_share = ratio(statistics.mean(euler[1]), reference) if 1 in euler else math.nan
    gains = [b - r for b, r in zip(euler[best], euler[preset.eval_steps])]  # per seed, sweeps in seed order
    verdicts = [
        Verdict(f"{preset.eval_steps} Euler steps are best", "10 best (47.1)",
                f"best: {best} steps ({mean_sd(gains)} points over {preset.eval_steps})",
                best_steps_verdict(best, preset.eval_steps, gains, len(sweeps))),
        Verdict("1 Euler step gives ~92% of the 10-step mIoU", f"{100 * PAPER_ONE_STEP_SHARE:.1f}%",
                f"{100 * one_share:.1f}%", one_step_verdict(one_share)),
    ]
    return Sampling(next(iter(sweeps.values()))["images"], rows, euler, heun, verdicts)


# ---- 5. generative vs discriminative ------------------------------------------------------------


@dataclass
class GenerativeVsDiscriminative:
    rows: list[Cells]                    # the two flow models and the twin: parameters, steps, seconds, test mIoU, note
    verdicts: list[Verdict]


def generative_vs_discriminative(results: Results) -> GenerativeVsDiscriminative:
    """The reference flow run and the categorical flow against the discriminative twin trained for the
    same time as the reference."""
    dataset = results.preset.ablation_dataset
    cases = results.cost["cases"] if results.cost else {}
    params = {"flow": cases["train/reshaped"]["parameters"],
              "discriminative": cases["train/discriminative"]["parameters"]} if cases else {}
    models = (("generative (reshaped flow)", REFERENCE), ("generative (categorical flow)", CATEGORICAL),
              ("discriminative twin (cross-entropy)", DISCRIMINATIVE))
    rows, values = [], {}
    for label, variant in models:
        runs = results.runs(dataset, variant, "ablation")
        done = [r for r in runs if r["status"] == "done"]
        values[variant] = results.test_miou(dataset, variant, "ablation")
        # the categorical flow's network is the reference's with N logits out of the field decoder instead of d
        size = {REFERENCE: f"{params.get('flow', 0) / 1e6:.2f} M", CATEGORICAL: "as above, N outputs",
                DISCRIMINATIVE: f"{params.get('discriminative', 0) / 1e6:.2f} M"}[variant]
        rows.append([label, size, mean_sd([r["steps"] for r in done], 1.0, 0),
                     mean_sd([r["train_seconds"] for r in done], 1.0, 1), mean_sd(list(values[variant].values())),
                     status_note(runs)])
    # the paper's claim is about its (reshaped) flow; the categorical flow trains the reference's steps
    claims = ((REFERENCE, "generative >= discriminative at equal size and training time",
               "FlowSeg 47.1 vs SegFormer-B2 46.5 (other architectures)"),
              (CATEGORICAL, "categorical flow >= discriminative, at the reference flow's steps", "not in the paper"))
    verdicts = []
    for variant, claim, paper in claims:
        diffs = paired_differences(values[variant], values[DISCRIMINATIVE])
        verdicts.append(Verdict(claim, paper, f"{mean_sd(diffs)} mIoU points", judge(diffs, len(results.preset.seeds))))
    return GenerativeVsDiscriminative(rows, verdicts)


# ---- 6. diagnostics ------------------------------------------------------------------------------


@dataclass
class Diagnostics:
    images: int                          # test images behind every number
    signal_rows: list[Cells]             # per objective: near radius, share near, near-centroid signal
    profiles: dict[str, tuple[list[float], list[float]]]  # objective -> (bin centres, mean signal) at the end
    near: Curves                         # objective -> near-centroid signal at every checkpoint
    sampler_steps: int
    traversal_rows: list[Cells]          # per kind of trajectory: traversing, ending wrong
    third: dict[str, list[list[float]]]  # trajectory -> per-seed share in a third class at each state
    wrong: dict[str, list[list[float]]]
    picture: FieldPicture
    near_gain: float                     # reshaped / vanilla field strength 0.05 to 0.15 from mu_k
    verdicts: list[Verdict]

    @property
    def times(self) -> list[float]:
        """t of each state of the sampled trajectories."""
        return list(np.linspace(0, 1, self.sampler_steps + 1))


def diagnostics(results: Results) -> Diagnostics | None:
    """(a) the training signal near the centroids, (b) trajectory traversing, of the vanilla and reshaped
    convergence runs on the ablation dataset; and the analytic vector-field picture (None without results)."""
    dataset, seeds = results.preset.ablation_dataset, len(results.preset.seeds)
    diag = {name: results.by_seed("diagnostics", dataset, name, "convergence") for name in (VANILLA, REFERENCE)}
    if not all(diag.values()):
        return None
    labels = {VANILLA: "vanilla", REFERENCE: "reshaped"}
    profiles, near, signal_rows = {}, {}, []
    for name, by_seed in diag.items():
        finals = [result["signal"][-1] for result in by_seed.values()]
        edges = np.asarray(finals[0]["edges"])
        counts = np.sum([f["counts"] for f in finals], 0)
        sums = np.nansum([np.nan_to_num(np.asarray(f["mean_signal"], dtype=float)) * np.asarray(f["counts"])
                          for f in finals], 0)
        keep = counts > 0
        profiles[labels[name]] = (list(np.sqrt(edges[:-1] * edges[1:])[keep]), list(sums[keep] / counts[keep]))
        steps = [point["step"] for point in next(iter(by_seed.values()))["signal"]]
        near[labels[name]] = (steps, [[p["near_signal"] for p in r["signal"]] for r in by_seed.values()])
        signal_rows.append([labels[name], f"{finals[0]['near_radius']:.3f}",
                            mean_sd([f["near_fraction"] for f in finals]),
                            mean_sd([f["near_signal"] for f in finals], 1.0, 3)])
    pairs = [(diag[VANILLA][s], reshaped) for s, reshaped in diag[REFERENCE].items() if s in diag[VANILLA]]
    near_ratio = [ratio(r["signal"][-1]["near_signal"], v["signal"][-1]["near_signal"]) for v, r in pairs]
    traversed_less = [v["traversal"]["traversed"] - r["traversal"]["traversed"] for v, r in pairs]
    third, wrong, traversal_rows = {}, {}, []
    for label, by_seed, kind in (("vanilla", diag[VANILLA], "traversal"), ("reshaped", diag[REFERENCE], "traversal"),
                                 ("straight path", diag[REFERENCE], "straight_traversal")):
        stats = [r[kind] for r in by_seed.values()]
        third[label] = [s["third_class_by_state"] for s in stats]
        wrong[label] = [s["wrong_by_state"] for s in stats]
        traversal_rows.append([label, mean_sd([s["traversed"] for s in stats]),
                               mean_sd([s["ends_wrong"] for s in stats])])
    picture, near_gain = vector_field_picture()
    verdicts = [
        Verdict("near its centroid the reshaped signal stays strong (vanilla's fades)", "yes (gradient vanishing)",
                f"reshaped / vanilla near-centroid signal: {mean_sd(near_ratio, 1.0, 2)}x",
                judge([math.log(x) for x in near_ratio if x > 0], seeds)),
        Verdict("reshaped trajectories traverse other classes less", "yes (trajectory traversing)",
                f"vanilla - reshaped traversing share: {mean_sd(traversed_less)} points", judge(traversed_less, seeds)),
    ]
    first = next(iter(diag[REFERENCE].values()))
    return Diagnostics(first["images"], signal_rows, profiles, near, first["sampler_steps"], traversal_rows, third,
                       wrong, picture, near_gain, verdicts)


def vector_field_picture() -> tuple[FieldPicture, float]:
    """The default objective's fields around the centroid nearest the origin of a FIELD_CLASSES-class 2-d
    Kronecker code, and how much stronger the reshaped field is than vanilla 0.05 to 0.15 from it."""
    encoding = build_encoding("kronecker", FIELD_CLASSES, dim=2)
    true_class = int(encoding.centroids.norm(dim=1).argmin())
    picture = field_picture(encoding, true_class)
    xs, ys = np.meshgrid(picture.grid, picture.grid)  # [y, x] like the fields
    radius = np.hypot(xs - picture.centroids[true_class, 0], ys - picture.centroids[true_class, 1])
    ring = (radius > 0.05) & (radius < 0.15)
    return picture, float(np.hypot(*picture.reshaped)[ring].mean() / np.hypot(*picture.vanilla)[ring].mean())


# ---- 7. cost -------------------------------------------------------------------------------------


@dataclass
class Cost:
    record: dict                         # the cost task's result (runner, cost.measure_cost)
    rows: list[Cells]                    # per case: ms per call, images/s, throughput ratio, peak MiB, memory ratio
    overhead: float                      # the reshaped objective's training time over vanilla's, minus 1


def cost(results: Results) -> Cost | None:
    """Throughput and memory of every case against its reference case (None without a cost result)."""
    record = results.cost
    if record is None:
        return None
    cases = record["cases"]
    rows = []
    for name, case in cases.items():
        reference = cases[record["train_reference"] if name.startswith("train/") else record["infer_reference"]]
        rows.append([name, f"{case['seconds_per_call'] * 1000:.1f}", f"{case['images_per_second']:.1f}",
                     f"{ratio(case['images_per_second'], reference['images_per_second']):.2f}",
                     f"{case['peak_memory_mib']:.1f}",
                     f"{ratio(case['peak_memory_mib'], reference['peak_memory_mib']):.2f}"])
    overhead = cases["train/vanilla"]["images_per_second"] / cases["train/reshaped"]["images_per_second"] - 1
    return Cost(record, rows, overhead)


# ---- summary, set-up, time spent -----------------------------------------------------------------


@dataclass
class Summary:
    rows: list[Cells]                    # per verdict: claim, paper, here, verdict
    disagreements: list[str]             # claims this run disagrees with (wholly or partly)
    reference: str                       # the reference run's test mIoU at the ablation budget
    floor: float                         # mIoU of predicting the most frequent class everywhere


def summary(results: Results, verdicts: list[Verdict]) -> Summary:
    dataset = results.preset.ablation_dataset
    return Summary(
        rows=[[v.claim, v.paper, v.here, v.verdict] for v in verdicts],
        disagreements=[v.claim for v in verdicts if v.verdict.startswith(("disagrees", "partly"))],
        reference=mean_sd(list(results.test_miou(dataset, REFERENCE, "ablation").values())),
        floor=results.floor(dataset))


@dataclass
class Setup:
    machine: dict                        # cost.machine() of the cost task ({} without one)
    parameters: int | None               # of the reference flow model (None without a cost result)
    processes: list[tuple[int, int]]     # (workers, threads) of the sessions that made the results
    budgets: list[Cells]                 # per budget: experiments, runs per seed, steps x batch, validation, warm-up


def setup(results: Results) -> Setup:
    preset, record = results.preset, results.cost or {}
    bounded = bounded_variants(preset)
    convergence_runs = f"2 per dataset ({', '.join(results.datasets)})" + (
        f" + {len(bounded)} bounded-correction on {preset.ablation_dataset}" if bounded else "")
    c, a = preset.convergence, preset.ablation
    return Setup(
        machine=record.get("machine", {}),
        parameters=record.get("cases", {}).get("train/reshaped", {}).get("parameters"),
        processes=sorted(results.process_layouts()),
        budgets=[["1. convergence (+4. sampling, 6. diagnostics)", convergence_runs,
                  f"{c.steps} x {c.batch_size}", c.val_every, c.warmup_steps],
                 ["2. ablations, 3. encodings, 5. generative vs discriminative",
                  f"{len(ablation_variants(preset))} on {preset.ablation_dataset} (the twin: equal time)",
                  f"{a.steps} x {a.batch_size}", a.val_every, a.warmup_steps]])


TASK_NAMES = {"cost": "7. cost", "train": "training runs + their test evaluation", "sweep": "4. sampling sweep",
              "diagnostics": "6. diagnostics"}


@dataclass
class TimeSpent:
    rows: list[Cells]                    # per kind of task: minutes summed over tasks; then the total
    sessions: list[dict] = field(default_factory=list)  # the invocations that ran tasks (runner.SESSIONS_FILE)

    @property
    def wall_minutes(self) -> float:
        return sum(s["wall_seconds"] for s in self.sessions) / 60


def time_spent(results: Results) -> TimeSpent:
    spent = results.task_seconds()
    rows = [[TASK_NAMES.get(kind, kind), f"{seconds / 60:.1f}"] for kind, seconds in spent.items()]
    rows.append(["total", f"{sum(spent.values()) / 60:.1f}"])
    return TimeSpent(rows, results.sessions())
