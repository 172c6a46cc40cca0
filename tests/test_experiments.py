"""experiments: diagnostics on cases with known answers, the plan, the page's arithmetic and verdict
rules, the page rendered from made-up result files, and the micro preset end to end (page, figures,
skip-on-resume). The numbers of a preset are not tested."""

import dataclasses
import functools
import json
import math
import random

import numpy as np
import pytest
import torch

from experiments import get_preset, plan, report, run_experiments
from experiments.diagnostics import (
    field_picture, measure_signal, pixel_signal, sampled_traversal, signal_profile, straight_traversal, traversal_stats,
)
from experiments.figures import COLOURS, curve_colours
from experiments.plan import CATEGORICAL, REFERENCE, VANILLA, ablation_groups, planned_runs, variants
from experiments.presets import Budget
from experiments.report import read_blocks, t_draws, write_report
from experiments.results import constant_prediction_miou, mean_sd, steps_to_reach
from experiments.runner import COST_KEY, SESSIONS_FILE, flat_settings, result_path
from experiments.verdicts import (
    all_of_verdict, best_steps_verdict, judge, one_step_verdict, order_verdict, speed_verdict,
)
from flowseg.config import load_config
from flowseg.data import build_dataset
from flowseg.encoding import IGNORE_INDEX, CategoryEncoding, build_encoding
from flowseg.objective import FlowMatchingObjective, ObjectiveConfig

# ---- (b) trajectory traversing ----------------------------------------------------------------


def test_traversal_counts_hand_worked_trajectories():
    # one row of 5 pixels, true class 0 everywhere but pixel 3 (ignored); 4 states each
    labels = torch.tensor([[[0, 0, 0, 255, 0]]])
    paths = [
        [2, 2, 0, 0],  # starts in a wrong cell, goes straight to the true one: no traversal
        [2, 1, 0, 0],  # passes through class 1 (a third class): traversal, ends right
        [0, 0, 3, 3],  # leaves the true cell for class 3 and stays: traversal, ends wrong
        [1, 1, 1, 1],  # ignore pixel: never counted
        [1, 1, 1, 1],  # stays in its starting (wrong) cell: no traversal, ends wrong
    ]
    decoded = torch.tensor(paths).T.reshape(4, 1, 1, 5)  # (S + 1, B, H, W)
    stats = traversal_stats(decoded, labels)
    assert stats.pixels == 4
    assert stats.traversed == 2 / 4
    assert stats.ends_wrong == 2 / 4
    # third class (neither true nor starting class) per state: pixel 2 at state 1, pixel 3 at states 2, 3
    assert stats.third_class_by_state == [0.0, 1 / 4, 1 / 4, 1 / 4]
    assert stats.wrong_by_state == [3 / 4, 3 / 4, 2 / 4, 2 / 4]


def test_traversal_ignores_the_final_state_and_the_start():
    labels = torch.zeros(1, 1, 1, dtype=torch.int64)
    # a third class only at the last state is "ends wrong", not a traversal before the end
    stats = traversal_stats(torch.tensor([2, 2, 0, 1]).view(4, 1, 1, 1), labels)
    assert (stats.traversed, stats.ends_wrong) == (0.0, 1.0)
    # one step: no intermediate state, nothing can be traversed
    assert traversal_stats(torch.tensor([2, 1]).view(2, 1, 1, 1), labels).traversed == 0.0


def line_encoding():
    """Four 2-d centroids: classes 0, 1, 2 on the x axis at 1, 0, -1; class 3 off it at (0, 1)."""
    return CategoryEncoding("line", torch.tensor([[1.0, 0.0], [0.0, 0.0], [-1.0, 0.0], [0.0, 1.0]]))


def image_at(points):
    """An image whose x_0 under the fixed d = 2 map ((R + B) / 2, G) is the given points, one per pixel."""
    xs = torch.tensor([p[0] for p in points])
    ys = torch.tensor([p[1] for p in points])
    return torch.stack([xs, ys, xs]).view(1, 3, 1, len(points))


def test_sampled_trajectory_through_a_third_cell_is_counted():
    encoding = line_encoding()
    # both start at x_0 = (-0.9, 0) in class 2's cell; pixel 0 heads for class 0 through class 1's cell
    # (|x| < 0.5), pixel 1 heads for class 1 itself: only pixel 0 traverses
    image = image_at([(-0.9, 0.0), (-0.9, 0.0)])
    labels = torch.tensor([[[0, 1]]])
    x0 = image[:, [0, 1]]
    x1 = encoding.encode(labels)

    def ideal_field(x, t, img):  # the exact straight-path velocity v* = x_1 - x_0
        return x1 - x0

    sampled = sampled_traversal(ideal_field, encoding, image, labels, steps=10)
    assert (sampled.traversed, sampled.ends_wrong) == (0.5, 0.0)
    straight = straight_traversal(encoding, image, labels, steps=10)
    assert (straight.traversed, straight.ends_wrong) == (0.5, 0.0)
    # a field that stops halfway (v = v*/2) leaves pixel 0 in class 1's cell: wrong at the end
    stalled = sampled_traversal(lambda x, t, img: 0.5 * (x1 - x0), encoding, image, labels, steps=10)
    assert stalled.ends_wrong == 0.5


# ---- (a) gradient vanishing ----------------------------------------------------------------------


def test_signal_profile_bins_by_hand():
    distance = torch.tensor([0.01, 0.01, 0.5, 5.0, 0.02])
    signal = torch.tensor([1.0, 3.0, 2.0, 4.0, 100.0])
    valid = torch.tensor([True, True, True, True, False])
    profile = signal_profile(distance, signal, valid, edges=[0.001, 0.1, 1.0, 2.0], near_radius=0.05)
    assert profile.counts == [2, 1, 1]  # 5.0 lies beyond the last edge: last bin; the invalid pixel is out
    assert profile.mean_signal == [2.0, 2.0, 4.0]
    assert profile.near_signal == 2.0 and profile.near_fraction == 0.5


def test_pixel_signal_closed_form_for_a_silent_model():
    # vanilla, v_theta = 0: signal = ||v*|| = ||x_1 - x_0||, x1_hat = x_t, distance = (1 - t) ||x_1 - x_0||
    encoding = build_encoding("kronecker", 7)
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(3, 3, 4, 5, generator=generator) * 2 - 1      # x_0 = image at d = 3
    labels = torch.randint(0, 7, (3, 4, 5), generator=generator)
    labels[0, 0, :2] = IGNORE_INDEX
    objective = FlowMatchingObjective(encoding, ObjectiveConfig(kind="vanilla", t_zero_fraction=0.0, x0_noise=0.0))  # t in (0, 1)
    found = pixel_signal(objective, lambda x, t, img: torch.zeros_like(x), image, labels)
    span = (encoding.encode(labels, ignore_fill=image) - image).norm(dim=1)  # 0 at ignore pixels
    assert torch.allclose(found.signal, span, atol=1e-6)
    assert torch.allclose(found.distance, (1 - found.t).view(-1, 1, 1) * span, atol=1e-6)
    assert torch.equal(found.valid, labels != IGNORE_INDEX)


def test_vanilla_signal_of_a_silent_model_is_the_path_length():
    # v_theta = 0: x1_hat = x_t, ||x1_hat - mu|| = (1 - t) ||x_1 - x_0|| and the vanilla signal is
    # ||v*|| = ||x_1 - x_0|| whatever t is: every bin's mean is that one number
    encoding = build_encoding("kronecker", 5)
    image = torch.full((2, 3, 4, 4), -0.2)
    labels = torch.full((2, 4, 4), 3, dtype=torch.int64)
    objective = FlowMatchingObjective(encoding, ObjectiveConfig(kind="vanilla", x0_noise=0.0))
    profile = measure_signal(objective, lambda x, t, img: torch.zeros_like(x), image, labels, draws=3,
                             progress=0.0, seed=0)
    expected = (encoding.centroids[3] + 0.2).norm().item()
    means = [m for m in profile.mean_signal if not math.isnan(m)]
    assert sum(profile.counts) == 3 * 2 * 16
    assert means and all(m == pytest.approx(expected, rel=1e-5) for m in means)


# ---- the vector-field picture ------------------------------------------------------------------


def test_field_picture_vanishes_at_the_true_centroid_and_pushes_away_from_the_other():
    encoding = CategoryEncoding("pair", torch.tensor([[-0.5, 0.0], [0.5, 0.0]]))
    picture = field_picture(encoding, true_class=0, t=0.5, extent=1.0, points=9)  # grid step 0.25
    column = {round(float(v), 3): i for i, v in enumerate(picture.grid)}
    at_true = (slice(None), column[0.0], column[-0.5])      # [component, y, x]
    assert abs(picture.vanilla[at_true]).max() == 0.0
    assert abs(picture.reshaped[at_true]).max() < 1e-2      # the fixed point of vanilla is kept
    between = (slice(None), column[0.0], column[0.25])       # on the axis, nearer the other centroid
    assert picture.vanilla[between][0] == pytest.approx(-0.75 / 0.5)
    # attraction to mu_0 and repulsion from mu_1 both point in -x: the reshaped pull is stronger
    assert picture.reshaped[between][0] < picture.vanilla[between][0]
    assert picture.reshaped[between][1] == pytest.approx(0.0, abs=1e-12)


def test_field_picture_uses_the_default_objective():
    encoding = build_encoding("kronecker", 6, dim=2)
    default = field_picture(encoding, true_class=0, points=9)
    assert default.objective == ObjectiveConfig()
    assert (default.reshaped == field_picture(encoding, 0, objective=ObjectiveConfig(), points=9).reshaped).all()
    other_tau = 2 * ObjectiveConfig().tau
    assert not (default.reshaped == field_picture(encoding, 0, objective=ObjectiveConfig(tau=other_tau),
                                                  points=9).reshaped).all()
    # the default's bound on each point's correction, which the unbounded one exceeds somewhere
    clip = ObjectiveConfig().correction_clip
    assert np.linalg.norm(default.reshaped - default.vanilla, axis=0).max() <= clip + 1e-9
    unbounded = field_picture(encoding, 0, objective=ObjectiveConfig(correction_clip=None), points=9)
    assert np.linalg.norm(unbounded.reshaped - unbounded.vanilla, axis=0).max() > clip


# ---- the plan follows the library's defaults -----------------------------------------------------


def group(preset, title):
    return next(g for g in ablation_groups(preset) if g.title == title)


def test_ablations_vary_one_setting_of_the_default_objective():
    micro = get_preset("micro")
    table = variants(micro)
    default = ObjectiveConfig()
    assert table[REFERENCE].overrides == ()
    taus = group(micro, "temperature tau").rows
    assert [row.variant for row in taus if row.label.startswith(f"tau = {default.tau:g} ")] == [REFERENCE]
    method = next(row for row in taus if row.label == "tau = 1 (docs/method.md)")
    assert table[method.variant].overrides == ("objective.tau=1.0",)
    shares = group(micro, "share of t = 0 draws").rows
    assert [row.variant for row in shares] == ["t_zero_fraction=0", REFERENCE]
    assert table["t_zero_fraction=0"].overrides == ("objective.t_zero_fraction=0.0",)
    assert shares[1].label == f"share = {default.t_zero_fraction:g} (default)"
    for title, field in (("distance transform T(d)", "transform"), ("correction schedule", "lam_schedule"),
                         ("parameterisation", "parameterization")):
        reference = [row for row in group(micro, title).rows if row.variant == REFERENCE]
        others = [table[row.variant].overrides for row in group(micro, title).rows if row.variant != REFERENCE]
        assert len(reference) == 1 and all(len(o) == 1 and o[0].startswith(f"objective.{field}=") for o in others)
        assert f"objective.{field}={getattr(default, field)}" not in [o[0] for o in others]


def test_a_changed_default_moves_the_reference_row(monkeypatch):
    monkeypatch.setattr(plan, "ObjectiveConfig", functools.partial(ObjectiveConfig, tau=1.0, transform="sqrt"))
    micro = dataclasses.replace(get_preset("micro"), taus=(0.5,))
    rows = {row.label: row.variant for row in group(micro, "temperature tau").rows}
    assert rows == {"tau = 0.5": "tau=0.5", "tau = 1 (docs/method.md, default)": REFERENCE}
    transforms = {row.label: row.variant for row in group(micro, "distance transform T(d)").rows}
    assert transforms["sqrt(d)"] == REFERENCE and transforms["-log(d + eps)"] == "transform=neg_log"
    assert "objective.tau=1.0" not in {o for v in variants(micro).values() for o in v.overrides}


def test_t_draws_describes_the_share_at_zero():
    assert t_draws(ObjectiveConfig(t_zero_fraction=0.0)) == "t ~ U[0, 1]"
    assert t_draws(ObjectiveConfig(t_zero_fraction=0.9)) == "t = 0 in 90% of the draws, otherwise t ~ U[0, 1]"


# ---- the page's arithmetic ---------------------------------------------------------------------


def test_steps_to_reach_interpolates_between_validations():
    curve = [{"step": 10, "miou": 0.2}, {"step": 20, "miou": 0.4}, {"step": 30, "miou": 0.6}]
    assert steps_to_reach(curve, 0.5) == pytest.approx(25.0)
    assert steps_to_reach(curve, 0.1) == 10.0     # already there at the first validation
    assert steps_to_reach(curve, 0.7) is None


def test_judge_and_mean_sd():
    assert judge([0.01, 0.02, 0.03], seeds=3) == "agrees"
    assert judge([-0.01, -0.02, -0.03], seeds=3) == "disagrees"
    assert judge([0.05, -0.04, 0.01], seeds=3).startswith("inconclusive")
    assert judge([0.02], seeds=1) == "agrees (1 seed)"
    assert judge([], seeds=1) == "not measured"
    assert judge([0.0, 0.0], seeds=2) == "no difference"
    assert mean_sd([0.5, 0.7]) == "60.0 ± 14.1"
    assert mean_sd([0.5, None]) == "50.0"
    assert mean_sd([]) == "n/a"


def test_verdict_rules():
    assert speed_verdict(2.0, never=0, at_first=False) == "agrees"
    assert speed_verdict(1.35, never=0, at_first=False) == "partly: faster, by less than the paper's 2x"
    assert speed_verdict(1.35, never=1, at_first=False) == \
        "partly: faster, by less than the paper's 2x; 1 seed(s) never reached it"
    assert speed_verdict(0.9, never=0, at_first=False) == "disagrees"
    assert speed_verdict(4.0, never=0, at_first=True).startswith("inconclusive: reached at the first validation")
    assert speed_verdict(None, never=2, at_first=False).startswith("disagrees: reshaped never reached")
    # 10 steps against a best step count whose per-seed gain over it is noise, a clear gain, or nothing
    assert best_steps_verdict(10, 10, [0.0, 0.0], seeds=2) == "agrees"
    assert best_steps_verdict(100, 10, [0.002, -0.001, 0.0], seeds=3) == "inconclusive (within 2 s.e. over 3 seeds)"
    assert best_steps_verdict(100, 10, [0.02, 0.03, 0.025], seeds=3) == "disagrees"
    assert best_steps_verdict(20, 10, [0.01], seeds=1) == "disagrees (1 seed)"
    assert best_steps_verdict(20, 10, [0.0, 0.0], seeds=2) == "agrees: tied"
    paper = ["a", "b", "c"]
    assert order_verdict({"a": 0.3, "b": 0.2, "c": 0.1}, paper, seeds=2) == "agrees"
    assert order_verdict({"a": 0.3, "b": 0.1, "c": 0.2}, paper, seeds=1) == "partly: a is best (1 seed)"
    assert order_verdict({"a": 0.1, "b": 0.2, "c": math.nan}, paper, seeds=2) == "disagrees"
    assert order_verdict({"a": 0.2, "b": 0.2, "c": 0.2}, paper, seeds=2) == "no difference"
    assert all_of_verdict(["agrees", "agrees (1 seed)"]) == "agrees"
    assert all_of_verdict(["agrees", "inconclusive (within 2 s.e. over 3 seeds)"]) == "inconclusive"
    assert all_of_verdict(["inconclusive", "disagrees"]) == "disagrees"
    assert one_step_verdict(0.95) == "agrees" and one_step_verdict(0.80) == "disagrees"
    assert one_step_verdict(math.nan) == "not measured"


# ---- the page from made-up result files ----------------------------------------------------------

# per seed 0 and 1, the validation curves (steps 2 and 4 of micro) of the convergence runs: the reshaped
# run reaches vanilla's final mIoU at step 3 (4 / 3 speed-up) in seed 0 and 2 + 2/3 (1.5x) in seed 1; the
# averaged curves (0.11, 0.36) reach the averaged final 0.21 at step 2.8 (1.43x, not the 1.42x mean)
CONVERGENCE = {VANILLA: ((0.10, 0.20), (0.12, 0.22)), REFERENCE: ((0.10, 0.30), (0.12, 0.42))}
COST_CASES = {  # seconds per call of a batch of 2, peak MiB
    "train/vanilla": (0.020, 40.0), "train/reshaped": (0.025, 44.0), "train/discriminative": (0.010, 30.0),
    "infer/flow-1": (0.004, 9.0), "infer/flow-2": (0.008, 9.5), "infer/discriminative": (0.002, 8.0)}


def write_fake_results(out, preset):
    """A result file for every task of `preset`, as the runner writes them, with made-up numbers: the
    convergence runs as in CONVERGENCE, others drawn at random; the sqrt-transform run of seed 1 diverged."""
    def save(key, record):
        path = result_path(out, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**record, "task_seconds": 30.0, "processes": {"workers": 2, "threads": 1}}))

    save(COST_KEY, {
        "machine": {"cpu": "Test CPU", "cores": 2, "torch_threads": 1, "gpu": None, "torch": "9.9", "python": "3.99"},
        "device": "cpu", "batch_size": 2, "image_size": preset.image_size, "model_size": preset.model_size,
        "train_reference": "train/vanilla", "infer_reference": "infer/discriminative",
        "cases": {name: {"seconds_per_call": seconds, "images_per_second": 2 / seconds, "peak_memory_mib": memory,
                         "parameters": 1_900_000 if name.endswith("discriminative") else 2_000_000}
                  for name, (seconds, memory) in COST_CASES.items()}})
    for spec in planned_runs(preset):
        name, rng = spec.variant.name, random.Random(spec.key)
        steps = list(range(spec.budget.val_every, spec.budget.steps + 1, spec.budget.val_every))
        record = {"key": spec.key, "dataset": spec.dataset, "variant": name, "budget": spec.budget_name,
                  "seed": spec.seed}
        if name == "transform=sqrt" and spec.seed == 1:
            save(f"train/{spec.key}", {**record, "status": "diverged", "diverged_at": 3})
            continue
        convergence = spec.budget_name == "convergence" and name in CONVERGENCE
        curve = CONVERGENCE[name][spec.seed] if convergence else sorted(rng.uniform(0.05, 0.4) for _ in steps)
        save(f"train/{spec.key}", {**record, "status": "done", "steps": spec.budget.steps, "train_seconds": 10.0,
                                   "curve": [{"step": s, "miou": m} for s, m in zip(steps, curve)],
                                   "test": {"miou": curve[-1], "iou": [curve[-1]] * 11}})
        if not convergence or spec.dataset != preset.ablation_dataset:
            continue
        if name == REFERENCE:  # 10 Euler steps best, 1 step at 0.9 / 1.1 of it
            save(f"sweep/{spec.key}", {"status": "done", "images": 2, **{
                method: [{"steps": s, "miou": curve[-1] * (1.1 - abs(s - 10) / 45)} for s in counts]
                for method, counts in (("euler", preset.euler_sweep), ("heun", preset.heun_sweep))}})
        states = preset.eval_steps + 1
        traversed = (0.3 if name == VANILLA else 0.1) + 0.01 * spec.seed
        stats = lambda share: {"traversed": share, "ends_wrong": share / 2,  # noqa: E731
                               "third_class_by_state": [share] * states, "wrong_by_state": [0.5] * states}
        save(f"diagnostics/{spec.key}", {
            "status": "done", "images": 2, "sampler_steps": preset.eval_steps,
            "signal": [{"step": s, "edges": [0.01, 0.1, 1.0], "counts": [5, 10], "mean_signal": [0.5, 1.0],
                        "near_radius": 0.2, "near_fraction": 0.1,
                        "near_signal": (0.4 if name == REFERENCE else 0.2) * (1 + 0.1 * spec.seed)} for s in steps],
            "traversal": stats(traversed), "straight_traversal": stats(0.2)})
    sessions = [{"tasks": 40, "wall_seconds": 600.0, "workers": 2}, {"tasks": 2, "wall_seconds": 60.0, "workers": 1}]
    (out / SESSIONS_FILE).write_text("".join(json.dumps(s) + "\n" for s in sessions))


class RecordingBlocks(dict):
    """The template's blocks, noting which ones the page uses."""

    def __init__(self, blocks):
        super().__init__(blocks)
        self.used = set()

    def __getitem__(self, name):
        self.used.add(name)
        return super().__getitem__(name)


@pytest.fixture(scope="module")
def fake_pages(tmp_path_factory):
    """The page of made-up results for 2 seeds of micro, and the page of an empty output folder; and the
    template blocks the two used."""
    root = tmp_path_factory.mktemp("pages")
    preset = dataclasses.replace(get_preset("micro"), seeds=(0, 1))
    write_fake_results(root / "fake", preset)
    blocks = RecordingBlocks(read_blocks())
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(report, "read_blocks", lambda: blocks)
        pages = [write_report(preset, root / name, root / name / "docs" / "results.md", "cmd").read_text()
                 for name in ("fake", "empty")]
    return pages, blocks


def test_page_from_made_up_results_quotes_them_and_judges_each_claim(fake_pages):
    (text, _), _ = fake_pages
    for shown in (
        # set-up and cost, from the cost record
        "- Hardware: Test CPU, 2 cores, GPU: none; torch 9.9; Python 3.99; processes: 2 worker(s) x 1 thread(s)",
        "- Model: T/8 (2.00 M parameters), 16x16 images", "start from its shipped config",
        "+25.0% training time", "| train/reshaped | 25.0 | 80.0 | 0.80 | 44.0 | 1.10 |",
        # 1: final val and test mIoU 21 / 36 (mean of two seeds), speed-ups as in CONVERGENCE
        "| mnist-seg | 21.0 ± 1.4 | 36.0 ± 8.5 | 15.0 ± 7.1 | 1.43x | 1.33x, 1.50x | 21.0 ± 1.4 | 36.0 ± 8.5 |",
        "| mnist-seg: reshaped reaches vanilla's final mIoU about 2x sooner | 2x | 1.43x on the seed-averaged curves "
        "(per seed: 1.33x, 1.50x) | partly: faster, by less than the paper's 2x |",
        "| mnist-seg: reshaped beats vanilla at equal steps | yes (ADE20K) | 15.0 ± 7.1 mIoU points (test: 15.0 ± 7.1) "
        "| agrees |",
        "| reshaped, the paper's correction (unbounded, lambda 1) |",
        # 5: both flows against the twin, each with its verdict
        "| generative (categorical flow) | as above, N outputs | 2 ± 0 |",
        "| categorical flow >= discriminative, at the reference flow's steps | not in the paper |",
        "| generative >= discriminative at equal size and training time | FlowSeg 47.1 vs SegFormer-B2 46.5",
        # 2: the diverged run is named, the paper's number quoted
        "| 28.32 | seed 1 diverged at step 3 |",
        # 4: 1 step at 0.9 / 1.1 = 0.818 of 10 steps, outside the paper's 92% +- 5
        "| 1 Euler step gives ~92% of the 10-step mIoU | 92.3% | 81.8% | disagrees |",
        "| 10 Euler steps are best | 10 best (47.1) | best: 10 steps (0.0 ± 0.0 points over 10) | agrees |",
        # 6: near-centroid signal 0.4 / 0.2 (x 1.1 in seed 1): 2x; traversing 30 and 31 % against 10 and 11 %
        "| reshaped / vanilla near-centroid signal: 2.00 ± 0.00x | agrees |",
        "| vanilla | 30.5 ± 0.7 | 15.2 ± 0.4 |", "| straight path | 20.0 ± 0.0 | 10.0 ± 0.0 |",
        "| vanilla - reshaped traversing share: 20.0 ± 0.0 points | agrees |",
        # time spent: 39 tasks of 30 s make 2 sessions' 11 min of wall time
        "Wall time: **11.0 min** over 2 invocation(s) that ran tasks (40 tasks in 10.0 min with 2 worker(s); "
        "2 tasks in 1.0 min with 1 worker(s))",
        "Where this run disagrees with the paper: mnist-seg: reshaped reaches vanilla's final mIoU about 2x sooner;",
    ):
        assert shown in text, shown
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings == ["## Set-up", "## Summary: the paper's claims against this run",
                        "## 1. Convergence: vanilla vs reshaped flow matching", "## 2. Ablations",
                        "## 3. Category encodings", "## 4. Sampling steps", "## 5. Generative vs discriminative",
                        "## 6. Diagnostics of the two failure modes", "## 7. Cost", "## Time spent", "## Reproduce"]
    assert "$" not in text and "<!--" not in text and "\n\n\n" not in text


def test_page_of_an_empty_folder_says_what_is_missing(fake_pages):
    (_, text), _ = fake_pages
    for shown in ("- Model: T/8\n", "No sweep result", "No diagnostics result", "No cost result.",
                  "No claim is contradicted by this run.", "| mnist-seg | n/a | n/a |"):
        assert shown in text, shown
    assert "$" not in text and "<!--" not in text


def test_every_block_of_the_template_is_used(fake_pages):
    _, blocks = fake_pages
    assert blocks.used == set(read_blocks())


def test_constant_prediction_floor_by_hand():
    # predicting class m everywhere: IoU_m = count_m / all pixels, 0 for every other class present
    micro = get_preset("micro")
    data = build_dataset("shapes", "test", image_size=micro.image_size)
    labels = torch.stack([data[i]["label"] for i in range(micro.eval_samples)]).flatten().tolist()
    counts = {c: labels.count(c) for c in set(labels)}
    expected = max(counts.values()) / len(labels) / len(counts)
    assert constant_prediction_miou("shapes", micro) == pytest.approx(expected)


def test_runs_are_shared_between_experiments_with_equal_budgets():
    micro = get_preset("micro")
    shared = dataclasses.replace(micro, ablation=micro.convergence)
    keys = [spec.key for spec in planned_runs(shared)]
    assert len(keys) == len(set(keys))
    assert sum(f"/{REFERENCE}/" in key and key.startswith(micro.ablation_dataset) for key in keys) == 1
    assert len(planned_runs(shared)) == len(planned_runs(micro)) - 1  # the reference runs once


def test_vanilla_runs_only_at_the_convergence_budget_where_experiment_1_compares_it():
    micro = get_preset("micro")
    vanilla = [spec for spec in planned_runs(micro) if spec.variant.name == VANILLA]
    assert {(spec.dataset, spec.budget_name) for spec in vanilla} == {(name, "convergence") for name in micro.datasets}
    assert all(VANILLA not in [row.variant for row in g.rows] for g in ablation_groups(micro))


# the settings of the paper's network that the demo's recipe (mnist-seg.yaml) changes
PAPER_NETWORK = {"model.stem": "patch", "model.dim": None, "model.token_head": False, "eval.grid_shifts": 1}


def test_the_paper_recipe_is_the_demo_recipe_without_its_additions():
    demo, paper = (flat_settings(load_config(name)) for name in ("mnist-seg", "paper-mnist-seg"))
    assert {key: paper[key] for key in PAPER_NETWORK} == PAPER_NETWORK
    # the demo keeps the paper's d = 3 and flowseg's default path and objective; besides its additions it
    # differs only in the token loss's weight, the validation size and its sampler's step count
    added = {key for key in PAPER_NETWORK if demo[key] != paper[key]}
    assert added == {"model.stem", "model.token_head", "eval.grid_shifts"}
    assert {key for key in demo if demo[key] != paper[key]} == added | {
        "objective.token_loss_weight", "train.val_samples", "eval.steps"}


def test_every_run_starts_from_its_datasets_recipe_and_the_network_row_is_the_papers_network():
    micro = get_preset("micro")
    runs = planned_runs(micro, ade20k_root="unused")
    assert {(spec.dataset, spec.recipe) for spec in runs} == {
        ("mnist-seg", "mnist-seg"), ("shapes", "shapes"), ("ade20k", "ade20k")}
    for spec in runs:
        settings = flat_settings(load_config(spec.recipe, spec.overrides()))
        assert settings["data.name"] == spec.dataset and settings["eval.grid_shifts"] == 1, spec.key
    paper = next(spec for spec in runs if spec.variant.name == plan.PAPER_NETWORK)
    settings = flat_settings(load_config(paper.recipe, paper.overrides()))
    assert {key: settings[key] for key in PAPER_NETWORK} == PAPER_NETWORK
    assert [row.variant for row in group(micro, "network").rows] == [REFERENCE, plan.PAPER_NETWORK]


def test_a_sweep_given_one_value_is_no_ablation_and_the_encodings_follow_the_preset():
    micro = dataclasses.replace(get_preset("micro"), epses=(ObjectiveConfig().eps,), encodings=("kronecker", "onehot"))
    assert "eps" not in [g.title for g in ablation_groups(micro)]
    assert [name for name in variants(micro) if name.startswith("encoding=")] == ["encoding=onehot"]
    with pytest.raises(ValueError, match="kronecker"):
        dataclasses.replace(micro, encodings=("onehot", "kronecker"))


def test_a_preset_without_an_ignore_band_trains_no_ignore_masking_group():
    micro = get_preset("micro")
    banded = {"ignore-masked", "ignore-unmasked"}
    assert banded <= {spec.variant.name for spec in planned_runs(micro)}
    unbanded = dataclasses.replace(micro, ignore_band=None)
    assert not banded & {spec.variant.name for spec in planned_runs(unbanded)}
    assert not [g.title for g in ablation_groups(unbanded) if g.title.startswith("ignore masking")]
    assert len(ablation_groups(unbanded)) == len(ablation_groups(micro)) - 1


def test_bounded_correction_runs_only_at_the_convergence_budget():
    micro = get_preset("micro")
    bounded = [spec for spec in planned_runs(micro) if spec.variant.name == "correction_clip=None"]
    assert [(spec.dataset, spec.budget_name) for spec in bounded] == [(micro.ablation_dataset, "convergence")]
    assert bounded[0].overrides()[-2:] == ["objective.correction_clip=null", "objective.lam=1.0"]  # the paper's target
    unbounded = dataclasses.replace(micro, correction_clips=())
    assert len(planned_runs(unbounded)) == len(planned_runs(micro)) - 1


def test_the_categorical_flow_trains_at_the_ablation_budget_with_its_t_zero_share():
    micro = get_preset("micro")
    runs = [spec for spec in planned_runs(micro) if spec.variant.name == CATEGORICAL]
    assert {(spec.dataset, spec.budget_name) for spec in runs} == {(micro.ablation_dataset, "ablation")}
    assert len(runs) == len(micro.seeds)
    assert runs[0].overrides()[-2:] == ["objective.kind=categorical", "objective.t_zero_fraction=0.75"]


def test_ade20k_root_adds_convergence_runs_reading_it(tmp_path):
    micro = get_preset("micro")
    runs = planned_runs(micro, ade20k_root=str(tmp_path))
    ade = [spec for spec in runs if spec.dataset == "ade20k"]
    assert {spec.variant.name for spec in ade} == {"vanilla", REFERENCE}
    assert all(f"data.root={tmp_path}" in spec.overrides() and spec.budget == micro.convergence for spec in ade)
    assert len(runs) == len(planned_runs(micro)) + 2


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        get_preset("huge")
    with pytest.raises(ValueError, match="Budget.steps"):
        Budget(steps=0, batch_size=2, val_every=1, val_samples=1, warmup_steps=0)
    with pytest.raises(ValueError, match="2-d encoding"):
        field_picture(build_encoding("kronecker", 4), true_class=0)
    with pytest.raises(ValueError, match="decoded must be"):
        traversal_stats(torch.zeros(3, 1, 2, 2, dtype=torch.int64), torch.zeros(1, 2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="threads must be an int >= 1"):
        run_experiments("micro", "unused", threads=0)


# ---- the micro preset end to end ------------------------------------------------------------------

FIGURES = ("convergence.png", "ablations.png", "sampling_steps.png", "signal.png", "traversal.png",
           "vector_field.png")


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("experiments")
    page = run_experiments("micro", root / "out", root / "docs" / "results.md", progress=False,
                           keep_checkpoints=False)
    return root, page


def result_files(out):
    return {path: path.stat().st_mtime_ns for path in (out / "results").rglob("*.json")}


def test_micro_preset_writes_the_page_and_every_figure(micro_run):
    root, page = micro_run
    text = page.read_text()
    for heading in ("## Set-up", "## Summary", "## 1. Convergence", "## 2. Ablations", "## 3. Category encodings",
                    "## 4. Sampling steps", "## 5. Generative vs discriminative", "## 6. Diagnostics", "## 7. Cost",
                    "## Time spent"):
        assert heading in text
    for name in FIGURES:
        figure = page.parent / "figures" / name
        assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(figures/{name})" in text
    assert "torch " + torch.__version__ in text and "seeds: 0" in text
    assert "**Bounded correction**" in text and "| reshaped, the paper's correction (unbounded, lambda 1) |" in text
    default = ObjectiveConfig()
    micro = get_preset("micro")
    rows = [*group(micro, "temperature tau").rows, *group(micro, "share of t = 0 draws").rows]
    for shown in ("**share of t = 0 draws**", f"tau = {default.tau:g}, eps = {default.eps:g}", t_draws(default),
                  *(f"| {row.label} |" for row in rows)):
        assert shown in text
    cost = json.loads((root / "out" / "results" / "cost.json").read_text())
    assert set(cost["cases"]) >= {"train/vanilla", "train/reshaped", "train/discriminative", "infer/discriminative"}
    train = [json.loads(p.read_text()) for p in (root / "out" / "results" / "train").rglob("*.json")]
    assert len(train) == len(planned_runs(get_preset("micro")))
    assert all(r["status"] == "done" and r["curve"] and r["test"]["images"] == 2 for r in train)


def test_micro_preset_skips_finished_tasks_and_redoes_a_missing_one(micro_run):
    root, page = micro_run
    out = root / "out"
    before = result_files(out)
    sessions = (out / "sessions.jsonl").read_text().splitlines()
    run_experiments("micro", out, page, progress=False, keep_checkpoints=False)
    assert result_files(out) == before  # nothing recomputed
    assert (out / "sessions.jsonl").read_text().splitlines() == sessions  # and no session recorded
    missing = next(p for p in before if "/train/mnist-seg/transform=sqrt/" in str(p))
    missing.unlink()
    run_experiments("micro", out, page, progress=False, keep_checkpoints=False, workers=2)  # in a worker process
    after = result_files(out)
    assert set(after) == set(before)
    assert [p for p in after if after[p] != before[p]] == [missing]
    last = json.loads((out / "sessions.jsonl").read_text().splitlines()[-1])
    assert (last["tasks"], last["workers"]) == (1, 2)
    assert "over 2 invocation(s)" in page.read_text()


def test_a_run_made_under_other_settings_is_an_error(micro_run):
    root, page = micro_run
    out = root / "out"
    saved = next((out / "runs" / "mnist-seg" / "transform=sqrt").glob("*/config.yaml"))
    original = saved.read_text()
    assert "  tau: 0.5\n" in original
    saved.write_text(original.replace("  tau: 0.5\n", "  tau: 0.7\n"))  # as if the default had been 0.7
    try:
        with pytest.raises(ValueError, match=r"1 run\(s\) in .* other settings(.|\n)*transform=sqrt.*"
                                             r"objective.tau: 0.7 there, 0.5 now"):
            run_experiments("micro", out, page, progress=False, keep_checkpoints=False)
    finally:
        saved.write_text(original)
    before = result_files(out)
    run_experiments("micro", out, page, progress=False, keep_checkpoints=False, device="cpu")
    assert result_files(out) == before  # consistent again: nothing redone


def test_every_curve_of_a_figure_gets_its_own_colour():
    colours = curve_colours(["vanilla", "reshaped", "reshaped, correction <= 0.5", "another"])
    assert colours["vanilla"] == COLOURS["vanilla"] and colours["reshaped"] == COLOURS["reshaped"]
    assert len(set(colours.values())) == 4


def test_convergence_sweep_summary_gives_each_seeds_speedup_over_its_vanilla_run(tmp_path, capsys):
    """vanilla ends at 0.5 after 400 steps; the reshaped run crosses 0.5 halfway between 100 (0.4) and
    200 (0.6), so it gets there 400 / 150 = 2.67x sooner; one that never gets there says so. The run
    without the token loss is measured against vanilla without it (0.2 at 400 steps, reached at 200)."""
    from experiments import convergence_sweep as sweep
    curves = {"vanilla": [0.1, 0.3, 0.4, 0.5], "reshaped": [0.4, 0.6, 0.6, 0.7], "unbounded": [0.1, 0.2, 0.3, 0.4],
              "vanilla-no-token-loss": [0.0, 0.1, 0.1, 0.2], "no-token-loss": [0.1, 0.2, 0.3, 0.4]}
    for variant, mious in curves.items():
        key = sweep.run_key("shapes", variant, 0)
        run, result = tmp_path / "runs" / key, tmp_path / "evals" / key / "result.json"
        run.mkdir(parents=True)
        result.parent.mkdir(parents=True)
        records = [{"kind": "val", "step": 100 * (i + 1), "miou": m} for i, m in enumerate(mious)]
        (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records))
        result.write_text(json.dumps({"results": [{"steps": n, "miou": mious[-1] - 0.01 * n} for n in sweep.SWEEP]}))
    summary = sweep.summarize(tmp_path, [0])["shapes"]
    assert summary["reshaped"]["speedup"] == [pytest.approx(400 / 150)]
    assert summary["unbounded"]["speedup"] == [None]
    assert summary["no-token-loss"]["speedup"] == [pytest.approx(2.0)]
    assert summary["vanilla"]["speedup"] == [1.0]
    assert summary["reshaped"]["test"][10] == [pytest.approx(0.6)]
    assert "repa" not in summary and sweep.summarize(tmp_path, [0])["mnist-seg"] == {}
    assert "| shapes | reshaped | 1 | 70.0 | 2.67x |" in capsys.readouterr().out
    assert (tmp_path / "convergence.png").stat().st_size > 0
