"""Cost of REPA per training step: the shipped mnist-seg (or shapes) config with and without a teacher.

    .venv/bin/python benchmarks/bench_repa.py                                 # mnist-seg, efficientnet-lite0
    .venv/bin/python benchmarks/bench_repa.py --config shapes --set train.threads=1
    .venv/bin/python benchmarks/bench_repa.py --repa repa.teacher=dinov2 --repa repa.weights=VIT.pth

Times steps as bench_step does (from metrics.jsonl, after --warmup steps, CPU), alternating the runs
without and with REPA for --rounds rounds so that a change in the machine's load hits both alike, and
prints the minimum over rounds of each and their ratio. Prints figures only; asserts nothing.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from bench_step import seconds_per_step

TREE = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="mnist-seg", help="a shipped config (default: mnist-seg)")
    parser.add_argument("--repa", action="append", default=None, metavar="KEY=VALUE",
                        help="the overrides that turn REPA on (default: repa.teacher=efficientnet-lite0)")
    parser.add_argument("--warmup", type=int, default=10, help="steps before the timed ones")
    parser.add_argument("--steps", type=int, default=30, help="timed steps (a multiple of --log-every)")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra config override for both runs, e.g. train.threads=1")
    args = parser.parse_args()
    if args.warmup % args.log_every or args.steps % args.log_every:
        parser.error("--warmup and --steps must be multiples of --log-every (the step times come from log records)")
    variants = {"without REPA": [], "with REPA": args.repa or ["repa.teacher=efficientnet-lite0"]}

    best = {name: float("inf") for name in variants}
    for round_ in range(args.rounds):
        for name, overrides in variants.items():
            seconds = seconds_per_step(TREE, args.warmup, args.steps, args.log_every, [*args.set, *overrides],
                                       args.config)
            best[name] = min(best[name], seconds)
            print(f"round {round_ + 1}: {name}: {1000 * seconds:.1f} ms/step", flush=True)
    print(f"\n{args.config} training step, CPU, min over {args.rounds} round(s) of {args.steps} steps "
          f"(after {args.warmup}), overrides {args.set or 'none'}, REPA as {variants['with REPA']}:")
    for name, seconds in best.items():
        print(f"  {1000 * seconds:8.1f} ms/step  ratio {seconds / best['without REPA']:.3f}  {name}")


if __name__ == "__main__":
    main()
