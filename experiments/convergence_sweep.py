"""Convergence of objective variants against vanilla flow matching, seeds x datasets, side by side.

    python -m experiments.convergence_sweep --out DIR [--device cuda] [--workers 12] [--steps 2000]
    python -m experiments.convergence_sweep --out DIR --summary-only

Every (dataset, variant, seed) is one `flowseg train` run (validation mIoU every --val-every steps at
eval.steps = 10) followed by `flowseg eval` of its final checkpoint on the first --test-images test
images at 1, 2, 5 and 10 Euler steps. Runs go --workers at a time, each a process of its own with one
CPU thread; a run whose final evaluation exists is skipped, so a second call continues. The summary
(DIR/summary.json, DIR/convergence.png, a Markdown table on stdout) gives per variant: the final
validation mIoU, the speed-up over its vanilla run (BASELINES; vanilla's final steps / the steps the
variant takes to reach vanilla's final validation mIoU, per seed; experiments.results.steps_to_reach)
and the test mIoU at each step count.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from experiments.results import mean_sd, steps_to_reach

# dataset -> the shipped recipe and its overrides
DATASETS = {"mnist-seg": ["mnist-seg"], "shapes": ["shapes"]}
# variant -> its overrides of the recipe; "reshaped" is the recipe itself (flowseg's default objective)
VARIANTS = {
    "vanilla": ["objective.kind=vanilla"],
    "reshaped": [],
    "unbounded": ["objective.correction_clip=null", "objective.lam=1.0"],  # the paper's target
    "clip0.25": ["objective.correction_clip=0.25", "objective.lam=1.0"],  # bounds of docs/core.md's lambda = 1 table
    "clip1": ["objective.correction_clip=1.0", "objective.lam=1.0"],
    "repa": ["repa.teacher=efficientnet-lite0"],
    # the demo recipe's add-ons, one at a time (on datasets whose recipe has them)
    "no-token-loss": ["model.token_head=false"],
    "vanilla-no-token-loss": ["objective.kind=vanilla", "model.token_head=false"],
    "patch-stem": ["model.stem=patch"],
    "d8": ["model.dim=8"],
}
# the vanilla run each variant's speed-up is measured against (default: "vanilla")
BASELINES = {name: "vanilla-no-token-loss" for name in ("no-token-loss", "vanilla-no-token-loss")}
SWEEP = (1, 2, 5, 10)


def run_key(dataset: str, variant: str, seed: int) -> str:
    return f"{dataset}-{variant}-s{seed}"


def train_and_eval(out: Path, dataset: str, variant: str, seed: int, args: argparse.Namespace) -> str:
    key = run_key(dataset, variant, seed)
    run, result = out / "runs" / key, out / "evals" / key / "result.json"
    if result.exists():
        return f"{key}: done before"
    source, *base = DATASETS[dataset]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = [f"train.device={args.device}", f"eval.device={args.device}", "train.threads=1"]
    train = [sys.executable, "-m", "flowseg.cli", "train", source, *base, *VARIANTS[variant], *common,
             f"train.seed={seed}", f"train.steps={args.steps}", f"train.val_every={args.val_every}",
             "train.val_samples=200", f"train.ckpt_every={args.steps}", "train.keep_checkpoints=1",
             "train.progress=false", "train.tensorboard=false", "eval.steps=10", f"train.out_dir={run}",
             *(["--resume"] if (run / "checkpoints").exists() else [])]
    evaluate = [sys.executable, "-m", "flowseg.cli", "eval", str(run), "--out", str(result.parent), *common,
                f"eval.sweep=[{','.join(map(str, SWEEP))}]", "eval.grid_shifts=1",
                f"eval.max_samples={args.test_images}"]
    for command in (train, evaluate):
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode:
            return f"{key}: FAILED ({' '.join(command[3:5])}): {done.stderr[-800:]}"
    return f"{key}: done"


def val_curve(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{"step": r["step"], "miou": r["miou"]} for r in records if r["kind"] == "val"]


def speedup(curve: list[dict], vanilla: list[dict]) -> float | None:
    """vanilla's final step / the steps `curve` takes to reach vanilla's final mIoU; None: it never does."""
    reach = steps_to_reach(curve, vanilla[-1]["miou"])
    return vanilla[-1]["step"] / reach if reach else None


def summarize(out: Path, seeds: list[int]) -> dict:
    summary: dict = {}
    for dataset in DATASETS:
        curves = {v: {s: val_curve(out / "runs" / run_key(dataset, v, s)) for s in seeds
                      if (out / "evals" / run_key(dataset, v, s) / "result.json").exists()} for v in VARIANTS}
        tests = {v: {s: json.loads((out / "evals" / run_key(dataset, v, s) / "result.json").read_text())["results"]
                     for s in curves[v]} for v in VARIANTS}
        rows = {}
        for variant in VARIANTS:
            vanilla = curves[BASELINES.get(variant, "vanilla")]
            seeds_done = list(curves[variant])
            if not seeds_done:
                continue
            rows[variant] = {
                "seeds": seeds_done,
                "final_val": [curves[variant][s][-1]["miou"] for s in seeds_done],
                # None: never reached vanilla's final mIoU; "no vanilla": that seed's vanilla run is missing
                "speedup": [speedup(curves[variant][s], vanilla[s]) if s in vanilla else "no vanilla"
                            for s in seeds_done],
                "test": {steps: [next(r["miou"] for r in tests[variant][s] if r["steps"] == steps)
                                 for s in seeds_done] for steps in SWEEP},
                "curves": {s: curves[variant][s] for s in seeds_done},
            }
        summary[dataset] = rows
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print("| dataset | variant | seeds | final val mIoU | speed-up over vanilla (per seed) | "
          + " | ".join(f"test {n} step{'s' * (n > 1)}" for n in SWEEP) + " |")
    print("|---|---|---|---|---|" + "---|" * len(SWEEP))
    for dataset, rows in summary.items():
        for variant, row in rows.items():
            speed = ", ".join("never" if x is None else x if isinstance(x, str) else f"{x:.2f}x"
                              for x in row["speedup"])
            tests = " | ".join(mean_sd(row["test"][n]) for n in SWEEP)
            print(f"| {dataset} | {variant} | {len(row['seeds'])} | {mean_sd(row['final_val'])} | {speed} | {tests} |")
    plot(summary, out / "convergence.png")
    return summary


def plot(summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summary), figsize=(6 * len(summary), 4), squeeze=False)
    for ax, (dataset, rows) in zip(axes[0], summary.items()):
        for index, (variant, row) in enumerate(rows.items()):
            for number, curve in enumerate(row["curves"].values()):
                ax.plot([p["step"] for p in curve], [p["miou"] for p in curve], color=f"C{index}", alpha=0.7,
                        label=variant if number == 0 else None)
        ax.set(title=f"{dataset}: validation mIoU (10 steps), each line a seed", xlabel="step", ylabel="mIoU")
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--val-every", type=int, default=100)
    parser.add_argument("--test-images", type=int, default=500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--summary-only", action="store_true")
    args = parser.parse_args(argv)
    if args.summary_only and not (args.out / "runs").is_dir():
        parser.error(f"--summary-only: {args.out} holds no runs/ folder of a sweep")
    if not args.summary_only:
        args.out.mkdir(parents=True, exist_ok=True)
        jobs = [(d, v, s) for s in args.seeds for d in args.datasets for v in args.variants]
        with ThreadPoolExecutor(args.workers) as pool:
            for line in pool.map(lambda job: train_and_eval(args.out, *job, args), jobs):
                print(line, flush=True)
    summarize(args.out, args.seeds)


if __name__ == "__main__":
    main()
