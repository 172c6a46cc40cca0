"""`python -m experiments --preset quick|full --out DIR [--page docs/results.md]`

Runs every task of the preset that has no result file in DIR yet (so a second call after an
interruption continues where the first stopped), then regenerates the results page and its figures
from all result files. --report-only skips straight to the page.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Sequence

from experiments import PRESETS, run_experiments


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--out", required=True, help="folder for runs and result files (reused to resume)")
    parser.add_argument("--page", default="docs/results.md", help="the results page; figures go to its folder/figures")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads per process (default 1: on a shared machine more threads "
                             "can be far slower)")
    parser.add_argument("--workers", type=int, help="processes training runs side by side (default: the preset's)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--ade20k", metavar="ROOT", help="also run experiment 1 on ADE20K-layout data at ROOT")
    parser.add_argument("--report-only", action="store_true", help="only regenerate the page from DIR's results")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--delete-checkpoints", action="store_true",
                        help="delete each run's checkpoints once its results are written (default: keep the final one)")
    args = parser.parse_args(argv)
    command = "python -m experiments " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    try:
        page = run_experiments(args.preset, args.out, args.page, args.threads, args.workers, args.device,
                               args.ade20k, args.report_only, not args.no_progress, command,
                               not args.delete_checkpoints)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
