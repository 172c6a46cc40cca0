"""Evaluation against oracle models whose predictions are known exactly, and on a real checkpoint."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import flowseg.evaluate as evaluate_module
from flowseg.config import load_config
from flowseg.data import build_dataset
from flowseg.distributed import DistContext
from flowseg.encoding import IGNORE_INDEX
from flowseg.evaluate import default_out_dir, evaluate_checkpoint, evaluate_dataset, format_table, metrics_record
from flowseg.metrics import ConfusionMatrix
from flowseg.train import train
from oracles import NUM_CLASSES, Painted, make_labels, oracle_segmenter


def expected_iou(labels, mapping):
    """Independent count: IoU_k = |pred=k & gt=k| / |pred=k or gt=k| over labelled pixels."""
    gt = np.concatenate([l.numpy().ravel() for l in labels])
    keep = gt != IGNORE_INDEX
    gt = gt[keep]
    pred = np.asarray(mapping)[gt]
    iou = []
    for k in range(NUM_CLASSES):
        union = np.sum((pred == k) | (gt == k))
        iou.append(np.sum((pred == k) & (gt == k)) / union if union else np.nan)
    return np.array(iou)


@pytest.mark.parametrize("twin", [False, True])
def test_mistaking_class_2_for_1_gives_the_hand_counted_iou(twin):
    mapping = (0, 1, 1, 3)
    labels = make_labels()
    results = evaluate_dataset(oracle_segmenter(mapping, twin, "eval.inference=whole"), Painted(labels),
                               NUM_CLASSES, step_counts=[1, 3])
    expected = expected_iou(labels, mapping)
    assert [r.steps for r in results] == ([None] if twin else [1, 3])
    for result in results:
        np.testing.assert_allclose(result.metrics.iou, expected, equal_nan=True)
        assert result.metrics.miou == pytest.approx(np.nanmean(expected))
        assert result.metrics.iou[2] == 0.0  # class 2 occurs but is never predicted


def test_ranks_segment_disjoint_shards_that_sum_to_the_whole_split():
    labels = make_labels(count=7)
    segmenter = oracle_segmenter((0, 2, 1, 3), False, "eval.inference=whole")
    whole = evaluate_dataset(segmenter, Painted(labels), NUM_CLASSES)[0].metrics.confusion
    shards = [evaluate_dataset(segmenter, Painted(labels), NUM_CLASSES,
                               context=DistContext(rank, 3, rank, torch.device("cpu")))[0].metrics.confusion
              for rank in range(3)]
    assert torch.equal(sum(shards), whole)
    assert int(whole.sum()) == sum(int((l != IGNORE_INDEX).sum()) for l in labels)


def test_table_lists_every_step_count_and_class():
    labels = make_labels()
    results = evaluate_dataset(oracle_segmenter((0, 1, 1, 3), False, "eval.inference=whole"), Painted(labels),
                               NUM_CLASSES, step_counts=[1, 10])
    table = format_table(results, ["sky", "road", "car", "tree"], "title line")
    assert table.startswith("title line")
    assert "     1 " in table and "    10 " in table
    for name in ("sky", "road", "car", "tree"):
        assert name in table


def test_metrics_record_is_strict_json_with_absent_classes_as_null():
    matrix = ConfusionMatrix(3)
    matrix.update(torch.tensor([[[0, 0, 1]]]), torch.tensor([[[0, 1, 1]]]))  # (pred, gt); class 2 never occurs
    metrics = matrix.compute()
    # IoU 1/2 for classes 0 and 1, accuracy 1 and 1/2; class 2 has no pixels either way
    assert metrics_record(metrics) == {"miou": 0.5, "pixel_accuracy": pytest.approx(2 / 3),
                                       "mean_class_accuracy": 0.75}
    full = json.loads(json.dumps(metrics_record(metrics, ["sky", "road", "car"]), allow_nan=False))
    assert full["per_class"] == {"sky": {"iou": 0.5, "accuracy": 1.0}, "road": {"iou": 0.5, "accuracy": 0.5},
                                 "car": {"iou": None, "accuracy": None}}
    assert full["confusion"] == [[1, 0, 0], [1, 1, 0], [0, 0, 0]]
    empty = metrics_record(ConfusionMatrix(2).compute())
    assert math.isnan(ConfusionMatrix(2).compute().miou) and empty["miou"] is None


# ---- on a real (briefly trained) checkpoint ------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, train_tiny_checkpoint):
    return train_tiny_checkpoint(tmp_path_factory.mktemp("eval_run"), "shapes", "eval.steps=1")


def test_evaluate_checkpoint_writes_json_and_table(checkpoint, tmp_path):
    report = evaluate_checkpoint(checkpoint, ["eval.max_samples=3", "eval.sweep=[1,2]"], tmp_path / "out",
                                 progress=False)
    record = json.loads(report.json_path.read_text())
    assert record["images"] == 3 and record["split"] == "test" and record["step"] == 2
    assert [r["steps"] for r in record["results"]] == [1, 2]
    first = record["results"][0]
    assert set(first["per_class"]) == set(record["class_names"]) and len(record["class_names"]) == 7
    assert sum(map(sum, first["confusion"])) == 3 * 16 * 16
    assert report.table_path.read_text() == report.table
    assert (tmp_path / "out" / "config.yaml").is_file()


def test_evaluating_on_a_dataset_with_another_class_count_is_refused(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="trained on 7 classes but dataset 'mnist-seg' has 11"):
        evaluate_checkpoint(checkpoint, ["data.name=mnist-seg", "eval.max_samples=1"], tmp_path, progress=False)


def test_a_class_count_mismatch_names_the_classes_file(checkpoint, tmp_path, monkeypatch):
    root = tmp_path / "folder"
    for kind in ("images", "labels"):
        (root / kind / "val").mkdir(parents=True)
        Image.fromarray(np.zeros((16, 16) if kind == "labels" else (16, 16, 3), np.uint8)).save(root / kind / "val" / "0.png")
    (root / "classes.txt").write_text("background\ncircle\nsquare\n")
    folder = build_dataset("folder", "val", root=root, image_size=None)
    monkeypatch.setattr(evaluate_module, "load_split", lambda config, split: folder)
    with pytest.raises(ValueError, match=r"has 3 classes \(listed in .*classes.txt\)"):
        evaluate_checkpoint(checkpoint, [], tmp_path / "out", progress=False)


def test_default_results_live_beside_the_checkpoints_and_survive_their_pruning(tmp_path):
    """eval's default folder is a new RUN/eval/<checkpoint>-<split>[-n], so a second evaluation keeps the
    first's results and a resumed run that prunes the evaluated checkpoint keeps both; pruning touches
    nothing but step_* checkpoint folders."""
    run = tmp_path / "run"
    settings = ["data.image_size=16", "data.options.length=8", "train.batch_size=4", "train.val_every=0",
                "train.val_samples=2", "train.progress=false", "train.device=cpu", "train.ckpt_every=2",
                "train.keep_checkpoints=1", f"train.out_dir={run}"]
    first = train(load_config("shapes", [*settings, "train.steps=2"]))
    report = evaluate_checkpoint(run, ["eval.max_samples=1", "eval.steps=1"], progress=False)
    assert report.json_path == run / "eval" / "step_00000002-test" / "result.json"
    again = evaluate_checkpoint(run, ["eval.max_samples=2", "eval.steps=1"], progress=False)
    assert again.json_path == run / "eval" / "step_00000002-test-2" / "result.json"  # the first is kept
    (run / "checkpoints" / "notes.txt").write_text("mine")
    (run / "checkpoints" / "step_best").mkdir()
    train(load_config("shapes", [*settings, "train.steps=4"]), resume=True)
    assert not first.checkpoint.exists()  # pruned
    assert [json.loads(r.json_path.read_text())["images"] for r in (report, again)] == [1, 2]
    assert (run / "checkpoints" / "notes.txt").read_text() == "mine" and (run / "checkpoints" / "step_best").is_dir()


def test_a_checkpoint_outside_a_run_folder_keeps_its_results_beside_it(tmp_path):
    assert default_out_dir(tmp_path / "best", "val") == tmp_path / "eval" / "best-val"
    assert default_out_dir(tmp_path / "run" / "checkpoints" / "step_00000010", "val") == \
        tmp_path / "run" / "eval" / "step_00000010-val"
