"""The results page: reads every result file of a preset's output folder, writes results.md and its
figures. Nothing on the page is typed in by hand except the paper's own numbers (method.md section 5),
which are labelled as such. Each section also records a Verdict per claim of the paper it tests; the
summary table at the top of the page lists them.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np

from flowseg.checkpoint import write_atomically
from flowseg.encoding import ENCODINGS, build_encoding
from experiments import figures
from experiments.diagnostics import field_picture
from experiments.plan import (
    DISCRIMINATIVE, ENCODING_ROWS, PARAMETERIZATION_LABELS, REFERENCE, SCHEDULE_LABELS, TRANSFORM_LABELS, VANILLA,
    AblationGroup, ablation_groups, ablation_variants, bounded_variants, encoding_variant,
)
from experiments.presets import Preset
from experiments.results import (
    Results, constant_prediction_miou, judge, mean_sd, paired_differences, ratio, status_note, steps_to_reach,
)
from flowseg.objective import ObjectiveConfig

PAPER_SAMPLING = {1: 43.47, 2: 45.85, 5: 46.82, 10: 47.1, 20: 46.78, 50: 46.13, 100: 45.78}  # ADE20K mIoU
PAPER_SPEEDUP = 2.0
PAPER_ONE_STEP_SHARE = PAPER_SAMPLING[1] / PAPER_SAMPLING[10]
# "about 92%": within 5 points of it; a 1-step result above 10 steps is not what the paper reports
ONE_STEP_TOLERANCE = 0.05
FIELD_CLASSES = 6  # the 2-d Kronecker code drawn in the vector-field picture
REPRODUCE = """## Reproduce

    python -m experiments --preset quick --out runs/experiments-quick   # <= 15 min, 1 seed
    python -m experiments --preset full --out runs/experiments-full     # <= 100 min, 3 seeds

Each task writes OUT/results/<task>.json atomically and is skipped when that file exists, so running
the same command again after an interruption continues where it stopped (a training run resumes from
its last checkpoint). A run found in OUT that was made under other settings than the code now plans
(a config file or a default changed) stops the command with the differences listed: use a new OUT.
`--report-only` rewrites this page from OUT's results; `--ade20k ROOT` adds
experiment 1 on ADE20K-layout data; `--workers`, `--threads` set the processes and torch threads;
OUT/experiments.log holds the log of every run. Budgets are in experiments/presets.py."""


def t_draws(objective: ObjectiveConfig) -> str:
    """How the objective draws t in training, in words."""
    base = "t ~ U[0, 1]" if objective.t_sampling == "uniform" else "t = sigmoid(n), n ~ N(0, 1)"
    if objective.t_zero_fraction == 0:
        return base
    return f"t = 0 in {100 * objective.t_zero_fraction:g}% of the draws, otherwise {base}"


def objective_settings(objective: ObjectiveConfig) -> str:
    """The objective's settings that the ablations vary, in words."""
    return (f"{objective.kind} objective, T(d) = {TRANSFORM_LABELS[objective.transform]}, tau = {objective.tau:g}, "
            f"eps = {objective.eps:g}, lambda = {objective.lam:g}, {SCHEDULE_LABELS[objective.lam_schedule]}, "
            f"{PARAMETERIZATION_LABELS[objective.parameterization]}, {t_draws(objective)}")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class Verdict:
    claim: str
    paper: str
    here: str
    verdict: str


# ---- the sections --------------------------------------------------------------------------------


class Page:
    def __init__(self, results: Results, figures_dir: Path):
        self.r, self.p = results, results.preset
        self.figures_dir = figures_dir
        self.verdicts: list[Verdict] = []
        self.seeds = len(self.p.seeds)
        self._floors: dict[str, float] = {}

    def floor(self, dataset: str) -> float:
        """constant_prediction_miou of a dataset, computed once per page (it generates or reads the images)."""
        if dataset not in self._floors:
            self._floors[dataset] = constant_prediction_miou(dataset, self.p, self.r.roots.get(dataset))
        return self._floors[dataset]

    def figure(self, name: str) -> Path:
        return self.figures_dir / name

    def link(self, name: str, caption: str) -> str:
        return f"![{caption}]({self.figures_dir.name}/{name})"

    # 1 -------------------------------------------------------------------------------------------
    def convergence(self) -> str:
        rows, curves = [], {}
        for dataset in self.r.datasets:
            vanilla, reshaped = (self.r.by_seed("train", dataset, name, "convergence") for name in (VANILLA, REFERENCE))
            seeds = [s for s in self.p.seeds if s in vanilla and s in reshaped]
            if not seeds:
                rows.append([dataset] + ["n/a"] * 8)
                continue
            finals = {name: {s: runs[s]["curve"][-1]["miou"] for s in seeds}
                      for name, runs in (("vanilla", vanilla), ("reshaped", reshaped))}
            reach = {s: steps_to_reach(reshaped[s]["curve"], finals["vanilla"][s]) for s in seeds}
            speedups = [vanilla[s]["curve"][-1]["step"] / reach[s] for s in seeds if reach[s]]
            first = {s: reshaped[s]["curve"][0]["step"] for s in seeds}
            at_first = [s for s in seeds if reach[s] is not None and reach[s] <= first[s]]
            never = [s for s in seeds if reach[s] is None]
            speed_text = mean_sd(speedups, scale=1.0, digits=2) + "x" if speedups else "never"
            if at_first:
                speed_text += f" (>=, reached at the first validation in {len(at_first)} seed(s))"
            if never and speedups:
                speed_text += f"; not reached in {len(never)} seed(s)"
            gap = paired_differences(finals["reshaped"], finals["vanilla"])
            test_v = {s: vanilla[s]["test"]["miou"] for s in seeds}
            test_r = {s: reshaped[s]["test"]["miou"] for s in seeds}
            floor = self.floor(dataset)
            rows.append([dataset, mean_sd(list(finals["vanilla"].values())), mean_sd(list(finals["reshaped"].values())),
                         mean_sd(gap), mean_sd([reach[s] for s in seeds if reach[s]], 1.0, 0) if speedups else "never",
                         speed_text, mean_sd(list(test_v.values())), mean_sd(list(test_r.values())),
                         f"{100 * floor:.1f}"])
            steps = [point["step"] for point in vanilla[seeds[0]]["curve"]]
            curves[dataset] = {name: (steps, [[p["miou"] for p in runs[s]["curve"]] for s in seeds])
                               for name, runs in (("vanilla", vanilla), ("reshaped", reshaped))}
            self.verdicts.append(Verdict(f"{dataset}: reshaped beats vanilla at equal steps", "yes (ADE20K)",
                                         f"{mean_sd(gap)} mIoU points (test: {mean_sd(paired_differences(test_r, test_v))})",
                                         judge(paired_differences(test_r, test_v), self.seeds)))
            here = (f"{mean_sd(speedups, 1.0, 2)}x" if speedups else "never reached") + \
                (f" ({len(never)} of {len(seeds)} seeds never reached it)" if never and speedups else "")
            self.verdicts.append(Verdict(f"{dataset}: reshaped reaches vanilla's final mIoU about 2x sooner",
                                         f"{PAPER_SPEEDUP:g}x", here, self._speed_verdict(speedups, len(never), len(at_first))))
        bounded = self._bounded_correction(curves)
        if curves:
            figures.convergence_figure(curves, self.figure("convergence.png"))
        b = self.p.convergence
        return "\n\n".join([
            "## 1. Convergence: vanilla vs reshaped flow matching",
            f"Same model ({self.p.model_size}), data, seeds and schedule; {b.steps} steps of {b.batch_size} images, "
            f"validation mIoU on the first {self.p.val_samples} validation images every {b.val_every} steps "
            f"({self.p.eval_steps} Euler steps, EMA weights). *Steps to reach* is the first step at which the "
            "reshaped run's validation curve reaches the vanilla run's final validation mIoU (linear between "
            "validations); the speed-up is vanilla's step count over it. Test mIoU: "
            f"the first {self.p.eval_samples} test images; *constant prediction* is the mIoU of predicting the "
            "most frequent class everywhere on them, the floor a model has to clear.",
            markdown_table(["dataset", "vanilla final val mIoU", "reshaped final val mIoU", "gap (points)",
                            "steps to reach vanilla's final", "speed-up", "vanilla test mIoU", "reshaped test mIoU",
                            "constant prediction test mIoU"], rows),
            self.link("convergence.png", "validation mIoU against training steps"),
            *bounded,
        ])

    def _bounded_correction(self, curves: dict) -> list[str]:
        """The reshaped objective with its correction bounded (objective.correction_clip, not in the paper) at
        the convergence budget on the ablation dataset, against vanilla and the reference run of the same
        seeds; adds its curves to `curves`. Returns the page's paragraph and table (none without runs)."""
        dataset = self.p.ablation_dataset
        vanilla, reshaped = (self.r.by_seed("train", dataset, name, "convergence") for name in (VANILLA, REFERENCE))
        rows = []
        for variant, c in bounded_variants(self.p).items():
            bounded = self.r.by_seed("train", dataset, variant, "convergence")
            seeds = [s for s in self.p.seeds if s in bounded and s in vanilla and s in reshaped]
            if not seeds:
                continue
            test = {name: {s: runs[s]["test"]["miou"] for s in seeds}
                    for name, runs in (("bounded", bounded), ("reshaped", reshaped), ("vanilla", vanilla))}
            label = "reshaped, unbounded correction" if c is None else f"reshaped, correction <= {c:g}"
            rows.append([label, mean_sd([bounded[s]["curve"][-1]["miou"] for s in seeds]),
                         mean_sd(list(test["bounded"].values())),
                         mean_sd(paired_differences(test["bounded"], test["reshaped"])),
                         mean_sd(paired_differences(test["bounded"], test["vanilla"])), len(seeds)])
            if dataset in curves:
                steps = [point["step"] for point in bounded[seeds[0]]["curve"]]
                curves[dataset][label] = (steps, [[p["miou"] for p in bounded[s]["curve"]] for s in seeds])
        if not rows:
            return []
        return [
            f"**Bounded correction** ({dataset}, same budget and seeds; not in the paper): the reshaped objective "
            "with each pixel's correction lambda * dPhi/dx1_hat scaled down to a norm of at most c "
            "(`objective.correction_clip`; the default, and the paper's target, is unbounded). Differences are "
            "paired by seed, in test mIoU points.",
            markdown_table(["run", "final val mIoU", "test mIoU", "vs reshaped (points)", "vs vanilla (points)",
                            "seeds"], rows),
        ]

    @staticmethod
    def _speed_verdict(speedups: list[float], never: int, at_first: int) -> str:
        if not speedups:
            return "disagrees: reshaped never reached vanilla's final mIoU"
        mean = statistics.mean(speedups)
        if never:
            return "disagrees in some seeds (never reached)"
        if at_first == len(speedups):
            return "inconclusive: reached at the first validation (validate earlier or train longer)"
        if mean >= 0.8 * PAPER_SPEEDUP:
            return "agrees"
        return "partly: faster, by less than the paper's 2x" if mean > 1 else "disagrees"

    # 2 -------------------------------------------------------------------------------------------
    def ablations(self) -> str:
        dataset = self.p.ablation_dataset
        reference = self.r.test_miou(dataset, REFERENCE, "ablation")
        parts = ["## 2. Ablations",
                 f"{dataset}, {self.p.ablation.steps} steps of {self.p.ablation.batch_size} images per run; test mIoU "
                 f"(%) on the first {self.p.eval_samples} test images, {self.p.eval_steps} Euler steps. Each group "
                 f"changes one setting of the reference run ({objective_settings(ObjectiveConfig())}; flowseg's "
                 "defaults; image conditioning on). The paper's numbers are ADE20K "
                 "mIoU with its short schedule: compare orderings, not values. Predicting the most frequent class "
                 f"everywhere scores {100 * self.floor(dataset):.1f} on these images."]
        bars = []
        for group in ablation_groups(self.p):
            values = {row.label: self.r.test_miou(dataset, row.variant, "ablation") for row in group.rows}
            table = []
            for row in group.rows:
                runs = self.r.runs(dataset, row.variant, "ablation")
                note = status_note(runs)
                table.append([row.label, mean_sd(list(values[row.label].values())),
                              "" if row.paper is None else f"{row.paper:.2f}", note])
                bars.append((f"{group.title.split(' (')[0]}: {row.label}",
                             [v for v in values[row.label].values() if v is not None]))
            parts += [f"**{group.title}** (paper: {group.claim})",
                      markdown_table(["setting", "test mIoU (%)", "paper mIoU (ADE20K)", "note"], table)]
            self._ablation_verdict(group, values)
        finite = [v for v in reference.values() if v is not None]
        if finite:
            figures.ablation_figure(bars, statistics.mean(finite), self.figure("ablations.png"))
            parts.append(self.link("ablations.png", "ablation test mIoU"))
        return "\n\n".join(parts)

    def _ablation_verdict(self, group: AblationGroup, values: dict[str, dict[int, float | None]]) -> None:
        rows = group.rows
        if group.judged == "order":
            means = {row.label: np.mean([v for v in values[row.label].values() if v is not None] or [np.nan])
                     for row in rows}
            order = sorted(means, key=lambda label: -means[label] if math.isfinite(means[label]) else math.inf)
            paper = [row.label for row in rows]
            if len(set(means.values())) == 1:
                verdict = "no difference"
            else:
                verdict = "agrees" if order == paper else (f"partly: {paper[0]} is best" if order[0] == paper[0]
                                                           else "disagrees")
            self.verdicts.append(Verdict(f"{group.title} ordering", " > ".join(paper), " > ".join(order),
                                         verdict + ("" if self.seeds > 1 else " (1 seed)")))
        elif group.judged == "pair":
            diffs = paired_differences(values[rows[0].label], values[rows[1].label])
            self.verdicts.append(Verdict(f"{rows[0].label} beats {rows[1].label}", group.claim,
                                         f"{mean_sd(diffs)} mIoU points", judge(diffs, self.seeds)))

    # 3 -------------------------------------------------------------------------------------------
    def encodings(self) -> str:
        dataset = self.p.ablation_dataset
        classes = self.r.runs(dataset, REFERENCE, "ablation")
        num_classes = len(classes[0]["test"]["iou"]) if classes and classes[0]["status"] == "done" else 11
        trained = []
        values = {}
        for name in ENCODING_ROWS:
            encoding = build_encoding(name, num_classes)
            values[name] = self.r.test_miou(dataset, encoding_variant(name), "ablation")
            trained.append([name, encoding.dim, f"{encoding.min_spacing():.3f}",
                            mean_sd(list(values[name].values())),
                            status_note(self.r.runs(dataset, encoding_variant(name), "ablation"))])
        spacing = []
        for name in ENCODINGS:
            cells = []
            for count in self.p.spacing_class_counts:
                try:
                    encoding = build_encoding(name, count)
                    cells.append(f"{encoding.min_spacing():.3f} (d={encoding.dim})")
                except ValueError as error:  # e.g. the lattice holds at most 216 classes
                    cells.append(f"n/a: {error}")
            spacing.append([name, *cells])
        kronecker = values["kronecker"]
        against = {name: paired_differences(kronecker, values[name]) for name in ENCODING_ROWS[1:]}
        verdicts = {name: judge(diffs, self.seeds) for name, diffs in against.items()}
        worse = [name for name, verdict in verdicts.items() if verdict.startswith("disagrees")]
        unclear = [name for name, verdict in verdicts.items() if not verdict.startswith(("agrees", "disagrees"))]
        overall = "disagrees" if worse else ("inconclusive" if unclear else "agrees")
        self.verdicts.append(Verdict(
            "the Kronecker code beats the baselines", "yes (comparison set not recoverable)",
            "; ".join(f"vs {name}: {mean_sd(diffs)}" for name, diffs in against.items()) + " mIoU points",
            overall + (f" (worse than {', '.join(worse)})" if worse else "") + ("" if self.seeds > 1 else " (1 seed)")))
        return "\n\n".join([
            "## 3. Category encodings",
            f"{dataset} ({num_classes} classes), the reference run with only the encoding changed, same budget. "
            "For d != 3, x_0 is the image under flowseg.flow's fixed channel map. Minimum spacing is "
            "min_{j != k} ||mu_j - mu_k|| (centroids in [-1, 1]^d; the random code's as drawn with seed 0, each "
            "run draws its own from its training seed).",
            markdown_table(["encoding", "d", "min spacing", "test mIoU (%)", "note"], trained),
            "Minimum centroid spacing by class count (the benchmarks' N: Cityscapes 19, ADE20K 150, COCO-Stuff 171):",
            markdown_table(["encoding", *(f"N = {n}" for n in self.p.spacing_class_counts)], spacing),
        ])

    # 4 -------------------------------------------------------------------------------------------
    def sampling(self) -> str:
        sweeps = self.r.by_seed("sweep", self.p.ablation_dataset, REFERENCE, "convergence")
        head = ["## 4. Sampling steps"]
        if not sweeps:
            return "\n\n".join(head + ["No sweep result (the run diverged or has not run)."])
        euler = {s: [r["miou"] for sweep in sweeps.values() for r in sweep["euler"] if r["steps"] == s]
                 for s in self.p.euler_sweep}
        heun = {s: [r["miou"] for sweep in sweeps.values() for r in sweep["heun"] if r["steps"] == s]
                for s in self.p.heun_sweep}
        reference = statistics.mean(euler[self.p.eval_steps])
        rows = []
        for steps in sorted(set(self.p.euler_sweep) | set(self.p.heun_sweep)):
            paper = PAPER_SAMPLING.get(steps)
            rows.append([steps, mean_sd(euler.get(steps, [])),
                         f"{ratio(statistics.mean(euler[steps]), reference):.3f}" if steps in euler else "",
                         mean_sd(heun.get(steps, [])),
                         "" if paper is None else f"{paper:.2f}",
                         "" if paper is None else f"{paper / PAPER_SAMPLING[10]:.3f}"])
        figures.sampling_figure(euler, heun, PAPER_SAMPLING, self.p.eval_steps, self.figure("sampling_steps.png"))
        best = max(euler, key=lambda s: statistics.mean(euler[s]))
        one_share = ratio(statistics.mean(euler[1]), reference) if 1 in euler else math.nan
        gain = 100 * (statistics.mean(euler[best]) - reference)
        self.verdicts.append(Verdict(f"{self.p.eval_steps} Euler steps are best", "10 best (47.1)",
                                     f"best: {best} steps (+{gain:.1f} points over {self.p.eval_steps})", "agrees" if best == self.p.eval_steps else "disagrees"))
        self.verdicts.append(Verdict("1 Euler step gives ~92% of the 10-step mIoU",
                                     f"{100 * PAPER_ONE_STEP_SHARE:.1f}%", f"{100 * one_share:.1f}%",
                                     "not measured" if math.isnan(one_share) else
                                     "agrees" if abs(one_share - PAPER_ONE_STEP_SHARE) <= ONE_STEP_TOLERANCE
                                     else "disagrees"))
        images = next(iter(sweeps.values()))["images"]
        return "\n\n".join(head + [
            f"The reference model of experiment 1 on {self.p.ablation_dataset}, the first {images} test images, "
            f"EMA weights. 'rel.' is relative to {self.p.eval_steps} Euler steps. Heun makes 2 network calls per step.",
            markdown_table(["steps", "Euler mIoU (%)", "rel.", "Heun mIoU (%)", "paper Euler (ADE20K)", "paper rel."],
                           rows),
            self.link("sampling_steps.png", "mIoU against sampler steps"),
        ])

    # 5 -------------------------------------------------------------------------------------------
    def generative_vs_discriminative(self) -> str:
        dataset = self.p.ablation_dataset
        rows, values = [], {}
        params = {}
        if self.r.cost:
            params = {"flow": self.r.cost["cases"]["train/reshaped"]["parameters"],
                      "discriminative": self.r.cost["cases"]["train/discriminative"]["parameters"]}
        for label, variant, kind in (("generative (reshaped flow)", REFERENCE, "flow"),
                                     ("discriminative twin (cross-entropy)", DISCRIMINATIVE, "discriminative")):
            runs = self.r.runs(dataset, variant, "ablation")
            done = [r for r in runs if r["status"] == "done"]
            values[kind] = self.r.test_miou(dataset, variant, "ablation")
            rows.append([label, f"{params.get(kind, 0) / 1e6:.2f} M",
                         mean_sd([r["steps"] for r in done], 1.0, 0), mean_sd([r["train_seconds"] for r in done], 1.0, 1),
                         mean_sd(list(values[kind].values())), status_note(runs)])
        diffs = paired_differences(values["flow"], values["discriminative"])
        self.verdicts.append(Verdict("generative >= discriminative at equal size and training time",
                                     "FlowSeg 47.1 vs SegFormer-B2 46.5 (other architectures)",
                                     f"{mean_sd(diffs)} mIoU points", judge(diffs, self.seeds)))
        return "\n\n".join([
            "## 5. Generative vs discriminative",
            f"{dataset}: the reference flow model and its discriminative twin (same trunk and field decoder, N "
            "logits, cross-entropy). Equal training time: the twin's step budget is the flow run's times the "
            "ratio of their measured seconds per training step (experiment 7 of this run). Training seconds "
            "are wall time including periodic validation; test mIoU as in experiment 2 (the twin needs no sampler).",
            markdown_table(["model", "parameters", "steps", "training s", "test mIoU (%)", "note"], rows),
        ])

    # 6 -------------------------------------------------------------------------------------------
    def diagnostics(self) -> str:
        dataset = self.p.ablation_dataset
        diag = {name: self.r.by_seed("diagnostics", dataset, name, "convergence") for name in (VANILLA, REFERENCE)}
        parts = ["## 6. Diagnostics of the two failure modes"]
        if not all(diag.values()):
            return "\n\n".join(parts + ["No diagnostics result (a run diverged or has not run)."])
        labels = {VANILLA: "vanilla", REFERENCE: "reshaped"}
        profiles, near, rows = {}, {}, []
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
            rows.append([labels[name], f"{finals[0]['near_radius']:.3f}", mean_sd([f["near_fraction"] for f in finals]),
                         mean_sd([f["near_signal"] for f in finals], 1.0, 3)])
        figures.signal_figure(profiles, near, self.figure("signal.png"))
        near_ratio = [ratio(r_["signal"][-1]["near_signal"], v_["signal"][-1]["near_signal"])
                      for s, r_ in diag[REFERENCE].items() for s2, v_ in diag[VANILLA].items() if s == s2]
        self.verdicts.append(Verdict("near its centroid the reshaped signal stays strong (vanilla's fades)",
                                     "yes (gradient vanishing)", f"reshaped / vanilla near-centroid signal: "
                                     f"{mean_sd(near_ratio, 1.0, 2)}x",
                                     judge([math.log(x) for x in near_ratio if x > 0], self.seeds)))
        steps = next(iter(diag[REFERENCE].values()))["sampler_steps"]
        times = list(np.linspace(0, 1, steps + 1))
        third, wrong, trav_rows = {}, {}, []
        sources = [("vanilla", diag[VANILLA], "traversal"), ("reshaped", diag[REFERENCE], "traversal"),
                   ("straight path", diag[REFERENCE], "straight_traversal")]
        for label, by_seed, field in sources:
            stats = [r[field] for r in by_seed.values()]
            third[label] = [s["third_class_by_state"] for s in stats]
            wrong[label] = [s["wrong_by_state"] for s in stats]
            trav_rows.append([label, mean_sd([s["traversed"] for s in stats]), mean_sd([s["ends_wrong"] for s in stats])])
        figures.traversal_figure(third, wrong, times, self.figure("traversal.png"))
        trav_diff = [v["traversal"]["traversed"] - r["traversal"]["traversed"]
                     for s, r in diag[REFERENCE].items() for s2, v in diag[VANILLA].items() if s == s2]
        self.verdicts.append(Verdict("reshaped trajectories traverse other classes less", "yes (trajectory traversing)",
                                     f"vanilla - reshaped traversing share: {mean_sd(trav_diff)} points",
                                     judge(trav_diff, self.seeds)))
        encoding = build_encoding("kronecker", FIELD_CLASSES, dim=2)
        true_class = int(encoding.centroids.norm(dim=1).argmin())
        picture = field_picture(encoding, true_class)
        figures.field_figure(picture, self.figure("vector_field.png"))
        xs, ys = np.meshgrid(picture.grid, picture.grid)  # [y, x] like the fields
        radius = np.hypot(xs - picture.centroids[true_class, 0], ys - picture.centroids[true_class, 1])
        ring = (radius > 0.05) & (radius < 0.15)
        near_gain = np.hypot(*picture.reshaped)[ring].mean() / np.hypot(*picture.vanilla)[ring].mean()
        images = next(iter(diag[REFERENCE].values()))["images"]
        return "\n\n".join(parts + [
            f"From the {dataset} runs of experiment 1, on the first {images} test images.",
            "**(a) Gradient vanishing.** The per-pixel training signal ||v_target - v_theta|| (half the norm of "
            "the loss gradient with respect to the network output) against the clean estimate's distance to its "
            f"true centroid, ||x1_hat - mu_true||, t drawn as in training ({t_draws(ObjectiveConfig())}), each "
            "model with its own objective and its raw "
            "(not EMA) weights at every checkpoint. 'Near' means closer than a quarter of the minimum centroid "
            "spacing. For vanilla flow matching this signal is exactly ||x1_hat - x_1|| / (1 - t).",
            markdown_table(["objective", "near radius", "share of pixels near (%)", "mean near-centroid signal (end)"],
                           rows),
            self.link("signal.png", "training signal against distance"),
            f"**(b) Trajectory traversing.** {steps}-step Euler trajectories of the final EMA models; every state "
            "is decoded to its nearest centroid. *Traversing*: some intermediate state lies nearest to a third "
            "class (neither the true class nor the one the image colour x_0 starts in). The straight path is "
            "x_t = (1 - t) x_0 + t x_1 at the same times: what a perfectly learned vanilla field does.",
            markdown_table(["trajectories", "traversing (% of valid pixels)", "ending in a wrong class (%)"],
                           trav_rows),
            self.link("traversal.png", "share of pixels in a third or wrong class along the trajectories"),
            f"**Vector fields** (analytic, in the manner of the paper's Figure 1): a {FIELD_CLASSES}-class 2-d Kronecker "
            "code; at every clean estimate x, the velocity error the loss drives to zero for a pixel of the starred "
            "class, vanilla (mu_k - x) / (1 - t) and reshaped with the detached correction of the default "
            f"objective (T(d) = {TRANSFORM_LABELS[picture.objective.transform]}, tau = {picture.objective.tau:g}, "
            f"eps = {picture.objective.eps:g}, lambda = {picture.objective.lam:g}), at t = {picture.t:g}. The vanilla "
            "field fades linearly towards mu_k and ignores the other centroids; the "
            "reshaped one repels from the other centroids, and at 0.05 to 0.15 from mu_k it is on average "
            f"{near_gain:.1f}x as strong as the vanilla one.",
            self.link("vector_field.png", "vanilla and reshaped target fields"),
        ])

    # 7 -------------------------------------------------------------------------------------------
    def cost(self) -> str:
        cost = self.r.cost
        if cost is None:
            return "## 7. Cost\n\nNo cost result."
        cases = cost["cases"]
        rows = []
        for name, case in cases.items():
            reference = cases[cost["train_reference"] if name.startswith("train/") else cost["infer_reference"]]
            rows.append([name, f"{case['seconds_per_call'] * 1000:.1f}", f"{case['images_per_second']:.1f}",
                         f"{ratio(case['images_per_second'], reference['images_per_second']):.2f}",
                         f"{case['peak_memory_mib']:.1f}",
                         f"{ratio(case['peak_memory_mib'], reference['peak_memory_mib']):.2f}"])
        train = {n: c["images_per_second"] for n, c in cases.items() if n.startswith("train/")}
        overhead = train["train/vanilla"] / train["train/reshaped"] - 1
        return "\n\n".join([
            "## 7. Cost",
            f"One run, {cost['device']}, {cost['machine']['torch_threads']} thread(s), batch {cost['batch_size']} of "
            f"{cost['image_size']}x{cost['image_size']}, {cost['model_size']}; median over "
            f"{self.p.cost_rounds} interleaved rounds of {self.p.cost_steps} calls. Ratios: training cases against "
            f"{cost['train_reference']}, inference cases against {cost['infer_reference']}. Peak memory: growth of the "
            "process's peak resident set (CPU) or of torch's peak allocation (CUDA) while building the case and "
            "making one call. The reshaped objective's correction costs "
            f"{100 * overhead:+.1f}% training time against vanilla here.",
            markdown_table(["case", "ms per call", "images/s", "throughput ratio", "peak MiB", "memory ratio"], rows),
        ])

    # summary, set-up, time ------------------------------------------------------------------------
    def summary(self) -> str:
        rows = [[v.claim, v.paper, v.here, v.verdict] for v in self.verdicts]
        disagreements = [v.claim for v in self.verdicts if v.verdict.startswith(("disagrees", "partly"))]
        plain = ("Where this run disagrees with the paper: " + "; ".join(disagreements) + "." if disagreements
                 else "No claim is contradicted by this run.")
        dataset = self.p.ablation_dataset
        scale = (f"At this budget the reference model scores {mean_sd(list(self.r.test_miou(dataset, REFERENCE, 'ablation').values()))} "
                 f"test mIoU on {dataset}, against {100 * self.floor(dataset):.1f} for predicting "
                 "the most frequent class everywhere: read the differences below with that in mind.")
        return "\n\n".join([
            "## Summary: the paper's claims against this run",
            f"Verdicts compare directions and orderings, at a scale far below the paper's (ADE20K, 512 px, ~0.5 B "
            f"parameters). With one seed a verdict is a single observation; with several, 'inconclusive' means "
            "the mean difference lies within two standard errors of zero. " + scale + " " + plain,
            markdown_table(["claim", "paper", "here", "verdict"], rows),
        ])

    def setup(self, command: str) -> str:
        cost = self.r.cost or {}
        m = cost.get("machine", {})
        params = cost.get("cases", {}).get("train/reshaped", {}).get("parameters")
        p = self.p
        budgets = markdown_table(
            ["experiment", "runs per seed", "steps x batch", "validation every", "warm-up"],
            [["1. convergence (+4. sampling, 6. diagnostics)", f"2 per dataset ({', '.join(self.r.datasets)})"
              + (f" + {len(bounded_variants(p))} bounded-correction on {p.ablation_dataset}" if bounded_variants(p) else ""),
              f"{p.convergence.steps} x {p.convergence.batch_size}", p.convergence.val_every, p.convergence.warmup_steps],
             ["2. ablations, 3. encodings, 5. generative vs discriminative",
              f"{len(ablation_variants(p))} on {p.ablation_dataset} (the twin: equal time)",
              f"{p.ablation.steps} x {p.ablation.batch_size}", p.ablation.val_every, p.ablation.warmup_steps]])
        return "\n\n".join([
            "## Set-up",
            f"- Command: `{command}`",
            f"- Preset: **{p.name}** (sized for <= {p.minutes_target:g} min on 2 CPU cores); seeds: "
            f"{', '.join(map(str, p.seeds))}",
            f"- Hardware: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, GPU: {m.get('gpu') or 'none'}; "
            f"torch {m.get('torch', '?')}; Python {m.get('python', '?')}; processes: "
            + ", ".join(f"{w} worker(s) x {t} thread(s)" for w, t in sorted(self.r.process_layouts())),
            f"- Model: {p.model_size} ({params / 1e6:.2f} M parameters), {p.image_size}x{p.image_size} images, "
            f"AdamW lr {p.lr:g} with warm-up and cosine decay, EMA 0.999, no augmentation (generated data is "
            f"endless), PixNerd's linear patch embedding (`model.stem=patch`), no token loss "
            f"(`model.token_loss_weight=0`), each encoding at its default dimension (`model.dim=null`: d = 3 "
            f"for the Kronecker code), {t_draws(ObjectiveConfig())}"
            if params else f"- Model: {p.model_size}",
            "- Evaluation: dataset-level mIoU from one confusion matrix (ignore label excluded), EMA weights, "
            f"one pass per image (`eval.grid_shifts=1`), {p.eval_steps} Euler steps unless stated.",
            budgets,
        ])

    def time_spent(self) -> str:
        names = {"cost": "7. cost", "train": "training runs + their test evaluation", "sweep": "4. sampling sweep",
                 "diagnostics": "6. diagnostics"}
        spent = self.r.task_seconds()
        rows = [[names.get(kind, kind), f"{seconds / 60:.1f}"] for kind, seconds in spent.items()]
        rows.append(["total", f"{sum(spent.values()) / 60:.1f}"])
        sessions = self.r.sessions()
        wall = (f"Wall time: **{sum(s['wall_seconds'] for s in sessions) / 60:.1f} min** over {len(sessions)} "
                "invocation(s) that ran tasks (" + "; ".join(
                    f"{s['tasks']} tasks in {s['wall_seconds'] / 60:.1f} min with {s['workers']} worker(s)"
                    for s in sessions) + "), page generation not included.") if sessions else ""
        return "\n\n".join(["## Time spent", wall, "Time per kind of task, summed over tasks (worker processes run "
                             "side by side, so these add up to more than the wall time):",
                             markdown_table(["tasks", "minutes"], rows)])


def write_report(preset: Preset, out: Path, page_path: Path, command: str, ade20k_root: str | None = None) -> Path:
    """Write page_path (markdown) and its figures into page_path's folder / figures/."""
    figures_dir = page_path.parent / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    page = Page(Results(preset, out, ade20k_root), figures_dir)
    sections = [page.convergence(), page.ablations(), page.encodings(), page.sampling(),
                page.generative_vs_discriminative(), page.diagnostics(), page.cost()]
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = "\n\n".join([
        "# Results: the paper's claims at small scale",
        f"Generated {stamp} by `{command}`. Every number and figure on this page comes from the result files "
        f"(one JSON per task) that the invocations listed under *Time spent* wrote into {out}, or is computed "
        "from the data by this command; only the columns marked *paper* quote arXiv 2603.19218.",
        page.setup(command), page.summary(), *sections, page.time_spent(), REPRODUCE,
    ]) + "\n"
    write_atomically(page_path, text)
    return page_path
