"""Time of one training step of a shipped config, for one or more copies of flowseg, in one process.

    .venv/bin/python benchmarks/bench_step.py                       # this checkout
    .venv/bin/python benchmarks/bench_step.py OLD_TREE NEW_TREE     # two source trees, e.g. before/after
    .venv/bin/python benchmarks/bench_step.py --with repa.teacher=efficientnet-lite0   # without vs with REPA

Each tree is imported in turn (its `flowseg` package first on sys.path, every flowseg module dropped
between trees) and trains --config (default mnist-seg: T/4, batch 16, token loss on) on the CPU
through the public `flowseg.train.train`, for --warmup + --steps steps; with --with, each tree runs
twice, without and with those overrides. The step time is read from
metrics.jsonl: each log record carries the wall-clock time at which its step began, so
(elapsed at the last record - elapsed at the first) / steps covers --steps whole steps, logging
included, and none of the set-up, final validation or checkpoint. The trees run alternately for
--rounds rounds, so that a change in the machine's load hits each alike; the minimum over rounds is
reported with the ratio to the first case. Prints figures only; asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from trees import import_flowseg


def seconds_per_step(tree: Path, warmup: int, steps: int, log_every: int, extra: list[str],
                     config: str = "mnist-seg") -> float:
    config_module, train_module = import_flowseg(tree, "config", "train")
    with tempfile.TemporaryDirectory() as out:
        overrides = [f"train.out_dir={out}/run", f"train.steps={warmup + steps}", f"train.log_every={log_every}",
                     "train.val_every=0", "train.val_samples=2", "train.ckpt_every=0", "train.progress=false",
                     "train.tensorboard=false", "train.device=cpu", *extra]
        train_module.train(config_module.load_config(config, overrides))
        records = [json.loads(line) for line in (Path(out) / "run" / "metrics.jsonl").read_text().splitlines()]
    started = {record["step"]: record["elapsed"] for record in records if record["kind"] == "train"}
    return (started[warmup + steps] - started[warmup]) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="*", type=Path, default=[Path(__file__).resolve().parents[1]],
                        help="source trees holding a flowseg/ package (default: this checkout)")
    parser.add_argument("--config", default="mnist-seg", help="a shipped config (default: mnist-seg)")
    parser.add_argument("--with", dest="variant", action="append", default=[], metavar="KEY=VALUE",
                        help="overrides of a second run of every tree (e.g. repa.teacher=efficientnet-lite0)")
    parser.add_argument("--warmup", type=int, default=20, help="steps before the timed ones")
    parser.add_argument("--steps", type=int, default=60, help="timed steps (a multiple of --log-every)")
    parser.add_argument("--log-every", type=int, default=20, help="train.log_every (the config's default: 20)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra config override for every run, e.g. train.threads=1")
    args = parser.parse_args()
    if args.warmup % args.log_every or args.steps % args.log_every:
        parser.error("--warmup and --steps must be multiples of --log-every (the step times come from log records)")
    cases = [(f"{tree}{suffix}", tree, overrides) for tree in args.trees
             for suffix, overrides in [("", [])] + ([(f" with {args.variant}", args.variant)] if args.variant else [])]

    best = {name: float("inf") for name, _, _ in cases}
    for round_ in range(args.rounds):
        for name, tree, overrides in cases:
            seconds = seconds_per_step(tree, args.warmup, args.steps, args.log_every, [*args.set, *overrides],
                                       args.config)
            best[name] = min(best[name], seconds)
            print(f"round {round_ + 1}: {name}: {1000 * seconds:.1f} ms/step", flush=True)
    reference = best[cases[0][0]]
    print(f"\n{args.config} training step, CPU, min over {args.rounds} round(s) of {args.steps} steps "
          f"(after {args.warmup}), overrides {args.set or 'none'}:")
    for name, seconds in best.items():
        print(f"  {1000 * seconds:8.1f} ms/step  ratio {seconds / reference:.3f}  {name}")


if __name__ == "__main__":
    main()
