"""The `flowseg` command: parses arguments and dispatches to train / evaluate / predict / demo.

    flowseg train CONFIG_OR_NAME [--resume] [section.key=value ...]
    flowseg eval CHECKPOINT [--out DIR] [section.key=value ...]
    flowseg predict CHECKPOINT INPUT... --out DIR [--overwrite] [section.key=value ...]
    flowseg demo [--out DIR] [--minutes M] [--twin] [section.key=value ...]
    flowseg serve CHECKPOINT [CHECKPOINT ...] [--host H] [--port P] [section.key=value ...]

The section.key=value config overrides may stand anywhere on the line: they are taken out of the
arguments before argparse sees the rest (argparse cannot interleave positionals with a command's options).

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
_OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+=")  # section.key= : a path like runs/a=1 is not one
OVERRIDES_HELP = ("section.key=value config overrides (e.g. train.steps=500 eval.sweep=[1,2,5]) may stand anywhere "
                  "on the line; a file named like one goes after --")


def split_overrides(items: Sequence[str]) -> tuple[list[str], list[str]]:
    """(other arguments, section.key=value overrides), each in the order given. Everything from a `--`
    on is an argument, so a file named like an override can still be given."""
    others: list[str] = []
    overrides: list[str] = []
    for index, item in enumerate(items):
        if item == "--":
            return others + list(items[index:]), overrides
        (overrides if _OVERRIDE.match(item) else others).append(item)
    return others, overrides


def _train(args: argparse.Namespace) -> int:
    from flowseg.config import load_config
    from flowseg.train import train

    result = train(load_config(args.config, args.overrides), resume=args.resume)
    if result.validation is not None:
        print(f"validation mIoU {result.validation.miou:.4f} at step {result.step}; checkpoint {result.checkpoint}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from flowseg.evaluate import evaluate_checkpoint

    report = evaluate_checkpoint(args.checkpoint, args.overrides, args.out)
    print(report.table, end="")
    print(f"wrote {report.json_path} and {report.table_path}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from flowseg.predict import predict_files

    for written in predict_files(args.checkpoint, args.inputs, args.out, args.overrides, overwrite=args.overwrite):
        print(f"{written.source} -> {written.labels} (mean confidence {written.mean_confidence:.3f})")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from flowseg.demo import run_demo

    run_demo(out_dir=args.out, minutes=args.minutes, twin=args.twin, overrides=args.overrides)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from flowseg.serve.page import serve

    serve(args.checkpoints, host=args.host, port=args.port, overrides=args.overrides)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowseg", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"flowseg {__version__}")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, arguments: str, summary: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, usage=f"%(prog)s {arguments} [section.key=value ...]", help=summary,
                                   description=summary, epilog=OVERRIDES_HELP)

    train = command("train", "CONFIG_OR_NAME [--resume]", "train a model (torchrun for several processes)")
    train.add_argument("config", help="a shipped config name (e.g. mnist-seg, ade20k) or a YAML file")
    train.add_argument("--resume", action="store_true", help="continue from the run folder's newest checkpoint")
    train.set_defaults(handler=_train)

    evaluate = command("eval", "CHECKPOINT [--out DIR]", "benchmark a checkpoint (mIoU, per-class IoU)")
    evaluate.add_argument("checkpoint", help="a checkpoint folder or a run folder (newest checkpoint)")
    evaluate.add_argument("--out", help="result folder (default: a new RUN/eval/<checkpoint>-<split>[-n])")
    evaluate.set_defaults(handler=_eval)

    predict = command("predict", "CHECKPOINT INPUT... --out DIR [--overwrite]",
                      "segment image files, folders or glob patterns")
    predict.add_argument("checkpoint")
    predict.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")
    predict.add_argument("--out", required=True, help="folder for label PNGs, overlays and confidence maps; "
                                                      "it must be empty or new unless --overwrite")
    predict.add_argument("--overwrite", action="store_true",
                         help="write into a folder that holds files, replacing any of the same names "
                              "(never an input image)")
    predict.set_defaults(handler=_predict)

    demo = command("demo", "[--out DIR] [--minutes M] [--twin]",
                   "train, evaluate and segment on the embedded mnist-seg data")
    demo.add_argument("--out", help="output folder (default: runs/demo-<time>)")
    demo.add_argument("--minutes", type=float, default=None, help="wall-clock budget for the whole demo")
    demo.add_argument("--twin", action="store_true", help="train the discriminative twin instead of the flow model")
    demo.set_defaults(handler=_demo)

    viewer = command("serve", "CHECKPOINT [CHECKPOINT ...] [--host H] [--port P]",
                     "a local web page that shows the models at work on an image (several: side by side)")
    viewer.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                        help="checkpoint folders or run folders (newest checkpoint)")
    viewer.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only)")
    viewer.add_argument("--port", type=int, default=7860, help="port to listen on (default 7860)")
    viewer.set_defaults(handler=_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    args, unexpected = build_parser().parse_known_args(arguments)
    args.overrides = overrides
    from flowseg.train import TrainingDiverged

    try:
        if unexpected:
            raise ValueError(f"unrecognised arguments {unexpected}: not an argument or option of "
                             f"`flowseg {args.command}`, nor a section.key=value override")
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
