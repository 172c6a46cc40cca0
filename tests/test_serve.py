"""The viewer without a browser: reading uploads within limits, a model run at the page's settings
and its trajectory, the pictures, legend and downloads, the page's handlers on good and bad input,
and the `flowseg serve` / `flowseg demo` command lines."""

import numpy as np
import pytest
import torch
from PIL import Image

from flowseg import cli
from flowseg.build import load_segmenter
from flowseg.encoding import IGNORE_INDEX
from flowseg.serve import views
from flowseg.serve.page import Picture, Viewer
from flowseg.serve.views import (Settings, UploadError, View, ViewerModel, changes_picture, changes_summary,
                                 class_shares, frame_caption, legend_html, read_upload, trajectory_scale, write_downloads)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, train_tiny_checkpoint):
    root = tmp_path_factory.mktemp("serve")
    return (train_tiny_checkpoint(root / "flow", "mnist-seg"),
            train_tiny_checkpoint(root / "twin", "mnist-seg", "model.kind=discriminative"),
            train_tiny_checkpoint(root / "categorical", "mnist-seg", "objective.kind=categorical"))


@pytest.fixture(scope="module")
def models(checkpoints):
    return [ViewerModel.load(checkpoint) for checkpoint in checkpoints]


def random_rgb(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_an_upload_is_read_as_rgb(tmp_path):
    rgb = random_rgb(5, 7)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.png")
    assert np.array_equal(read_upload(tmp_path / "a.png"), rgb)
    assert np.array_equal(read_upload(tmp_path / "grey.png"), np.repeat(rgb[..., :1], 3, axis=2))


def test_bad_uploads_are_refused_with_a_message_naming_the_file(tmp_path, monkeypatch):
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(UploadError, match=r"notes.png is not an image file that can be read"):
        read_upload(tmp_path / "notes.png")
    Image.fromarray(random_rgb(64, 64)).save(tmp_path / "cut.png")
    data = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[:len(data) // 2])  # a valid header, half the pixel data
    with pytest.raises(UploadError, match=r"cannot read image file cut.png") as caught:
        read_upload(tmp_path / "cut.png")
    assert str(tmp_path) not in str(caught.value)  # the server's folders are not shown in the page
    Image.new("RGB", (1025, 1024)).save(tmp_path / "huge.png")
    with pytest.raises(UploadError, match=r"huge.png is 1025 x 1024 pixels; the viewer takes images of at most "
                                          r"1048576 pixels \(1024 x 1024\)"):
        read_upload(tmp_path / "huge.png")
    Image.fromarray(random_rgb(32, 32)).save(tmp_path / "a.png")
    monkeypatch.setattr(views, "MAX_UPLOAD_BYTES", 100)
    with pytest.raises(UploadError, match=r"a.png is 0.0 MB; the viewer takes files of at most 0.0 MB"):
        read_upload(tmp_path / "a.png")


@pytest.mark.parametrize("settings, message", [
    ({"sampler": "rk4"}, "sampler must be one of"), ({"steps": 0}, r"steps must lie in \[1, 20\]"),
    ({"steps": 21}, r"steps must lie in \[1, 20\]"), ({"query_scale": 3}, "query scale must be one of"),
    ({"grid_shifts": 0}, "grid shifts must be >= 1")])
def test_settings_out_of_range_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        Settings(**settings)


def test_the_view_is_the_segmenters_answer_and_its_trajectory_ends_on_it(models, checkpoints):
    flow = models[0]
    rgb = random_rgb(20, 28)
    settings = Settings("heun", 3, 2, 2)
    view = flow.view(rgb, settings)
    reference, _ = load_segmenter(checkpoints[0], ["eval.sampler=heun", "eval.grid_shifts=2", "eval.query_scale=2"])
    expected = reference.predict(torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 127.5 - 1, steps=3)
    assert np.array_equal(view.labels, expected.labels[0].numpy())
    np.testing.assert_allclose(view.confidence, expected.confidence[0].numpy(), rtol=1e-5, atol=1e-6)
    assert view.frames.shape == (4, 20, 28) and np.array_equal(view.frames[-1], view.labels)
    changes = view.changes
    assert changes.shape == (20, 28) and 0 <= changes.min() and changes.max() <= 3
    assert flow.trained.config.eval.sampler == "euler"  # the loaded config is left as it was


def test_a_trajectory_over_its_memory_budget_is_drawn_at_a_smaller_size(models, monkeypatch):
    rgb = random_rgb(40, 60)
    full = models[0].view(rgb, Settings(steps=2))
    monkeypatch.setattr(views, "TRAJECTORY_BYTES", 3 * 11 * 40 * 60 * 4 // 4)  # a quarter: half the side
    assert trajectory_scale((40, 60), 2, 11) == pytest.approx(0.5)
    small = models[0].view(rgb, Settings(steps=2))
    assert small.frames.shape == (3, 20, 30)
    assert np.array_equal(small.labels, full.labels)  # the label map is still computed at full size


def test_a_categorical_flows_frames_are_its_posteriors_ending_on_the_answer(models, checkpoints):
    rgb = random_rgb(16, 16)
    view = models[2].view(rgb, Settings(steps=3))
    reference, _ = load_segmenter(checkpoints[2])
    posteriors = reference.probabilities(torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 127.5 - 1,
                                         steps=3, every_step=True)  # (1, 4, N, H, W): i = 0, 1, 2, then the answer
    assert view.posterior and view.frames.shape == (3, 16, 16)
    assert np.array_equal(view.frames, posteriors[0, :3].argmax(1).numpy())
    assert np.array_equal(view.labels, view.frames[-1])
    assert frame_caption(view, 2).startswith("the posterior p(x_1 | x_t) at t = 2/3 = 0.67")


def test_the_twin_has_no_trajectory(models):
    view = models[1].view(random_rgb(12, 12), Settings())
    assert view.labels.shape == (12, 12) and view.frames is None and view.changes is None


def test_legend_lists_the_present_classes_by_share_with_the_palette():
    labels = np.array([[2, 2, 2], [0, 1, 2]])
    palette = np.array([[10, 20, 30], [40, 50, 60], [70, 80, 90], [1, 2, 3]], dtype=np.uint8)
    np.testing.assert_allclose(class_shares(labels, 4), [1 / 6, 1 / 6, 4 / 6, 0])
    legend = legend_html(labels, ["sky", "<road>", "tree", "car"], palette)
    assert "3 of 4 classes present" in legend and "car" not in legend and "&lt;road&gt;" in legend
    rows = legend.split("<tr>")[2:]
    assert [row.split("<td>")[2].split("<")[0] for row in rows] == ["tree", "sky", "&lt;road&gt;"]
    assert "rgb(70, 80, 90)" in rows[0] and "66.7%" in rows[0] and "16.7%" in rows[1]


def test_frames_captions_and_the_changes_picture():
    # pixel 0 changes class three times, pixel 1 twice, pixel 2 once
    frames = np.array([[[1, 1, 1]], [[0, 0, 0]], [[1, 1, 0]], [[0, 1, 0]], [[0, 1, 0]]])
    view = View(frames[-1], np.ones((1, 3), np.float32), frames, 0.0)
    palette = np.array([[100, 0, 0], [0, 100, 0]], dtype=np.uint8)
    assert frame_caption(view, 0).startswith("x_t at t = 0/4 = 0.00: the image's colours")
    assert frame_caption(view, 3) == "x_t at t = 3/4 = 0.75: step 3 changed the class of 33.3% of the pixels"
    assert view.changes.tolist() == [[3, 2, 1]]
    assert changes_summary(view) == ("from x_0 to x_1, 100.0% of the pixels changed class, 66.7% more than once "
                                     "(at most 3 times)")
    picture = changes_picture(view, palette)
    # weights 1, 2/3, 1/3 towards white over 0.35 x the final colours (0, 100, 0), (0, 100, 0), (100, 0, 0)
    assert picture[0].tolist() == [[255, 255, 255], [170, 182, 170], [108, 85, 85]]
    still = View(frames[0], np.ones((1, 3), np.float32), frames[:1].repeat(2, axis=0), 0.0)
    assert still.changes.tolist() == [[0, 0, 0]] and changes_picture(still, palette)[0, 0].tolist() == [0, 35, 0]
    # a categorical flow's 4 frames are its posteriors at t = 0, 1/4, 2/4, 3/4; the last is the answer
    posterior = View(frames[3], np.ones((1, 3), np.float32), frames[:4], 0.0, posterior=True)
    assert frame_caption(posterior, 0) == ("the posterior p(x_1 | x_t) at t = 0/4 = 0.00: the classes the network "
                                           "gives the image before any step")
    assert frame_caption(posterior, 3).startswith("the posterior p(x_1 | x_t) at t = 3/4 = 0.75: step 3 changed")
    assert changes_summary(posterior).startswith("from x_0 to the answer, 100.0% of the pixels changed class")


def test_downloads_are_the_indexed_label_png_and_the_overlay(tmp_path):
    labels = np.array([[0, 1], [IGNORE_INDEX, 1]])
    palette = np.array([[0, 0, 0], [200, 100, 0]], dtype=np.uint8)
    view = View(labels, np.ones((2, 2), np.float32), None, 0.0)
    rgb = np.full((2, 2, 3), 100, np.uint8)
    labels_png, overlay_png = write_downloads(view, rgb, palette, tmp_path, "x")
    assert (labels_png.name, overlay_png.name) == ("x_labels.png", "x_overlay.png")
    with Image.open(labels_png) as picture:
        assert picture.mode == "P" and np.array_equal(np.asarray(picture), labels)
    overlay = np.asarray(Image.open(overlay_png))
    assert overlay[0, 1].tolist() == [150, 100, 50] and overlay[1, 0].tolist() == [100, 100, 100]


def test_the_pages_handlers_answer_for_every_model_and_say_what_went_wrong(models, tmp_path):
    viewer = Viewer(models, tmp_path)
    assert [name for name, _ in viewer.examples][:2] == ["mnist-seg_test_000000", "mnist-seg_test_000001"]
    assert viewer.grid_shift_choices == [1, 2, 4]  # the divisors of T/4's patch
    picture = Picture("my photo.png", random_rgb(10, 14))
    line, answers = viewer.run(picture, Settings(steps=2))
    assert line.startswith("my photo.png, 14 x 10: model 1: ") and "model 2: " in line
    for index, (model, outputs) in enumerate(zip(models, answers)):
        labels, overlay_picture, confidence, legend, view, labels_png, overlay_png = outputs
        assert labels.shape == overlay_picture.shape == confidence.shape == (10, 14, 3)
        colours = {tuple(colour) for colour in labels.reshape(-1, 3)}
        assert colours <= {tuple(colour) for colour in model.palette}
        assert labels_png.endswith(f"my_photo_model{index + 1}_labels.png") and overlay_png.endswith("_overlay.png")
        last, frame, caption, changes, summary = viewer.trajectory(view, index)
        if model.trained.config.objective.kind == "categorical":  # its posteriors at t = 0 and 1/2
            assert last == 1 and np.array_equal(frame, labels)
            assert caption.startswith("the posterior p(x_1 | x_t) at t = 1/2")
            assert changes.shape == (10, 14, 3) and summary.startswith("from x_0 to the answer")
        elif model.is_flow:
            assert last == 2 and np.array_equal(frame, labels) and caption.startswith("x_t at t = 2/2")
            assert changes.shape == (10, 14, 3) and summary.startswith("from x_0 to x_1")
        else:
            assert (last, frame, changes) == (0, None, None) and "no trajectory" in caption
    first_frame, caption = viewer.frame(0, answers[0][4], 0)
    assert first_frame.shape == (10, 14, 3) and "t = 0/2" in caption
    with pytest.raises(ValueError, match="upload an image or pick an example first"):
        viewer.run(None, Settings())
    with pytest.raises(ValueError, match="grid_shifts=3 must divide the model's patch size 4"):
        viewer.run(picture, Settings(grid_shifts=3))
    with pytest.raises(ValueError, match="no example named '../etc/passwd'"):
        viewer.example("../etc/passwd")


def test_serve_needs_a_checkpoint_and_names_a_missing_one(capsys, tmp_path):
    with pytest.raises(SystemExit):
        cli.main(["serve"])
    assert "the following arguments are required: CHECKPOINT" in capsys.readouterr().err
    assert cli.main(["serve", str(tmp_path / "nothing")]) == cli.EXIT_USAGE
    assert "does not exist" in capsys.readouterr().err


def test_serve_parses_host_port_and_overrides(monkeypatch):
    calls = []
    monkeypatch.setattr("flowseg.serve.page.serve", lambda *args, **kwargs: calls.append((args, kwargs)))
    assert cli.main(["serve", "a", "b", "--port", "9000", "eval.device=cpu"]) == 0
    assert calls == [((["a", "b"],), {"host": "127.0.0.1", "port": 9000, "overrides": ["eval.device=cpu"]})]
