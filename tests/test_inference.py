"""The Segmenter against oracle models whose answers are known pixel by pixel: the inference modes on
images of any size, query_scale, grid shifts, and the settings it reads (the eval section only)."""

import pytest
import torch

from flowseg.build import build_network
from flowseg.config import load_config
from flowseg.encoding import IGNORE_INDEX
from flowseg.inference import Segmenter
from oracles import NUM_CLASSES, CornerTwin, make_labels, oracle_segmenter, paint


@pytest.mark.parametrize("shifts", [1, 4])
@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_whole_and_sliding_inference_are_exact_on_any_image_size(mode, shifts):
    # 13 x 22: not multiples of the patch (4) or the window (8); the oracle answers pixel by pixel,
    # so every window and every grid offset must give it back unshifted
    segmenter = oracle_segmenter((0, 1, 2, 3), False, f"eval.inference={mode}", "eval.window=8", "eval.stride=5",
                                 f"eval.grid_shifts={shifts}")
    for label in make_labels(count=3, size=(13, 22)):
        prediction = segmenter.predict(paint(label)[None], steps=2)
        labelled = label != IGNORE_INDEX
        assert prediction.labels.shape == (1, 13, 22)
        assert torch.equal(prediction.labels[0][labelled], label[labelled])


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


def test_a_real_network_answers_at_query_scale_times_its_trunk_resolution():
    config = load_config("mnist-seg", ["eval.query_scale=2", "eval.inference=whole", "eval.steps=1",
                                       "eval.grid_shifts=1"])
    model, encoding = build_network(config, 11)
    model.query_sizes = []
    model.register_forward_pre_hook(lambda module, args, kwargs: module.query_sizes.append(
        (tuple(args[0].shape[-2:]), kwargs["query_scale"])), with_kwargs=True)
    prediction = Segmenter(model, encoding, config, torch.device("cpu")).predict(torch.zeros(1, 3, 32, 48))
    assert prediction.labels.shape == (1, 32, 48) and int(prediction.labels.max()) < 11
    assert model.query_sizes == [((32, 48), 2)]  # one Euler step, queried at 32x48 with query_scale 2


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


def test_the_precision_comes_from_the_eval_section_not_the_train_section():
    image = paint(make_labels(count=1)[0])[None]  # (1, 3, 8, 12)
    # bf16 autocast refuses a CPU device: whichever section the Segmenter reads would raise here
    trained_in_bf16 = oracle_segmenter((0, 1, 2, 3), False, "eval.inference=whole", "train.precision=bf16")
    assert trained_in_bf16.predict(image, steps=1).labels.shape == (1, 8, 12)
    asked_for_bf16 = oracle_segmenter((0, 1, 2, 3), False, "eval.inference=whole", "eval.precision=bf16")
    with pytest.raises(ValueError, match="precision='bf16' needs a CUDA device"):
        asked_for_bf16.predict(image, steps=1)
