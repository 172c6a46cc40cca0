"""The viewer's Gradio page, and serve(), which loads the checkpoints once and starts it.

The page: an image (an upload, or an example from the first checkpoint's dataset) and the settings
(sampler, steps, grid shifts, query scale) on the left; for each checkpoint, side by side, its label
map, overlay, confidence map, class legend with pixel shares, the trajectory (a frame per state x_t,
and which pixels changed class on the way) and the label PNG and overlay to download.

What a visitor can make the server read: only the files they upload (Gradio keeps them in its own
cache, and serves no other path: no allowed_paths are given) and the loaded dataset's examples by
index. Uploads over views.MAX_UPLOAD_BYTES are refused by Gradio before they are stored; a bad
upload (not an image, too many pixels, corrupt) or a failed run answers with a message in the page's
status line, and the server goes on.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import tempfile
from dataclasses import dataclass
from functools import reduce
from math import gcd
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from flowseg.data.io import image_to_tensor
from flowseg.serve.views import (MAX_STEPS, MAX_UPLOAD_BYTES, QUERY_SCALES, SAMPLERS, Settings, UploadError, View,
                                 ViewerModel, changes_picture, changes_summary, frame_caption, legend_html,
                                 read_upload, write_downloads)
from flowseg.visualize import colorize, confidence_image, overlay

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 7860
GRADIO_HINT = ("flowseg serve needs the gradio package: `make install`, or by hand "
               "`pip install -e '.[serve]' && pip install --no-deps gradio==6.31.0`")
CSS = """
.pixelated img { image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain; }
.legend .swatch { display: inline-block; width: 1em; height: 1em; border: 1px solid #888; }
.legend td, .legend th { padding: 1px 6px; }
"""


@dataclass
class Picture:
    """The image the page holds: its name (for the download files) and pixels."""
    name: str
    rgb: np.ndarray  # (H, W, 3) uint8


def _stem(name: str) -> str:
    """A file-name stem from an upload's or example's name: letters, digits, - and _ only."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", Path(name).stem)[:64] or "image"


class Viewer:
    """The page's logic over the loaded models, with no Gradio in it: each handler takes the widgets'
    values and returns theirs, so tests can call it directly."""

    def __init__(self, models: Sequence[ViewerModel], downloads: Path):
        self.models = list(models)
        self.downloads = downloads
        self.examples: list[tuple[str, np.ndarray]] = []
        self.examples_note = ""
        try:
            self.examples = self.models[0].examples()
        except (ValueError, OSError) as error:  # e.g. a dataset root that is not on this machine
            self.examples_note = f"no examples: {error}"

    @property
    def grid_shift_choices(self) -> list[int]:
        """Grid shifts that divide every model's patch size."""
        patch = reduce(gcd, (model.patch_size for model in self.models))
        return [k for k in range(1, patch + 1) if patch % k == 0]

    def example(self, name: str) -> Picture:
        for example_name, rgb in self.examples:
            if example_name == name:
                return Picture(example_name, rgb)
        raise ValueError(f"no example named {name!r}")

    def run(self, picture: Picture | None, settings: Settings) -> tuple[str, list[tuple[Any, ...]]]:
        """(status line, each model's answer) for a picture at settings. The page sends these first
        and the trajectories after them (Viewer.trajectory), so that the masks appear sooner."""
        if picture is None:
            raise ValueError("upload an image or pick an example first")
        answers, timings = [], []
        for index, model in enumerate(self.models):
            view = model.view(picture.rgb, settings)
            answers.append(self.answer(model, index, picture, view))
            timings.append(f"model {index + 1}: {view.seconds:.2f} s")
        height, width = picture.rgb.shape[:2]
        return f"{picture.name}, {width} x {height}: {'; '.join(timings)}", answers

    def answer(self, model: ViewerModel, index: int, picture: Picture, view: View) -> tuple[Any, ...]:
        """Label map, overlay, confidence map, legend, the view itself and the two download files."""
        palette = model.palette
        folder = Path(tempfile.mkdtemp(dir=self.downloads))  # one per answer: a download is never replaced
        labels_png, overlay_png = write_downloads(view, picture.rgb, palette, folder,
                                                  f"{_stem(picture.name)}_model{index + 1}")
        pictures = (colorize(view.labels, palette), overlay(image_to_tensor(picture.rgb), view.labels, palette),
                    confidence_image(view.confidence, 1.0 / len(model.class_names)))
        legend = legend_html(view.labels, model.class_names, palette)
        return (*pictures, legend, view, str(labels_png), str(overlay_png))

    def trajectory(self, view: View | None, model_index: int) -> tuple[Any, ...]:
        """The last step's index, its frame and caption, the changes picture and its summary."""
        if view is None:
            return 0, None, "", None, ""
        if view.frames is None:
            return 0, None, "the discriminative twin answers in one pass: it has no trajectory", None, ""
        palette, last = self.models[model_index].palette, len(view.frames) - 1
        return (last, colorize(view.frames[last], palette), frame_caption(view, last),
                changes_picture(view, palette), changes_summary(view))

    def frame(self, index: int, view: View | None, model_index: int) -> tuple[Any, str]:
        """Frame `index` of a view's trajectory and its caption."""
        if view is None or view.frames is None:
            return None, ""
        index = int(min(max(index, 0), len(view.frames) - 1))
        return colorize(view.frames[index], self.models[model_index].palette), frame_caption(view, index)


@dataclass
class Column:
    """One model's widgets: those of Viewer.answer, then those of Viewer.trajectory."""
    labels: Any
    overlay: Any
    confidence: Any
    legend: Any
    view: Any
    labels_png: Any
    overlay_png: Any
    slider: Any
    frame: Any
    caption: Any
    changes: Any
    changes_text: Any

    @property
    def answer(self) -> list[Any]:
        return [self.labels, self.overlay, self.confidence, self.legend, self.view, self.labels_png,
                self.overlay_png]

    @property
    def trajectory(self) -> list[Any]:
        return [self.slider, self.frame, self.caption, self.changes, self.changes_text]


def _model_column(gr, index: int, model: ViewerModel) -> Column:
    tag = f"model{index + 1}"

    def image(label: str, name: str):
        return gr.Image(label=label, interactive=False, format="png", elem_classes="pixelated",
                        elem_id=f"{name}-{tag}", height=256)

    gr.Markdown(f"### model {index + 1}\n{model.describe()}")
    with gr.Row():
        labels, overlay_image = image("label map", "labels"), image("overlay", "overlay")
    with gr.Row():
        confidence = image("confidence max_k p_k (dark: unsure)", "confidence")
        legend = gr.HTML(elem_id=f"legend-{tag}")
    with gr.Accordion("trajectory: x_t decoded at every step", open=True):
        slider = gr.Slider(0, MAX_STEPS, value=0, step=1, label="step", elem_id=f"step-{tag}")
        with gr.Row():
            frame = image("x_t decoded", "frame")
            changes = image("pixels that changed class (brighter: more often)", "changes")
        caption, changes_text = gr.Markdown(), gr.Markdown()
    with gr.Row():
        labels_png = gr.DownloadButton("label PNG", elem_id=f"download-labels-{tag}")
        overlay_png = gr.DownloadButton("overlay PNG", elem_id=f"download-overlay-{tag}")
    return Column(labels, overlay_image, confidence, legend, gr.State(None), labels_png, overlay_png, slider, frame,
                  caption, changes, changes_text)


def build_page(viewer: Viewer):
    """The Gradio Blocks of the page."""
    import gradio as gr

    defaults = viewer.models[0].default_settings()
    shift_choices = viewer.grid_shift_choices
    with gr.Blocks(title="flowseg viewer", analytics_enabled=False, delete_cache=(600, 3600)) as page:
        gr.Markdown("## flowseg viewer\nEach model segments the image from x_0 = image to x_1 = mask; "
                    "the trajectory shows x_t decoded to its nearest class centroid at every step.")
        picture = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1, min_width=260):
                upload = gr.File(label=f"upload an image (at most {MAX_UPLOAD_BYTES // 2**20} MB)",
                                 file_types=["image"], type="filepath", elem_id="upload")
                example = gr.Dropdown([name for name, _ in viewer.examples], value=None, elem_id="example",
                                      label="or an example of the dataset", info=viewer.examples_note or None)
                preview = gr.Image(label="image", interactive=False, format="png", elem_classes="pixelated",
                                   elem_id="preview", height=256)
                sampler = gr.Radio(list(SAMPLERS), value=defaults.sampler, label="sampler")
                steps = gr.Slider(1, MAX_STEPS, value=defaults.steps, step=1, label="steps")
                shifts = gr.Dropdown(shift_choices, label="grid shifts (k x k passes)",
                                     value=defaults.grid_shifts if defaults.grid_shifts in shift_choices else 1)
                query_scale = gr.Dropdown(list(QUERY_SCALES), value=defaults.query_scale, label="query scale")
                button = gr.Button("segment", variant="primary", elem_id="segment")
                status = gr.Markdown(elem_id="status")
            columns = []
            for index, model in enumerate(viewer.models):
                with gr.Column(scale=2):
                    columns.append(_model_column(gr, index, model))
        settings = [sampler, steps, shifts, query_scale]
        outputs = [status, picture] + [output for column in columns for output in column.answer]
        keep = (gr.skip(),) * (len(outputs) - 1)

        def answer(new_picture, *values):
            try:
                line, answers = viewer.run(new_picture, Settings(values[0], int(values[1]), int(values[2]),
                                                                 int(values[3])))
            except (ValueError, OSError, RuntimeError) as error:  # bad settings, a failed run: said in the page
                return (f"**error:** {error}", *keep)
            return (line, new_picture, *[value for values in answers for value in values])

        def trajectories(shown, *views):
            """The image and each model's trajectory, sent after the masks."""
            answers = []
            for index, view in enumerate(views):
                last, *rest = viewer.trajectory(view, index)
                answers += [gr.Slider(maximum=max(1, last), value=last, interactive=last > 0), *rest]
            return (None if shown is None else shown.rgb, *answers)

        def on_upload(path, *values):
            if path is None:
                return (gr.skip(), *keep)
            try:
                new_picture = Picture(Path(path).name, read_upload(path))
            except (UploadError, OSError) as error:
                return (f"**error:** {error}", *keep)
            return answer(new_picture, *values)

        def on_example(name, *values):
            if not name:
                return (gr.skip(), *keep)
            try:
                new_picture = viewer.example(name)
            except ValueError as error:  # a name not offered (sent through the API)
                return (f"**error:** {error}", *keep)
            return answer(new_picture, *values)

        heavy = {"outputs": outputs, "concurrency_id": "model"}  # one model run at a time
        follow = ([picture, *[column.view for column in columns]],
                  [preview, *[output for column in columns for output in column.trajectory]])
        upload.upload(on_upload, [upload, *settings], **heavy).then(trajectories, *follow)
        example.input(on_example, [example, *settings], **heavy).then(trajectories, *follow)
        button.click(answer, [picture, *settings], **heavy).then(trajectories, *follow)
        for index, column in enumerate(columns):
            column.slider.input(lambda i, view, index=index: viewer.frame(i, view, index),
                                [column.slider, column.view], [column.frame, column.caption],
                                trigger_mode="always_last")
    return page


def start(viewer: Viewer, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, block: bool = True):
    """Launch the page on host:port; with block=False return (page, url) with the server running."""
    page = build_page(viewer)
    _, url, _ = page.launch(server_name=host, server_port=port, prevent_thread_lock=not block, quiet=True,
                            max_file_size=MAX_UPLOAD_BYTES, ssr_mode=False, share=False, show_error=False,
                            css=CSS, footer_links=[])
    return page, url


def serve(checkpoints: Sequence[str | Path], host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          overrides: Sequence[str] = ()) -> None:
    """Load every checkpoint once (`overrides` adjust their saved configs, as in eval) and serve the
    page until interrupted."""
    if importlib.util.find_spec("gradio") is None:  # said before the models load
        raise ValueError(GRADIO_HINT)
    if not checkpoints:
        raise ValueError("give at least one checkpoint (or run folder) to serve")
    models = [ViewerModel.load(checkpoint, overrides) for checkpoint in checkpoints]
    downloads = Path(tempfile.mkdtemp(prefix="flowseg-serve-"))
    try:
        print(f"flowseg serve: {len(models)} model(s) loaded; open http://{host}:{port} (Ctrl-C stops)")
        start(Viewer(models, downloads), host, port)
    finally:
        shutil.rmtree(downloads, ignore_errors=True)
