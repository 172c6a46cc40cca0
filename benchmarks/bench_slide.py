"""Time of sliding-window inference on one large image, for one or more copies of flowseg, in one process.

    .venv/bin/python benchmarks/bench_slide.py                       # this checkout
    .venv/bin/python benchmarks/bench_slide.py OLD_TREE NEW_TREE     # two source trees, e.g. before/after

Each tree is imported in turn (its `flowseg` package first on sys.path, every flowseg module dropped
between trees). An untrained network of --size for the 19 Cityscapes classes (weights from seed 0, the
same in every tree) segments one random --height x --width image with eval.inference=slide at --window
and --stride (default 2/3 of the window), for each of --steps, through the public
Segmenter.probabilities, on --device (the CPU by default; on CUDA one window is segmented first,
outside the timing, and every time waits for the device). The trees run alternately for --rounds rounds, so that a change in the
machine's load hits each alike; the minimum over rounds is reported with the ratio to the first tree,
and the largest difference of p between each tree and the first. Prints figures only; asserts nothing.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from trees import import_flowseg


def run_tree(tree: Path, args: argparse.Namespace, image: torch.Tensor) -> dict[int, tuple[float, torch.Tensor]]:
    """steps -> (seconds, p) of slide inference on `image` with the flowseg in `tree`."""
    config_module, build_module, inference_module = import_flowseg(tree, "config", "build", "inference")
    overrides = [f"model.size={args.size}", "eval.inference=slide", f"eval.window={args.window}",
                 f"eval.stride={args.stride}", f"eval.batch_size={args.batch_size}", "eval.grid_shifts=1",
                 f"eval.device={args.device}", f"eval.precision={args.precision}", *args.set]
    config = config_module.load_config("cityscapes", overrides)
    torch.manual_seed(0)
    model, encoding = build_module.build_network(config, 19)
    device = torch.device(args.device)
    segmenter = inference_module.Segmenter(model, encoding, config, device)
    if device.type == "cuda":  # a first call pays for kernel selection and the allocator's growth
        segmenter.probabilities(image[..., :args.window, :args.window], 1)
    results = {}
    for steps in args.steps:
        began = time.perf_counter()
        p = segmenter.probabilities(image, steps)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        results[steps] = (time.perf_counter() - began, p.cpu())
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="*", type=Path, default=[Path(__file__).resolve().parents[1]],
                        help="source trees holding a flowseg/ package (default: this checkout)")
    parser.add_argument("--size", default="T/8", help="model size (untrained)")
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--stride", type=int, default=None, help="default: 2/3 of the window")
    parser.add_argument("--batch-size", type=int, default=16, help="eval.batch_size (windows per forward)")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--precision", default="fp32", help="eval.precision: fp32 (default), bf16 (CUDA) or auto")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra config override for every tree")
    args = parser.parse_args()
    args.stride = args.stride or max(1, args.window * 2 // 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    image = torch.rand(1, 3, args.height, args.width, generator=torch.Generator().manual_seed(0)) * 2 - 1
    windows = math.prod(len({*range(0, max(side, args.window) - args.window, args.stride),
                             max(side, args.window) - args.window}) for side in (args.height, args.width))

    best = {(tree, steps): math.inf for tree in args.trees for steps in args.steps}
    differences = {}
    for round_ in range(args.rounds):
        reference = None
        for tree in args.trees:
            results = run_tree(tree, args, image)
            for steps, (seconds, p) in results.items():
                best[tree, steps] = min(best[tree, steps], seconds)
                print(f"round {round_ + 1}: {tree}: {steps} steps: {seconds:.2f} s", flush=True)
            reference = reference or results
            differences[tree] = max((results[s][1] - reference[s][1]).abs().max().item() for s in args.steps)
    print(f"\n{args.height}x{args.width} image, untrained {args.size}, slide window {args.window} stride "
          f"{args.stride} ({windows} windows), eval.batch_size {args.batch_size}, "
          f"{'CPU with ' + str(torch.get_num_threads()) + ' threads' if args.device == 'cpu' else args.device} "
          f"at {args.precision}, min over {args.rounds} round(s):")
    for tree in args.trees:
        first = args.trees[0]
        times = "  ".join(f"{steps} steps {best[tree, steps]:7.2f} s "
                          f"(ratio {best[tree, steps] / best[first, steps]:.3f})" for steps in args.steps)
        print(f"  {times}  max |p - p_first| {differences[tree]:.1e}  {tree}")


if __name__ == "__main__":
    main()
