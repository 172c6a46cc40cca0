"""Benchmark of the flowseg core: cost of the distance-aware correction and of nearest-centroid decoding.

    .venv/bin/python benchmarks/bench_core.py

Prints, from one run:
  1. time and peak extra memory of distance_correction for N = 150 classes at B = 8, 256 x 256
     (float32, CPU), without and with class chunking. Each case runs in a fresh subprocess; its peak
     extra memory is the process's peak resident set (VmHWM) after the call minus its resident set
     (VmRSS) just before it, with the inputs allocated and the code paged in by a tiny first call.
  1b. single-thread CPU time (time.process_time, the clock of bench_model.py's ratios) of
     distance_correction at the training step's size, B = 2, 256 x 256, N = 150, for several tau,
     class_chunk and transforms, next to one CategoryEncoding.sq_distances call (a single
     (B, N, H, W) distance tensor) measured with interleaved repeats in the same process.
  2. time of CategoryEncoding.decode for N = 171 at 1 x 512 x 512 next to a plain argmax over a
     (1, 171, 512, 512) logit tensor, measured in this process with interleaved repeats, and their
     ratio (target <= 2).
  3. the size of the correction at x1_hat = mu_true with the default tau, eps (it is not exactly 0).
Times are the minimum over repeats; the machine may be shared, so compare ratios, not absolutes.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from functools import partial

import torch

from flowseg.encoding import build_encoding
from flowseg.memory import process_status_kib
from flowseg.correction import distance_correction

CORRECTION_CASES = (None, 50, 16)  # class_chunk
REPEATS = 3
DECODE_REPEATS = 7
CPU_REPEATS = 5


def interleaved_best(cases: dict, repeats: int, clock=time.perf_counter) -> dict[str, float]:
    """Minimum time of each case over repeats, the cases run alternately so that a change in the
    machine's load hits every case alike (after one warm-up each)."""
    for fn in cases.values():
        fn()
    best = {name: math.inf for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            start = clock()
            fn()
            best[name] = min(best[name], clock() - start)
    return best


def best_time(fn, repeats: int = REPEATS) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def correction_case(class_chunk: int | None) -> dict:
    """Run in a fresh subprocess: peak memory of one call, then the best of REPEATS timed calls."""
    g = torch.Generator().manual_seed(0)
    encoding = build_encoding("kronecker", 150)
    x1_hat = torch.rand(8, 3, 256, 256, generator=g) * 2 - 1
    labels = torch.randint(0, 150, (8, 256, 256), generator=g)

    def call(x: torch.Tensor = x1_hat, y: torch.Tensor = labels) -> torch.Tensor:
        return distance_correction(x, y, encoding.centroids, 1.0, 1e-3, "neg_log", class_chunk)

    call(x1_hat[:1, :, :4, :4], labels[:1, :4, :4])  # pages in the kernels' code, which would count as memory
    before = process_status_kib("VmRSS")
    call()
    peak_extra = process_status_kib("VmHWM") - before
    return {"class_chunk": class_chunk, "peak_extra_mib": peak_extra / 1024, "seconds": best_time(call)}


def run_correction_cases() -> None:
    tensor_mib = 8 * 150 * 256 * 256 * 4 / 2**20
    print(f"1. distance_correction, N=150, B=8, 256x256, float32, {torch.get_num_threads()} threads")
    print(f"   one (B, N, H, W) float32 tensor = {tensor_mib:.0f} MiB; "
          f"a (B, N, d, H, W) one would be {3 * tensor_mib:.0f} MiB")
    print("   peak extra memory = VmHWM after one call - VmRSS before it, each case in a fresh subprocess")
    for class_chunk in CORRECTION_CASES:
        code = f"import json, bench_core; print(json.dumps(bench_core.correction_case({class_chunk!r})))"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        r = json.loads(out.stdout.strip().splitlines()[-1])
        chunk, seconds, mib = r["class_chunk"], r["seconds"], r["peak_extra_mib"]
        print(f"   class_chunk={str(chunk):>4}: {seconds:.3f} s, peak extra {mib:.0f} MiB")


def run_correction_cpu_case() -> None:
    g = torch.Generator().manual_seed(0)
    encoding = build_encoding("kronecker", 150)
    mu = encoding.centroids
    x1_hat = torch.rand(2, 3, 256, 256, generator=g) * 2 - 1
    labels = torch.randint(0, 150, (2, 256, 256), generator=g)
    baseline_name = "sq_distances, one (B, N, H, W) tensor"
    cases = {baseline_name: lambda: encoding.sq_distances(x1_hat)}
    for transform, tau, class_chunk in (
        ("neg_log", 1.0, None), ("neg_log", 0.5, None), ("neg_log", 0.05, None), ("neg_log", 1.0, 16),
        ("inverse", 1.0, None), ("identity", 1.0, None),
    ):
        name = f"correction {transform}, tau={tau:g}" + (f", class_chunk={class_chunk}" if class_chunk else "")
        cases[name] = partial(distance_correction, x1_hat, labels, mu, tau, 1e-3, transform, class_chunk)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    best = interleaved_best(cases, CPU_REPEATS, clock=time.process_time)
    torch.set_num_threads(threads)
    print(f"1b. distance_correction, N=150, B=2, 256x256, float32, single-thread CPU time "
          f"(this process, best of {CPU_REPEATS} interleaved repeats)")
    for name, seconds in best.items():
        print(f"   {name + ':':<45} {seconds * 1e3:7.1f} ms  ratio {seconds / best[baseline_name]:.2f}x")


def run_decode_case() -> None:
    g = torch.Generator().manual_seed(0)
    encoding = build_encoding("kronecker", 171)
    x = torch.rand(1, 3, 512, 512, generator=g) * 2 - 1
    logits = torch.randn(1, 171, 512, 512, generator=g)
    cases = {
        "argmax over (1, 171, 512, 512) logits": lambda: logits.argmax(1),
        "nearest-centroid decode": lambda: encoding.decode(x),
        "decode with class_chunk=32": lambda: encoding.decode(x, class_chunk=32),
    }
    default_threads = torch.get_num_threads()
    for threads in sorted({1, default_threads}):
        torch.set_num_threads(threads)
        best = interleaved_best(cases, DECODE_REPEATS)
        baseline = best["argmax over (1, 171, 512, 512) logits"]
        print(f"2. decoding N=171 at 1x512x512, {threads} thread(s) "
              f"(this process, best of {DECODE_REPEATS} interleaved repeats)")
        for name, seconds in best.items():
            print(f"   {name + ':':<40} {seconds * 1e3:7.1f} ms  ratio {seconds / baseline:.2f}x")
    torch.set_num_threads(default_threads)


def run_fixed_point_check() -> None:
    encoding = build_encoding("kronecker", 150)
    mu = encoding.centroids.double()
    x = mu.T.reshape(1, 3, 1, 150)  # every class at its own centroid
    labels = torch.arange(150).view(1, 1, 150)
    print("3. correction at x1_hat = mu_true, N=150 Kronecker, tau=1 (float64)")
    for eps in (1e-3, 1e-4):
        norm = distance_correction(x, labels, mu, 1.0, eps, "neg_log").norm(dim=1)
        print(f"   eps={eps:g}: ||grad|| mean {norm.mean():.3f}, max {norm.max():.3f}")


if __name__ == "__main__":
    run_correction_cases()
    run_correction_cpu_case()
    run_decode_case()
    run_fixed_point_check()
