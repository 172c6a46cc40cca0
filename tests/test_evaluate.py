"""Evaluation against oracle models whose predictions are known exactly, and on a real checkpoint."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import flowseg.evaluate as evaluate_module
from flowseg.config import load_config
from flowseg.distributed import DistContext
from flowseg.encoding import IGNORE_INDEX, build_encoding
from flowseg.evaluate import evaluate_checkpoint, evaluate_dataset, format_table, load_split
from flowseg.models import FieldOutput
from flowseg.predict import Segmenter

NUM_CLASSES = 4


def labels_in_image(image):
    """The oracle's knowledge: class id k is painted into the red channel as -1 + 2k/(N-1)."""
    return torch.round((image[:, 0] + 1) / 2 * (NUM_CLASSES - 1)).long()


def paint(label):
    image = torch.zeros(3, *label.shape)
    image[0] = -1 + 2 * label.clamp(max=NUM_CLASSES - 1).float() / (NUM_CLASSES - 1)
    return image


class OracleFlow(nn.Module):
    """v(x, t, I) = (mu_{f(label(I))} - x) / (1 - t): Euler lands exactly on mu_{f(label)} at t = 1."""

    def __init__(self, encoding, mapping):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # Segmenter reads the device from the parameters
        self.size = SimpleNamespace(patch_size=4)
        self.encoding, self.mapping, self.query_scales = encoding, torch.tensor(mapping), []

    def forward(self, x, t, image, query_scale=1):
        self.query_scales.append(query_scale)
        if x.shape[-1] % (4 * query_scale) or x.shape[-2] % (4 * query_scale):
            raise ValueError("not a multiple of the patch")
        target = self.encoding.centroids[self.mapping[labels_in_image(image)]].permute(0, 3, 1, 2)
        return FieldOutput((target - x) / (1 - t.view(-1, 1, 1, 1)).clamp_min(1e-6), None)


class OracleTwin(OracleFlow):
    def forward(self, image, query_scale=1):
        one_hot = nn.functional.one_hot(self.mapping[labels_in_image(image)], NUM_CLASSES)
        return FieldOutput(10.0 * one_hot.permute(0, 3, 1, 2).float(), None)


class Painted(torch.utils.data.Dataset):
    def __init__(self, labels):
        self.labels = labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        label = self.labels[index]
        return {"image": paint(label), "label": label, "name": f"painted_{index}"}


def make_labels(count=5, size=(8, 12), seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = [torch.randint(0, NUM_CLASSES, size, generator=generator) for _ in range(count)]
    labels[0][0, :3] = IGNORE_INDEX
    return labels


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


def oracle_segmenter(mapping=(0, 1, 2, 3), twin=False, *overrides):
    config = load_config(None, ["data.image_size=8", "eval.batch_size=2", *overrides])
    encoding = build_encoding("kronecker", NUM_CLASSES)
    model = OracleTwin(encoding, mapping) if twin else OracleFlow(encoding, mapping)
    return Segmenter(model, None if twin else encoding, config, torch.device("cpu"))


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


@pytest.mark.parametrize("shifts", [1, 4])
@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_whole_and_sliding_inference_are_exact_on_any_image_size(mode, shifts):
    labels = make_labels(count=3, size=(13, 22))  # not multiples of the patch (4) or the window (8)
    # the oracle answers pixel by pixel, so every grid offset must give it back unshifted
    segmenter = oracle_segmenter((0, 1, 2, 3), False, f"eval.inference={mode}", "eval.window=8", "eval.stride=5",
                                 f"eval.grid_shifts={shifts}")
    result = evaluate_dataset(segmenter, Painted(labels), NUM_CLASSES, step_counts=[2])[0]
    assert result.metrics.pixel_accuracy == 1.0 and result.metrics.miou == 1.0


def test_resize_inference_predicts_at_the_training_resolution_and_upsamples():
    label = torch.zeros(16, 24, dtype=torch.long)
    label[:, 12:] = 3
    segmenter = oracle_segmenter((0, 1, 2, 3), False, "eval.inference=resize", "eval.query_scale=2")
    prediction = segmenter.predict(paint(label)[None], steps=1)
    assert prediction.labels.shape == (1, 16, 24)
    assert segmenter.model.query_scales == [2]
    # the shorter side 16 becomes 8 * query_scale = 16 query pixels: no resampling, exact
    assert torch.equal(prediction.labels[0], label)
    assert torch.all(prediction.confidence > 0.99)
    small = oracle_segmenter((0, 1, 2, 3), False, "eval.inference=resize")
    blurred = small.predict(paint(label)[None], steps=1).labels[0]  # 16x24 -> 8x12 -> 16x24
    assert (blurred == label).float().mean() > 0.9
    assert torch.equal(blurred[:, :10], label[:, :10]) and torch.equal(blurred[:, 14:], label[:, 14:])


class CornerTwin(OracleTwin):
    """Every pixel gets the class painted at the top-left pixel of its 4 x 4 patch, so the answer
    depends on where the patch grid falls."""

    def forward(self, image, query_scale=1):
        corner = labels_in_image(image)[:, ::4, ::4].repeat_interleave(4, 1).repeat_interleave(4, 2)
        one_hot = nn.functional.one_hot(self.mapping[corner], NUM_CLASSES)
        return FieldOutput(10.0 * one_hot.permute(0, 3, 1, 2).float(), None)


def test_grid_shifts_average_every_offset_of_the_grid_except_across_the_seam():
    label = torch.randint(0, NUM_CLASSES, (12, 16), generator=torch.Generator().manual_seed(3))
    config = load_config(None, ["eval.inference=whole", "eval.grid_shifts=2"])
    segmenter = Segmenter(CornerTwin(None, (0, 1, 2, 3)), None, config, torch.device("cpu"))
    p = segmenter.probabilities(paint(label)[None])[0]  # (N, H, W)

    class_p = torch.softmax(10.0 * torch.eye(NUM_CLASSES), dim=1)  # p at a pixel the oracle calls class k
    height, width = label.shape
    expected = torch.empty_like(p)
    for y in range(height):
        for x in range(width):
            passes = []
            for dy in (0, 2):
                for dx in (0, 2):
                    ry, rx = (y + dy) % height, (x + dx) % width  # the pixel in the rolled image
                    if (dy and ry < 4) or (dx and rx < 4):
                        continue  # its patch is the rolled image's first row/column: it holds the seam
                    passes.append(class_p[label[(ry - ry % 4 - dy) % height, (rx - rx % 4 - dx) % width]])
            expected[:, y, x] = torch.stack(passes).mean(0)
    torch.testing.assert_close(p, expected)
    one_pass = Segmenter(CornerTwin(None, (0, 1, 2, 3)), None, load_config(None, ["eval.inference=whole"]),
                         torch.device("cpu")).probabilities(paint(label)[None])[0]
    assert not torch.allclose(p, one_pass)  # the offsets do change the answer here


def test_grid_shifts_that_do_not_divide_the_patch_are_refused():
    with pytest.raises(ValueError, match=r"eval.grid_shifts=3 must divide the model's patch size 4"):
        oracle_segmenter((0, 1, 2, 3), False, "eval.grid_shifts=3")


def test_table_lists_every_step_count_and_class():
    labels = make_labels()
    results = evaluate_dataset(oracle_segmenter((0, 1, 1, 3), False, "eval.inference=whole"), Painted(labels),
                               NUM_CLASSES, step_counts=[1, 10])
    table = format_table(results, ["sky", "road", "car", "tree"], "title line")
    assert table.startswith("title line")
    assert "     1 " in table and "    10 " in table
    for name in ("sky", "road", "car", "tree"):
        assert name in table


def test_empty_split_is_a_clear_error(monkeypatch):
    class Empty(Painted):
        num_classes = NUM_CLASSES

    monkeypatch.setattr(evaluate_module, "build_dataset", lambda *args, **kwargs: Empty([]))
    with pytest.raises(ValueError, match="dataset 'folder' split 'val' under /data is empty"):
        load_split(load_config("folder", ["data.root=/data"]), "val")


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


def test_a_checkpoint_of_another_model_size_is_refused(checkpoint, tmp_path):
    with pytest.raises(ValueError, match=r"model\.size=T/8, 7 classes\) does not fit this model"):
        evaluate_checkpoint(checkpoint, ["model.size=S/8"], tmp_path, progress=False)
