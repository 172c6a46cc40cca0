"""The Segmenter against oracle models whose answers are known pixel by pixel: the inference modes on
images of any size, query_scale, grid shifts, and the settings it reads (the eval section only)."""

import io
import sys

import pytest
import torch

from flowseg import inference
from flowseg.build import build_network
from flowseg.config import load_config
from flowseg.encoding import IGNORE_INDEX
from flowseg.inference import Segmenter
from flowseg.models import FieldOutput
from oracles import (
    NUM_CLASSES, CornerTwin, OracleCategorical, OracleCleanEstimate, make_labels, oracle_segmenter, paint,
)


@pytest.mark.parametrize("batch_size", [1, 3, 64])
@pytest.mark.parametrize("shifts", [1, 4])
@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_whole_and_sliding_inference_are_exact_on_any_image_size(mode, shifts, batch_size):
    # 13 x 22: not multiples of the patch (4) or the window (8); the oracle answers pixel by pixel,
    # so every window and every grid offset must give it back unshifted, however many windows share a
    # forward (slide: 8 windows per image; eval.batch_size 1 or 3: one window of both images per
    # forward, 64: all 8 at once)
    segmenter = oracle_segmenter((0, 1, 2, 3), False, f"eval.inference={mode}", "eval.window=8", "eval.stride=5",
                                 f"eval.grid_shifts={shifts}", f"eval.batch_size={batch_size}")
    labels = make_labels(count=4, size=(13, 22))
    for pair in (labels[:2], labels[2:]):
        prediction = segmenter.predict(torch.stack([paint(label) for label in pair]), steps=2)
        assert prediction.labels.shape == (2, 13, 22)
        for predicted, label in zip(prediction.labels, pair):
            labelled = label != IGNORE_INDEX
            assert torch.equal(predicted[labelled], label[labelled])


def crops_per_forward(segmenter):
    """The batch sizes the segmenter's model is called with, recorded as it runs."""
    sizes = []
    segmenter.model.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    return sizes


@pytest.mark.parametrize("twin", [False, True])
def test_sliding_windows_go_through_the_model_batch_size_at_a_time_with_the_unbatched_answer(twin):
    # 30 x 45 with window 8, stride 5: 6 x 9 = 54 windows; p is compared, not only the argmax
    labels = make_labels(count=2, size=(30, 45), seed=1)
    image = torch.stack([paint(label) for label in labels])
    answers, forwards = {}, {}
    for batch_size in (1, 2, 10, 200):
        segmenter = oracle_segmenter((0, 1, 2, 3), twin, "eval.inference=slide", "eval.window=8", "eval.stride=5",
                                     f"eval.batch_size={batch_size}")
        forwards[batch_size] = crops_per_forward(segmenter)
        answers[batch_size] = segmenter.probabilities(image, steps=3)
    steps = 1 if twin else 3
    assert forwards[1] == [2] * 54 * steps  # one window of both images per forward
    assert forwards[10] == [10] * 10 * steps + [8] * steps  # 5 windows x 2 images; the last forward has 4
    assert forwards[200] == [108] * steps  # every window in one forward
    for batch_size in (2, 10, 200):
        assert torch.equal(answers[batch_size], answers[1])
    for predicted, label in zip(answers[1].argmax(1), labels):
        assert torch.equal(predicted[label != IGNORE_INDEX], label[label != IGNORE_INDEX])


def test_sliding_windows_of_a_real_network_batched_or_one_by_one_agree():
    overrides = ["model.size=T/8", "eval.inference=slide", "eval.window=32", "eval.stride=20", "eval.grid_shifts=1"]
    torch.manual_seed(0)
    model, encoding = build_network(load_config("mnist-seg", overrides), 11)
    image = torch.rand(2, 3, 40, 70, generator=torch.Generator().manual_seed(0)) * 2 - 1
    answers = [Segmenter(model, encoding, load_config("mnist-seg", [*overrides, f"eval.batch_size={size}"]),
                         torch.device("cpu")).probabilities(image, steps=2) for size in (1, 8)]
    torch.testing.assert_close(answers[1], answers[0], rtol=1e-5, atol=1e-6)


def test_long_sliding_inference_shows_progress_on_a_terminal(monkeypatch, capsys):
    segmenter = oracle_segmenter((0, 1, 2, 3), False, "eval.inference=slide", "eval.window=8", "eval.stride=5")
    image = paint(make_labels(count=1, size=(30, 45))[0])[None]
    segmenter.probabilities(image, steps=1)
    assert capsys.readouterr().err == ""  # not a terminal: no bar

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setattr(inference, "PROGRESS_DELAY_S", 0.0)
    segmenter.probabilities(image, steps=1)
    assert "slide:" in terminal.getvalue() and "0/54 " in terminal.getvalue()  # 54 windows


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


class FrozenAfter(torch.nn.Module):
    """A flow network whose velocity is zero from t = `stop` on: Euler's x_S is then its x at `stop`."""

    def __init__(self, network, stop):
        super().__init__()
        self.network, self.stop, self.size = network, stop, network.size

    def forward(self, x, t, image, query_scale=1):
        out = self.network(x, t, image, query_scale=query_scale)
        return FieldOutput(out.out * (t < self.stop - 1e-6).view(-1, 1, 1, 1), out.token_logits)


@pytest.mark.parametrize("mode,shifts", [("resize", 2), ("whole", 1), ("slide", 2)])
def test_every_step_gives_the_answer_of_the_integration_stopped_at_each_step(mode, shifts):
    # the reference for state i: the same network frozen from t_i = i / S on, so Euler's end point is x_{t_i};
    # two images of 20 x 28 check that the states stay with their image through shifts, resizing and windows
    overrides = ["model.size=T/8", "data.image_size=16", f"eval.inference={mode}", "eval.window=16",
                 "eval.stride=8", f"eval.grid_shifts={shifts}", "eval.batch_size=3"]
    config = load_config("mnist-seg", overrides)
    torch.manual_seed(0)
    network, encoding = build_network(config, 11)
    with torch.no_grad():  # an initialised field's output layer is zero: it would not move x at all
        for parameter in network.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    image = torch.rand(2, 3, 20, 28, generator=torch.Generator().manual_seed(1)) * 2 - 1
    steps = 3
    states = Segmenter(network, encoding, config, torch.device("cpu")).probabilities(image, steps, every_step=True)
    assert states.shape == (2, steps + 1, 11, 20, 28)
    for i in range(steps + 1):
        frozen = Segmenter(FrozenAfter(network, i / steps), encoding, config, torch.device("cpu"))
        torch.testing.assert_close(states[:, i], frozen.probabilities(image, steps), rtol=1e-5, atol=1e-6)
    plain = Segmenter(network, encoding, config, torch.device("cpu")).probabilities(image, steps)
    torch.testing.assert_close(states[:, -1], plain, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(states[:, 0], states[:, -1])  # the flow does move the answer


@pytest.mark.parametrize("steps", [1, 3])
def test_an_x_prediction_model_is_integrated_through_its_clean_estimate(steps):
    # Euler on v = (x1_hat - x) / (1 - t) lands on x1_hat = mu_f(label): p is the soft assignment of mu_f(label)
    segmenter = oracle_segmenter((2, 3, 0, 1), False, "objective.parameterization=x", oracle=OracleCleanEstimate)
    label = make_labels(count=1)[0]
    labelled = label != IGNORE_INDEX
    p = segmenter.probabilities(paint(label)[None], steps=steps)[0]  # (N, H, W)
    objective = segmenter.config.objective
    landed = segmenter.encoding.centroids[torch.tensor([2, 3, 0, 1])[label.clamp(max=3)]].permute(2, 0, 1)
    expected = segmenter.encoding.soft_assign(landed[None], objective.tau, objective.eps, objective.transform)[0]
    torch.testing.assert_close(p[:, labelled], expected[:, labelled])


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_a_categorical_flow_answers_its_last_posterior_not_the_nearest_centroid_of_its_mean(sampler):
    # the oracle's posterior at t_i = i / 4 favours class label + i: the answer must be the one at the
    # last state, t_3 (not x_0's, nor Heun's predictor call at t = 1), and every_step the one at each state
    segmenter = oracle_segmenter((0, 1, 2, 3), False, "objective.kind=categorical", f"eval.sampler={sampler}",
                                 oracle=OracleCategorical)
    labels = make_labels(count=2)
    image = torch.stack([paint(label) for label in labels])
    labelled = torch.stack(labels) != IGNORE_INDEX
    steps = 4

    def posterior_at(i):
        return segmenter.model(None, torch.full((2,), i / steps), image).out.softmax(1)

    def at_labelled(p):  # (B, N, H, W) -> (pixels, N)
        return p.permute(0, 2, 3, 1)[labelled]

    p = segmenter.probabilities(image, steps)
    torch.testing.assert_close(at_labelled(p), at_labelled(posterior_at(steps - 1)))
    # the test means something: some pixels' posterior mean is nearest a class other than the answer
    mean_nearest = segmenter.encoding.decode(segmenter.encoding.posterior_mean(p))
    assert (mean_nearest != p.argmax(1))[labelled].any()
    states = segmenter.probabilities(image, steps, every_step=True)
    assert states.shape == (2, steps + 1, NUM_CLASSES, 8, 12)
    for i in range(steps):
        torch.testing.assert_close(at_labelled(states[:, i]), at_labelled(posterior_at(i)))
    torch.testing.assert_close(states[:, -1], p)


def test_every_step_needs_a_flow_model():
    segmenter = oracle_segmenter((0, 1, 2, 3), True)
    with pytest.raises(ValueError, match="every_step needs a flow model"):
        segmenter.probabilities(paint(make_labels(count=1)[0])[None], every_step=True)
