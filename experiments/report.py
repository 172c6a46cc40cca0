"""The results page: every result file of a preset's output folder -> findings (findings.py) -> the
figures and the page's Markdown, the prose of which lives in templates/results.md. Nothing on the page is
typed in by hand except the paper's own numbers (verdicts.py; docs/method.md, section 5), which are
labelled as such.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from string import Template
from typing import Sequence

from experiments import figures, findings
from experiments.plan import PARAMETERIZATION_LABELS, SCHEDULE_LABELS, TRANSFORM_LABELS
from experiments.presets import Preset
from experiments.results import Results
from experiments.verdicts import PAPER_SAMPLING
from flowseg.checkpoint import write_atomically
from flowseg.objective import ObjectiveConfig

TEMPLATE = Path(__file__).parent / "templates" / "results.md"
FIGURES_DIR = "figures"  # beside the page; the template's image links point into it
BLOCK_START = re.compile(r"^<!-- ([a-z][a-z :]*) -->$", re.MULTILINE)


def read_blocks(path: Path = TEMPLATE) -> dict[str, Template]:
    """The template's blocks by name: each runs from its `<!-- name -->` line to the next one."""
    parts = BLOCK_START.split(path.read_text())  # [preamble, name, text, name, text, ...]
    return {name: Template(text.strip("\n")) for name, text in zip(parts[1::2], parts[2::2])}


def table_rows(rows: Sequence[Sequence[object]]) -> str:
    """Markdown table rows, below a header row and rule written in the template."""
    return "\n".join("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows)


def t_draws(objective: ObjectiveConfig) -> str:
    """How the objective draws t in training, in words."""
    base = "t ~ U[0, 1]"
    if objective.t_zero_fraction == 0:
        return base
    return f"t = 0 in {100 * objective.t_zero_fraction:g}% of the draws, otherwise {base}"


def objective_settings(objective: ObjectiveConfig) -> str:
    """The objective's settings that the ablations vary, in words."""
    return (f"{objective.kind} objective, T(d) = {TRANSFORM_LABELS[objective.transform]}, tau = {objective.tau:g}, "
            f"eps = {objective.eps:g}, lambda = {objective.lam:g}, {SCHEDULE_LABELS[objective.lam_schedule]}, "
            f"{PARAMETERIZATION_LABELS[objective.parameterization]}, {t_draws(objective)}")


@dataclass
class Page:
    """Fills the template's blocks from the findings and draws the figures into figures_dir."""
    blocks: dict[str, Template]
    preset: Preset
    figures_dir: Path

    def fill(self, block: str, **values: object) -> str:
        return self.blocks[block].substitute(values).rstrip()

    def setup(self, found: findings.Setup, command: str) -> str:
        p, m = self.preset, found.machine
        model = self.fill("model: no cost result", model_size=p.model_size) if found.parameters is None else \
            self.fill("model", model_size=p.model_size, parameters=f"{found.parameters / 1e6:.2f}",
                      image_size=p.image_size, lr=f"{p.lr:g}", t_draws=t_draws(ObjectiveConfig()))
        processes = ", ".join(f"{w} worker(s) x {t} thread(s)" for w, t in found.processes)
        return self.fill(
            "setup", command=command, preset=p.name, minutes=f"{p.minutes_target:g}",
            seeds=", ".join(map(str, p.seeds)), cpu=m.get("cpu", "?"), cores=m.get("cores", "?"),
            gpu=m.get("gpu") or "none", torch=m.get("torch", "?"), python=m.get("python", "?"), processes=processes,
            model=model, eval_steps=p.eval_steps, budgets=table_rows(found.budgets))

    def summary(self, found: findings.Summary) -> str:
        disagreements = self.fill("disagreements", claims="; ".join(found.disagreements)) if found.disagreements \
            else self.fill("no disagreement")
        return self.fill("summary", reference=found.reference, dataset=self.preset.ablation_dataset,
                         floor=f"{100 * found.floor:.1f}", disagreements=disagreements, rows=table_rows(found.rows))

    def convergence(self, found: findings.Convergence) -> str:
        p, b = self.preset, self.preset.convergence
        if found.curves:
            figures.convergence_figure(found.curves, self.figures_dir / "convergence.png")
        bounded = self.fill("bounded correction", dataset=p.ablation_dataset, rows=table_rows(found.bounded_rows)) \
            if found.bounded_rows else ""
        return self.fill("convergence", model_size=p.model_size, steps=b.steps, batch_size=b.batch_size,
                         val_samples=b.val_samples, val_every=b.val_every, eval_steps=p.eval_steps,
                         eval_samples=p.eval_samples, rows=table_rows(found.rows), bounded=bounded)

    def ablations(self, found: findings.Ablations, floor: float) -> str:
        p = self.preset
        groups = "\n\n".join(self.fill("ablation group", title=t.title, claim=t.claim, rows=table_rows(t.rows))
                             for t in found.tables)
        figure = ""
        if found.reference is not None:
            figures.ablation_figure(found.bars, found.reference, self.figures_dir / "ablations.png")
            figure = self.fill("ablations figure")
        return self.fill("ablations", dataset=p.ablation_dataset, steps=p.ablation.steps,
                         batch_size=p.ablation.batch_size, eval_samples=p.eval_samples, eval_steps=p.eval_steps,
                         reference_settings=objective_settings(ObjectiveConfig()), floor=f"{100 * floor:.1f}",
                         groups=groups, figure=figure)

    def encodings(self, found: findings.Encodings) -> str:
        counts = self.preset.spacing_class_counts
        return self.fill("encodings", dataset=self.preset.ablation_dataset, num_classes=found.num_classes,
                         trained=table_rows(found.trained), count_headers=" | ".join(f"N = {n}" for n in counts),
                         count_rule="---|" * len(counts), spacing=table_rows(found.spacing))

    def sampling(self, found: findings.Sampling | None) -> str:
        if found is None:
            return self.fill("sampling: no result")
        p = self.preset
        figures.sampling_figure(found.euler, found.heun, PAPER_SAMPLING, p.eval_steps,
                                self.figures_dir / "sampling_steps.png")
        return self.fill("sampling", dataset=p.ablation_dataset, images=found.images, eval_steps=p.eval_steps,
                         rows=table_rows(found.rows))

    def generative_vs_discriminative(self, found: findings.GenerativeVsDiscriminative) -> str:
        return self.fill("generative vs discriminative", dataset=self.preset.ablation_dataset,
                         rows=table_rows(found.rows))

    def diagnostics(self, found: findings.Diagnostics | None) -> str:
        if found is None:
            return self.fill("diagnostics: no result")
        figures.signal_figure(found.profiles, found.near, self.figures_dir / "signal.png")
        figures.traversal_figure(found.third, found.wrong, found.times, self.figures_dir / "traversal.png")
        figures.field_figure(found.picture, self.figures_dir / "vector_field.png")
        objective = found.picture.objective
        return self.fill(
            "diagnostics", dataset=self.preset.ablation_dataset, images=found.images,
            t_draws=t_draws(ObjectiveConfig()), signal_rows=table_rows(found.signal_rows), steps=found.sampler_steps,
            traversal_rows=table_rows(found.traversal_rows), field_classes=findings.FIELD_CLASSES,
            transform=TRANSFORM_LABELS[objective.transform], tau=f"{objective.tau:g}", eps=f"{objective.eps:g}",
            lam=f"{objective.lam:g}", t=f"{found.picture.t:g}", near_gain=f"{found.near_gain:.1f}",
            bound="no bound" if objective.correction_clip is None else f"bounded at {objective.correction_clip:g}")

    def cost(self, found: findings.Cost | None) -> str:
        if found is None:
            return self.fill("cost: no result")
        record = found.record
        return self.fill(
            "cost", device=record["device"], threads=record["machine"]["torch_threads"],
            batch_size=record["batch_size"], image_size=record["image_size"], model_size=record["model_size"],
            rounds=self.preset.cost_rounds, calls=self.preset.cost_steps, train_reference=record["train_reference"],
            infer_reference=record["infer_reference"], overhead=f"{100 * found.overhead:+.1f}",
            rows=table_rows(found.rows))

    def time_spent(self, found: findings.TimeSpent) -> str:
        sessions = "; ".join(self.fill("session", tasks=s["tasks"], minutes=f"{s['wall_seconds'] / 60:.1f}",
                                       workers=s["workers"]) for s in found.sessions)
        wall = self.fill("wall time", minutes=f"{found.wall_minutes:.1f}", count=len(found.sessions),
                         sessions=sessions) if found.sessions else ""
        return self.fill("time spent", wall=wall, rows=table_rows(found.rows))


def write_report(preset: Preset, out: Path, page_path: Path, command: str, ade20k_root: str | None = None) -> Path:
    """Write page_path (Markdown) and its figures into page_path's folder / FIGURES_DIR."""
    figures_dir = page_path.parent / FIGURES_DIR
    figures_dir.mkdir(parents=True, exist_ok=True)
    results = Results(preset, out, ade20k_root)
    page = Page(read_blocks(), preset, figures_dir)
    # the sections in page order; their verdicts make the summary, which the page shows first
    convergence, ablations = findings.convergence(results), findings.ablations(results)
    encodings, sampling = findings.encodings(results), findings.sampling(results)
    versus, diagnostics = findings.generative_vs_discriminative(results), findings.diagnostics(results)
    verdicts = [v for section in (convergence, ablations, encodings, sampling, versus, diagnostics)
                if section is not None for v in section.verdicts]
    text = page.fill(
        "page", stamp=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), command=command, out=out,
        setup=page.setup(findings.setup(results), command),
        summary=page.summary(findings.summary(results, verdicts)),
        convergence=page.convergence(convergence),
        ablations=page.ablations(ablations, results.floor(preset.ablation_dataset)),
        encodings=page.encodings(encodings), sampling=page.sampling(sampling),
        generative_vs_discriminative=page.generative_vs_discriminative(versus),
        diagnostics=page.diagnostics(diagnostics), cost=page.cost(findings.cost(results)),
        time_spent=page.time_spent(findings.time_spent(results))) + "\n"
    write_atomically(page_path, text)
    return page_path
