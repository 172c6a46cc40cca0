"""The flowseg command end to end, and every user error as one clear line with a non-zero exit."""

import json

import numpy as np
import pytest
from PIL import Image

from flowseg.checkpoint import list_checkpoints
from flowseg.cli import EXIT_DIVERGED, EXIT_USAGE, main, split_overrides

TINY = ["data.image_size=16", "train.batch_size=4", "train.steps=2",
        "train.val_every=0", "train.val_samples=2", "train.progress=false", "train.device=cpu", "eval.steps=1"]
SHAPES = ["shapes", "data.options.length=8", *TINY]


def run_cli(capsys, *argv):
    code = main(list(map(str, argv)))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", *SHAPES, f"train.out_dir={run}"]) == 0
    return run


def write_folder_dataset(root, label_value=1, label_size=(16, 16), images=2):
    """The generic folder layout: images/{train,val}, labels/{train,val} (the same files), classes.txt (3 classes)."""
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for index in range(images):
            Image.fromarray(np.full((16, 16, 3), 100 + index, np.uint8)).save(root / "images" / split / f"{index}.png")
            label = np.zeros(label_size, np.uint8)
            label[4:8, 4:8] = label_value if index == images - 1 else 1
            Image.fromarray(label, mode="L").save(root / "labels" / split / f"{index}.png")
    (root / "classes.txt").write_text("background\ncircle\nsquare\n")
    return root


def folder_run(root, out, workers=0):
    return ["train", "folder", f"data.root={root}", "data.augment=null", "model.size=T/8",
            f"data.num_workers={workers}", *TINY, f"train.out_dir={out}"]


def test_split_overrides():
    assert split_overrides(["a.png", "eval.steps=3", "dir/", "x=1", "data.options.k=v"]) == \
        (["a.png", "dir/", "x=1"], ["eval.steps=3", "data.options.k=v"])
    assert split_overrides(["--out", "runs/lr=1", "shots/a.b=1.png", "./c.d=1.png"]) == \
        (["--out", "runs/lr=1", "shots/a.b=1.png", "./c.d=1.png"], [])  # paths holding '=' are no overrides
    assert split_overrides(["eval.steps=3", "--", "a.b=1.png"]) == (["--", "a.b=1.png"], ["eval.steps=3"])


def test_overrides_stand_anywhere_on_the_line(run_dir, tmp_path, capsys, monkeypatch):
    code, _, _ = run_cli(capsys, "eval", run_dir, "--out", tmp_path / "e", "eval.max_samples=2", "eval.sweep=[1,2]")
    assert code == 0
    assert [r["steps"] for r in json.loads((tmp_path / "e" / "result.json").read_text())["results"]] == [1, 2]
    monkeypatch.chdir(tmp_path)
    for name in ("a.png", "b.png", "shot.v2=x.png"):
        Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(name)
    # inputs around an override stay one list; a file named like an override goes after --
    code, out, _ = run_cli(capsys, "predict", run_dir, "--out", "p", "a.png", "eval.steps=0", "b.png")
    assert code == EXIT_USAGE  # the override reached the config: eval.steps must be > 0
    code, out, _ = run_cli(capsys, "predict", run_dir, "--out", "p", "a.png", "eval.steps=2", "b.png", "--",
                           "shot.v2=x.png")
    assert code == 0 and sorted(p.name for p in (tmp_path / "p").glob("*_overlay.png")) == \
        ["a_overlay.png", "b_overlay.png", "shot.v2=x_overlay.png"]


def test_predict_refuses_to_replace_inputs_and_earlier_outputs(run_dir, tmp_path, capsys):
    same = tmp_path / "same"
    same.mkdir()
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(same / "x.png")
    original = (same / "x.png").read_bytes()
    for flags in ([], ["--overwrite"]):
        code, _, err = run_cli(capsys, "predict", run_dir, same, "--out", same, *flags)
        assert code == EXIT_USAGE and "would replace the input image" in err and err.count("\n") == 1
    assert (same / "x.png").read_bytes() == original and [p.name for p in same.iterdir()] == ["x.png"]
    assert run_cli(capsys, "predict", run_dir, same, "--out", tmp_path / "p")[0] == 0
    code, _, err = run_cli(capsys, "predict", run_dir, same, "--out", tmp_path / "p")
    assert code == EXIT_USAGE and "is not empty" in err and "--overwrite" in err
    assert run_cli(capsys, "predict", run_dir, same, "--out", tmp_path / "p", "--overwrite")[0] == 0


def test_train_eval_predict_round_trip(run_dir, tmp_path, capsys):
    checkpoints = list_checkpoints(run_dir)
    assert [p.name for p in checkpoints] == ["step_00000002"]
    code, out, _ = run_cli(capsys, "eval", run_dir, "eval.max_samples=2", "eval.sweep=[1,2]", "--out", tmp_path / "e")
    assert code == 0 and "mIoU" in out and "striped square" in out
    assert [r["steps"] for r in json.loads((tmp_path / "e" / "result.json").read_text())["results"]] == [1, 2]
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(tmp_path / "photo.png")
    code, out, _ = run_cli(capsys, "predict", checkpoints[0], tmp_path / "photo.png", "eval.steps=2", "--out",
                           tmp_path / "p")
    assert code == 0 and "photo.png ->" in out
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["photo.png", "photo_confidence.png",
                                                                 "photo_overlay.png"]


@pytest.mark.parametrize("twin", [False, True])
def test_demo_writes_every_promised_file_and_refuses_a_used_folder(tmp_path, capsys, twin):
    # the demo's own model and data at a budget of 2 steps; only the training budget is cut
    budget = ["train.steps=2", "train.val_samples=4", "train.progress=false", "eval.max_samples=8"]
    argv = ["demo", "--out", tmp_path / "demo", *(["--twin"] if twin else []), *budget]
    code, out, _ = run_cli(capsys, *argv)
    assert code == 0 and "mnist-seg test mIoU" in out and "after 2 steps" in out
    demo = tmp_path / "demo"
    assert out.rstrip().endswith(f"flowseg serve {demo / 'run'}")  # the viewer's command closes the output
    result = json.loads((demo / "test" / "result.json").read_text())
    assert result["images"] == 8 and 0.0 <= result["results"][0]["miou"] <= 1.0
    assert [p.name for p in list_checkpoints(demo / "run")] == ["step_00000002"]
    pictures = sorted(p.name for p in (demo / "predictions").iterdir())
    assert len(pictures) == 8 * 5 and pictures[:5] == [f"mnist-seg_test_000000_{panel}.png" for panel in
                                                       ("confidence", "image", "labels", "overlay", "truth")]
    assert Image.open(demo / "predictions.png").size == (800, 1280)  # 5 panels x 8 rows at 160 px
    assert Image.open(demo / "training_curve.png").size == (900, 350)
    code, _, err = run_cli(capsys, *argv)
    assert code == EXIT_USAGE and "already holds a demo run" in err


def test_resume_continues_an_existing_run(run_dir, capsys):
    code, _, err = run_cli(capsys, "train", *SHAPES, f"train.out_dir={run_dir}")
    assert code == EXIT_USAGE and "pass --resume" in err
    code, _, _ = run_cli(capsys, "train", *SHAPES, f"train.out_dir={run_dir}", "--resume", "train.steps=3")
    assert code == 0 and list_checkpoints(run_dir)[-1].name == "step_00000003"


@pytest.mark.parametrize("argv, message", [
    (["train", "shapes", "train.stepz=3"], "unknown config key 'train.stepz'"),
    (["train", "shapes", "train.steps=lots"], "wrong type for config key 'train.steps'"),
    (["train", "shapes", "--resume", "eval.sweep=[1,2"],
     "override 'eval.sweep=[1,2': the value '[1,2' is not valid YAML"),
    (["train", "shapes", "optim.lr=.nan"], "config key 'optim.lr' in override 'optim.lr=.nan' is nan"),
    (["train", "shapes", "notes.txt"], "unrecognised arguments ['notes.txt']: not an argument or option of "
                                       "`flowseg train`, nor a section.key=value override"),
    (["train", "shapes", "--resume", "--stepz", "3"], "unrecognised arguments ['--stepz', '3']"),
    (["train", "no-such-config"], "unknown config 'no-such-config'"),
    (["eval", "/nonexistent/run"], "checkpoint /nonexistent/run does not exist"),
    (["train", "voc"], "dataset 'voc' is read from disk: give root="),
])
def test_user_errors_exit_with_one_clear_line(argv, message, capsys):
    code, out, err = run_cli(capsys, *argv)
    assert code == EXIT_USAGE
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_checkpoint_of_another_size_or_class_count(run_dir, capsys):
    code, _, err = run_cli(capsys, "eval", run_dir, "model.size=S/8")
    assert code == EXIT_USAGE and "does not fit this model" in err and "model.size=T/8" in err
    code, _, err = run_cli(capsys, "eval", run_dir, "data.name=mnist-seg")
    assert code == EXIT_USAGE and "trained on 7 classes but dataset 'mnist-seg' has 11" in err


def test_output_folder_not_writable(run_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    code, _, err = run_cli(capsys, "train", *SHAPES, f"train.out_dir={tmp_path / 'file' / 'run'}")
    assert code == EXIT_USAGE and "is not writable" in err
    code, _, err = run_cli(capsys, "eval", run_dir, "--out", tmp_path / "file" / "e")
    assert code == EXIT_USAGE and "is not writable" in err


def test_missing_and_unreadable_prediction_inputs(run_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, "predict", run_dir, tmp_path / "nope.png", "--out", tmp_path / "p")
    assert code == EXIT_USAGE and "nope.png does not exist" in err
    (tmp_path / "bad.jpg").write_bytes(b"garbage")
    code, _, err = run_cli(capsys, "predict", run_dir, tmp_path / "bad.jpg", "--out", tmp_path / "p")
    assert code == EXIT_USAGE and "cannot read image file" in err and "bad.jpg" in err
    assert not (tmp_path / "p").exists()


def test_label_out_of_range_names_the_file_and_value(tmp_path, capsys):
    root = write_folder_dataset(tmp_path / "data", label_value=7)
    code, _, err = run_cli(capsys, *folder_run(root, tmp_path / "run", workers=1))  # raised in a worker process
    assert code == EXIT_USAGE and "labels/train/1.png has value 7" in err
    assert list_checkpoints(tmp_path / "run") == []


def test_image_label_size_mismatch(tmp_path, capsys):
    root = write_folder_dataset(tmp_path / "data", label_size=(16, 12))
    code, _, err = run_cli(capsys, *folder_run(root, tmp_path / "run"))
    assert code == EXIT_USAGE and "is 16x16 (WxH) but its label" in err


def test_unreadable_training_image_and_empty_dataset(tmp_path, capsys):
    root = write_folder_dataset(tmp_path / "data")
    (root / "images" / "train" / "0.png").write_bytes(b"truncated")
    code, _, err = run_cli(capsys, *folder_run(root, tmp_path / "run"))
    assert code == EXIT_USAGE and "cannot read image file" in err and "0.png" in err
    empty = tmp_path / "empty"
    (empty / "images" / "train").mkdir(parents=True)
    (empty / "labels" / "train").mkdir(parents=True)
    (empty / "classes.txt").write_text("a\nb\n")
    code, _, err = run_cli(capsys, *folder_run(empty, tmp_path / "run2"))
    assert code == EXIT_USAGE and "no images found" in err


def test_nan_loss_exits_with_the_step_and_the_last_good_checkpoint(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", *SHAPES, "train.steps=4", "train.ckpt_every=1",
                           "optim.lr=1e30", "optim.warmup_steps=0", f"train.out_dir={tmp_path / 'run'}")
    good = list_checkpoints(tmp_path / "run")
    assert code == EXIT_DIVERGED and len(good) >= 1
    assert f"diverged at step {len(good) + 1}" in err and f"last good checkpoint is {good[-1]}" in err
