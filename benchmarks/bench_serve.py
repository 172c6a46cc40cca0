"""Latency of the viewer (`flowseg serve`): from an uploaded image to its first mask.

    .venv/bin/python benchmarks/bench_serve.py CHECKPOINT                  # the page's code, no server
    .venv/bin/python benchmarks/bench_serve.py CHECKPOINT --browser        # and through the page in chromium

An uploaded --size x --size PNG of random pixels (the worst case for PNG decoding) is segmented at
--steps Euler steps for each of --shifts grid shifts, --rounds times; the first round is the first
mask after the model is loaded. Reported:
    model run   ViewerModel.view: the model at the page's settings with every state x_t (the trajectory)
    handler     read_upload + Viewer.run: the PNG read, the model run, the pictures, legend and downloads
    browser     (--browser) from Playwright's set_input_files on the page's upload field until the
                status line names the file and the label map's <img> has loaded at the image's size, in
                Debian's chromium: the upload, Gradio's queue, the handler, the PNG encoding and the fetch
Prints figures only; asserts nothing.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from flowseg.serve.page import Picture, Viewer, start
from flowseg.serve.views import Settings, ViewerModel, read_upload


def summary(times: list[float]) -> str:
    rest = f", then median {statistics.median(times[1:]):.3f} s over {len(times) - 1}" if len(times) > 1 else ""
    return f"first {times[0]:.3f} s{rest}"


def time_handler(viewer: Viewer, path: Path, settings: Settings, rounds: int) -> tuple[list[float], list[float]]:
    """(model-run seconds, handler seconds) per round."""
    model_times, handler_times = [], []
    for _ in range(rounds):
        began = time.perf_counter()
        picture = Picture(path.name, read_upload(path))
        _, answers = viewer.run(picture, settings)
        handler_times.append(time.perf_counter() - began)
        model_times.append(answers[0][4].seconds)  # the View among the model's answer (Viewer.answer)
    return model_times, handler_times


def time_browser(viewer: Viewer, folder: Path, rgb: np.ndarray, rounds: int) -> list[float]:
    """Seconds per round from the upload to the label map in the page (at the page's default settings)."""
    from playwright.sync_api import sync_playwright

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server, url = start(viewer, port=port, block=False)
    times = []
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
            page = browser.new_page()
            page.set_default_timeout(120_000)
            page.goto(url)
            page.locator("#upload input[type=file]").wait_for(state="attached")
            for index in range(rounds):
                path = folder / f"upload_{index}.png"
                Image.fromarray(rgb).save(path)
                if index:
                    page.locator("#upload button[aria-label='Clear']").first.click()
                began = time.perf_counter()
                page.locator("#upload input[type=file]").set_input_files(str(path))
                page.locator("#status", has_text=f"{path.name}, ").wait_for()
                page.wait_for_function(
                    "size => { const img = document.querySelector('#labels-model1 img');"
                    " return img && img.complete && img.naturalWidth === size; }", arg=rgb.shape[1])
                times.append(time.perf_counter() - began)
            browser.close()
    finally:
        server.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a checkpoint folder or run folder (e.g. a short mnist-seg run)")
    parser.add_argument("--size", type=int, default=512, help="side of the uploaded square image")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--shifts", type=int, nargs="+", default=[1, 2], help="grid shifts to time")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--browser", action="store_true", help="also time the page in Debian's chromium")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    began = time.perf_counter()
    model = ViewerModel.load(args.checkpoint, ["eval.device=cpu"])
    print(f"{model.describe()}\nloaded in {time.perf_counter() - began:.2f} s; torch threads "
          f"{torch.get_num_threads()}; upload {args.size} x {args.size}, {args.steps} Euler step(s); "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    rgb = np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        path = folder / "upload.png"
        Image.fromarray(rgb).save(path)
        print(f"upload file {path.stat().st_size / 2**20:.2f} MB")
        viewer = Viewer([model], folder)
        for shifts in args.shifts:
            settings = Settings("euler", args.steps, shifts, 1)
            model_times, handler_times = time_handler(viewer, path, settings, args.rounds)
            print(f"grid shifts {shifts}: model run {summary(model_times)}; handler {summary(handler_times)}")
        for shifts in args.shifts if args.browser else ():
            # the page starts at its first model's eval.* settings: a model loaded with these
            page_model = ViewerModel.load(args.checkpoint, ["eval.device=cpu", "eval.sampler=euler",
                                                            f"eval.steps={args.steps}", f"eval.grid_shifts={shifts}"])
            browser_times = time_browser(Viewer([page_model], folder), folder, rgb, args.rounds)
            print(f"grid shifts {shifts}: browser, upload to label map {summary(browser_times)}")


if __name__ == "__main__":
    main()
