"""Peak memory of initialising XL/16 from a PixNerd Lightning checkpoint, for one or more copies of flowseg.

    .venv/bin/python benchmarks/bench_pixnerd_load.py                       # this checkout
    .venv/bin/python benchmarks/bench_pixnerd_load.py OLD_TREE NEW_TREE     # two source trees, e.g. before/after

Writes, in a temporary folder that is deleted at the end, a file shaped like the checkpoint PixNerd's
Lightning module saves for its XL/16 model: "state_dict" holds the EMA and the raw denoiser under
PixNerd's names (label table included), "optimizer_states" the AdamW moments exp_avg and exp_avg_sq of
every raw parameter: four float32 copies of the ~700M parameters, ~11 GB. Then, for each tree in turn,
a fresh process imports that tree's flowseg, builds an XL/16 model with unfilled CPU storage and reads
the file into it with `load_pixnerd_checkpoint` (the EMA copy), and reports its peak resident memory
(ru_maxrss, which counts the pages of a memory-mapped file that were read) and the time of the load.
A thread samples /proc/self/status every 10 ms for the peaks of the two parts of it: RssAnon, the
process's private memory, and RssFile, pages of files it maps, which the page cache shares between
processes (the ranks of a node reading one file) and can drop. Every process holds the model's own
weights, ~2.8 GB for XL/16, once loaded. Prints figures only; asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from trees import import_flowseg

CHECKOUT = Path(__file__).resolve().parents[1]
PIXNERD_CLASSES = 1000
GIB = 2**30


def write_checkpoint(size: str, path: Path) -> None:
    """The Lightning-style file described in the module docstring, for PixNerd at `size` (run in its own
    process: it holds all four copies in memory while saving)."""
    import torch

    models, pixnerd = import_flowseg(CHECKOUT, "models", "models.pixnerd")
    with torch.device("meta"):
        model = models.PixelFieldTransformer(size, dim=3, image_conditioning=False)  # PixNerd's channels
    shapes = {theirs: model.get_parameter(ours).shape for theirs, ours in pixnerd.pixnerd_key_map(model).items()}
    shapes[pixnerd.LABEL_TABLE] = torch.Size((PIXNERD_CLASSES + 1, model.size.width))
    generator = torch.Generator().manual_seed(0)
    ema = {name: torch.empty(shape).normal_(std=0.02, generator=generator) for name, shape in shapes.items()}
    # the other copies' values do not change what reading them costs
    raw = {name: torch.full(shape, 0.01) for name, shape in shapes.items()}
    adam = {index: {"step": torch.tensor(1000.0), "exp_avg": torch.full(shape, 1e-4),
                    "exp_avg_sq": torch.full(shape, 1e-8)} for index, shape in enumerate(shapes.values())}
    group = {"lr": 1e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False,
             "params": list(adam)}
    torch.save({
        "epoch": 3,
        "global_step": 1000,
        "state_dict": {**{"denoiser." + k: v for k, v in raw.items()},
                       **{"ema_denoiser." + k: v for k, v in ema.items()}},
        "optimizer_states": [{"state": adam, "param_groups": [group]}],
        "lr_schedulers": [],
    }, path)


class StatusPeaks(threading.Thread):
    """The largest RssAnon and RssFile (GiB) of this process, sampled until stop()."""

    def __init__(self, every: float = 0.01):
        super().__init__(daemon=True)
        self.every, self.peaks, self.done = every, {"RssAnon": 0.0, "RssFile": 0.0}, threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.every):
            for line in Path("/proc/self/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in self.peaks:  # "RssAnon:   123456 kB"
                    self.peaks[key] = max(self.peaks[key], int(value.split()[0]) * 1024 / GIB)

    def stop(self) -> dict[str, float]:
        self.done.set()
        self.join()
        return self.peaks


def measure_load(size: str, tree: Path, path: Path) -> dict:
    """Peak RSS and time of loading `path` into a fresh model of `size` with `tree`'s flowseg (run in its
    own process, whose peak is then the load's)."""
    import torch

    (models,) = import_flowseg(tree, "models")
    with torch.device("meta"):
        model = models.PixelFieldTransformer(size, dim=3, image_conditioning=False)
    model = model.to_empty(device="cpu")  # storage allocated, not yet touched
    sampler = StatusPeaks()
    sampler.start()
    started = time.perf_counter()
    report = models.load_pixnerd_checkpoint(model, path)
    seconds = time.perf_counter() - started
    peaks = sampler.stop()
    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
            "peak_anon_gib": peaks["RssAnon"], "peak_file_gib": peaks["RssFile"],
            "seconds": seconds, "prefix": report.prefix, "loaded": len(report.loaded) + len(report.adapted),
            "model_gib": sum(p.numel() * p.element_size() for p in model.parameters()) / GIB}


def run_child(*args: str) -> str:
    result = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{result.stderr}")
    return result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="*", type=Path, default=[CHECKOUT],
                        help="source trees holding a flowseg/ package (default: this checkout)")
    parser.add_argument("--size", default="XL/16", help="PixNerd's XL/16 by default (L/16: 452M parameters)")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the temporary file (default: /tmp)")
    parser.add_argument("--child", nargs=2, metavar=("TREE|write", "FILE"), help=argparse.SUPPRESS)  # internal
    args = parser.parse_args()
    if args.child:
        what, file = args.child
        if what == "write":
            write_checkpoint(args.size, Path(file))
        else:
            print(json.dumps(measure_load(args.size, Path(what), Path(file))))
        return

    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        path = Path(folder) / "pixnerd.ckpt"
        started = time.perf_counter()
        run_child("--size", args.size, "--child", "write", str(path))
        print(f"wrote {path}: {path.stat().st_size / GIB:.2f} GiB in {time.perf_counter() - started:.0f} s", flush=True)
        results = {}
        for tree in args.trees:
            results[tree] = json.loads(run_child("--size", args.size, "--child", str(tree), str(path)).splitlines()[-1])
            print(f"{tree}: {results[tree]}", flush=True)
    reference = results[args.trees[0]]["peak_rss_gib"]
    print(f"\nloading the EMA weights of a {args.size} Lightning checkpoint with optimizer state, CPU, "
          "one process per tree:")
    for tree, result in results.items():
        print(f"  {tree}: peak RSS {result['peak_rss_gib']:.2f} GiB ({result['peak_rss_gib'] / reference:.3f}x; "
              f"sampled peaks: private {result['peak_anon_gib']:.2f}, file-backed {result['peak_file_gib']:.2f} GiB), "
              f"load {result['seconds']:.1f} s, model weights {result['model_gib']:.2f} GiB, "
              f"{result['loaded']} tensors from {result['prefix']!r}")


if __name__ == "__main__":
    main()
