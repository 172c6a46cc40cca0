"""The `flowseg` command: parses arguments and dispatches to train / evaluate / predict / demo.

    flowseg train CONFIG_OR_NAME [section.key=value ...] [--resume]
    flowseg eval CHECKPOINT [section.key=value ...] [--out DIR]
    flowseg predict CHECKPOINT INPUT... --out DIR [section.key=value ...]
    flowseg demo [--out DIR] [--minutes M] [--twin] [section.key=value ...]

Multi-GPU / multi-node: `torchrun --nproc_per_node G -m flowseg.cli train ...`.
User errors (bad config, missing files, mismatched checkpoints, ...) print one line and exit with 2;
a diverged training run exits with 3.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Sequence

from flowseg import __version__

EXIT_USAGE, EXIT_DIVERGED = 2, 3
_OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+=")


def split_overrides(items: Sequence[str]) -> tuple[list[str], list[str]]:
    """(other arguments, section.key=value overrides), each in the order given."""
    overrides = [item for item in items if _OVERRIDE.match(item)]
    return [item for item in items if not _OVERRIDE.match(item)], overrides


def _only_overrides(items: Sequence[str]) -> list[str]:
    others, overrides = split_overrides(items)
    if others:
        raise ValueError(f"expected section.key=value overrides, got {others}")
    return overrides


def _train(args: argparse.Namespace) -> int:
    from flowseg.config import load_config
    from flowseg.train import train

    result = train(load_config(args.config, _only_overrides(args.overrides)), resume=args.resume)
    if result.validation is not None:
        print(f"validation mIoU {result.validation.miou:.4f} at step {result.step}; checkpoint {result.checkpoint}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from flowseg.evaluate import evaluate_checkpoint

    report = evaluate_checkpoint(args.checkpoint, _only_overrides(args.overrides), args.out)
    print(report.table, end="")
    print(f"wrote {report.json_path} and {report.table_path}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from flowseg.predict import predict_files

    inputs, overrides = split_overrides(args.inputs)
    if not inputs:
        raise ValueError("give at least one input image, folder or glob pattern")
    for written in predict_files(args.checkpoint, inputs, args.out, overrides):
        print(f"{written.source} -> {written.labels} (mean confidence {written.mean_confidence:.3f})")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from flowseg.demo import run_demo

    run_demo(out_dir=args.out, minutes=args.minutes, twin=args.twin, overrides=_only_overrides(args.overrides))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowseg", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"flowseg {__version__}")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a model (torchrun for several processes)")
    train.add_argument("config", help="a shipped config name (e.g. mnist-seg, ade20k) or a YAML file")
    train.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.steps=500")
    train.add_argument("--resume", action="store_true", help="continue from the run folder's newest checkpoint")
    train.set_defaults(handler=_train)

    evaluate = commands.add_parser("eval", help="benchmark a checkpoint (mIoU, per-class IoU)")
    evaluate.add_argument("checkpoint", help="a checkpoint folder or a run folder (newest checkpoint)")
    evaluate.add_argument("overrides", nargs="*", help="e.g. eval.split=val eval.sweep=[1,2,5,10] eval.inference=slide")
    evaluate.add_argument("--out", help="result folder (default: a new RUN/eval/<checkpoint>-<split>[-n])")
    evaluate.set_defaults(handler=_eval)

    predict = commands.add_parser("predict", help="segment image files, folders or glob patterns")
    predict.add_argument("checkpoint")
    predict.add_argument("inputs", nargs="+", metavar="INPUT",
                         help="image files, folders, globs, or section.key=value (e.g. eval.device=cpu)")
    predict.add_argument("--out", required=True, help="folder for label PNGs, overlays and confidence maps")
    predict.set_defaults(handler=_predict)

    demo = commands.add_parser("demo", help="train, evaluate and segment on the embedded mnist-seg data")
    demo.add_argument("overrides", nargs="*", help="section.key=value applied to the mnist-seg config")
    demo.add_argument("--out", help="output folder (default: runs/demo-<time>)")
    demo.add_argument("--minutes", type=float, default=None, help="wall-clock budget for the whole demo")
    demo.add_argument("--twin", action="store_true", help="train the discriminative twin instead of the flow model")
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from flowseg.train import TrainingDiverged

    try:
        return args.handler(args)
    except TrainingDiverged as error:
        if args.traceback:
            raise
        print(f"flowseg: {error}", file=sys.stderr)
        return EXIT_DIVERGED
    except (ValueError, TypeError, OSError) as error:
        if args.traceback:
            raise
        message = str(error).strip()
        if "Original Traceback" in message:  # raised in a DataLoader worker: keep the error line itself
            message = message.splitlines()[-1]
        print(f"flowseg {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
