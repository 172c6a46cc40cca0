"""Training loop: schedule and EMA closed forms, the data stream, runs, what resume checks, divergence, bad input."""

import json
import math
import sys
import types

import numpy as np
import pytest
import torch

from safetensors.torch import save_file

from flowseg.build import build_network, load_segmenter
from flowseg.checkpoint import list_checkpoints, load_centroids, load_train_state, load_weights
from flowseg.cli import EXIT_USAGE, main
from flowseg.config import OptimConfig, load_config
from flowseg.data import build_dataset
from flowseg.encoding import random_centroids
from flowseg.models.field import ConvStem, FieldOutput
from flowseg.models.pixnerd import pixnerd_key_map
from flowseg.train import (
    COSINE_FLOOR, ExponentialMovingAverage, KeyedSamples, MetricsLog, StepBatches, TrainingDiverged, learning_rate,
    train,
)
from oracles import replace_encoding

TINY = ["data.name=shapes", "data.image_size=16", "data.augment=null", "data.options.length=12",
        "model.size=T/8", "train.batch_size=4", "train.steps=4", "train.log_every=1", "train.val_every=0",
        "train.ckpt_every=2", "train.keep_checkpoints=0", "train.val_samples=4", "train.progress=false",
        "train.tensorboard=false", "train.device=cpu", "optim.warmup_steps=2", "eval.steps=2"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: one thread is as fast, and much faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(tmp_path, *extra):
    return load_config(None, [*TINY, f"train.out_dir={tmp_path / 'run'}", *extra])


def tiny_datasets(train_size=12):
    return (build_dataset("shapes", "train", image_size=16, length=train_size),
            build_dataset("shapes", "val", image_size=16, length=4))


# ---- closed forms ------------------------------------------------------------------------------

def test_learning_rate_warmup_and_cosine_closed_form():
    optim, r = OptimConfig(lr=2.0, warmup_steps=4), COSINE_FLOOR
    assert learning_rate(optim, 0, 0.0) == pytest.approx(0.5)            # (0 + 1) / 4 of the peak
    assert learning_rate(optim, 3, 0.0) == pytest.approx(2.0)
    assert learning_rate(optim, 10, 0.5) == pytest.approx(2.0 * (r + (1 - r) * 0.5))
    assert learning_rate(optim, 10, 1.0) == pytest.approx(2.0 * r)       # floor at the end
    assert learning_rate(optim, 10, 0.25) == pytest.approx(2.0 * (r + (1 - r) * (1 + math.cos(math.pi / 4)) / 2))
    constant = OptimConfig(lr=2.0, warmup_steps=0, schedule="constant")
    assert learning_rate(constant, 0, 0.9) == 2.0


def test_ema_matches_the_closed_form_product():
    model = torch.nn.Linear(1, 1, bias=False)
    model.weight.data.fill_(0.0)
    ema = ExponentialMovingAverage(model, decay=0.5)
    model.weight.data.fill_(1.0)
    for _ in range(5):
        ema.update(model)
    # theta_ema = 1 - prod_n beta_n (theta_ema starts at 0, theta is 1), beta_n = min(0.5, (1 + n) / (10 + n))
    betas = [min(0.5, (1 + n) / (10 + n)) for n in range(5)]
    assert ema.model.weight.item() == pytest.approx(1 - np.prod(betas))
    assert not ema.model.weight.requires_grad


# ---- the data stream ---------------------------------------------------------------------------

def test_ranks_and_micro_batches_split_the_same_global_batches():
    single = iter(StepBatches(10, batch_size=4, world_size=1, rank=0, grad_accum=2, seed=3))
    ranks = [iter(StepBatches(10, batch_size=4, world_size=2, rank=r, grad_accum=1, seed=3)) for r in range(2)]
    for _ in range(7):  # crosses epoch boundaries (10 samples, 4 per step)
        assert next(single) + next(single) == next(ranks[0]) + next(ranks[1])


def test_each_epoch_visits_every_sample_once_in_a_seeded_order():
    stream = iter(StepBatches(6, batch_size=3, world_size=1, rank=0, grad_accum=1, seed=0))
    drawn = [item for _ in range(4) for item in next(stream)]
    assert [position for _, position in drawn] == list(range(12))
    first, second = [index for index, _ in drawn[:6]], [index for index, _ in drawn[6:]]
    assert sorted(first) == sorted(second) == list(range(6)) and first != second
    again = iter(StepBatches(6, batch_size=3, world_size=1, rank=0, grad_accum=1, seed=0, start_step=2))
    assert next(again) == drawn[6:9]  # resuming at step 2 continues the same stream
    other_seed = iter(StepBatches(6, batch_size=3, world_size=1, rank=0, grad_accum=1, seed=1))
    assert [i for _ in range(2) for i, _ in next(other_seed)] != first


def test_indivisible_batch_is_rejected():
    with pytest.raises(ValueError, match=r"batch_size \(6\) must be divisible by the number of ranks \(4\)"):
        StepBatches(10, batch_size=6, world_size=4, rank=0, grad_accum=1, seed=0)


def test_augmentation_depends_on_the_stream_position_only():
    dataset = build_dataset("shapes", "train", image_size=16, augment=True, length=4)
    keyed = KeyedSamples(dataset, seed=5)
    first = keyed[(1, 7)]["image"]
    keyed[(2, 3)]
    torch.rand(10)  # unrelated use of the global RNG
    assert torch.equal(keyed[(1, 7)]["image"], first)
    assert not torch.equal(keyed[(1, 8)]["image"], first)


# ---- runs --------------------------------------------------------------------------------------

def test_a_run_writes_config_logs_metrics_and_checkpoints(tmp_path):
    config = tiny_config(tmp_path, "train.val_every=2")
    result = train(config, datasets=tiny_datasets())
    run = tmp_path / "run"
    assert result.step == 4 and result.stopped_by == "steps"
    assert [p.name for p in list_checkpoints(run)] == ["step_00000002", "step_00000004"]
    assert result.checkpoint == run / "checkpoints" / "step_00000004"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    assert [r["step"] for r in records if r["kind"] == "val"] == [2, 4]
    assert all(math.isfinite(r["loss"]) for r in records if r["kind"] == "train")
    assert 0.0 <= result.validation.miou <= 1.0
    assert (run / "config.yaml").read_text().count("image_size: 16") == 1
    assert "stopped by the steps budget" in (run / "train.log").read_text()


def test_a_compiled_run_trains_the_same_function_as_an_eager_one(tmp_path):
    """train.compile=true trains through torch.compile (inductor, C++ on the CPU): the losses of the first
    steps agree with the eager run's to float32 rounding, and the checkpoint's keys carry no compile prefix."""
    losses = {}
    for compiled in (False, True):
        config = tiny_config(tmp_path / str(compiled), f"train.compile={str(compiled).lower()}", "train.steps=2",
                             "train.ckpt_every=0")
        result = train(config, datasets=tiny_datasets())
        records = (tmp_path / str(compiled) / "run" / "metrics.jsonl").read_text().splitlines()
        losses[compiled] = [r["loss"] for r in map(json.loads, records) if r["kind"] == "train"]
        keys = load_weights(result.checkpoint, "model").keys()
    assert len(losses[True]) == 2 and losses[True] == pytest.approx(losses[False], rel=1e-4)
    assert not any(key.startswith("_orig_mod") for key in keys)


def test_per_step_lines_go_to_the_log_file_only_also_beside_a_progress_bar(tmp_path, capsys):
    train(tiny_config(tmp_path, "train.progress=true"), datasets=tiny_datasets())
    console = capsys.readouterr()
    log_file = (tmp_path / "run" / "train.log").read_text()
    assert "'kind': 'train'" in log_file and "stopped by the steps budget" in log_file
    assert "'kind': 'train'" not in console.out + console.err
    assert "stopped by the steps budget" in console.err


@pytest.mark.parametrize("model", ["model.kind=discriminative", "objective.kind=categorical"])
def test_twin_and_categorical_flow_learn_a_small_training_set(tmp_path, model):
    """The loop optimises: the discriminative twin, and the categorical flow through its sampler, fit 4
    shapes images far better than at the start."""
    config = tiny_config(tmp_path, model, "train.steps=40", "train.ckpt_every=0",
                         "optim.lr=3e-3", "optim.ema_decay=0.0", "train.val_samples=4", "eval.split=train")
    train_set, _ = tiny_datasets(train_size=4)
    losses = []
    result = train(config, datasets=(train_set, train_set))
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "train":
            losses.append(record["loss"])
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    assert result.validation.pixel_accuracy > 0.8
    if model == "objective.kind=categorical":  # the flow rebuilds with its N-logit output
        assert load_segmenter(result.checkpoint)[0].model.field.out.out_features == 7


@pytest.mark.parametrize("kind", ["flow", "discriminative"])
def test_the_token_loss_joins_the_training_loss_and_its_head_travels_with_the_checkpoint(tmp_path, kind):
    config = tiny_config(tmp_path, f"model.kind={kind}", "model.token_head=true", "objective.token_loss_weight=0.5")
    result = train(config, datasets=tiny_datasets())
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "train"]
    main = "loss_fm" if kind == "flow" else "loss_ce"
    assert all(0 < r["loss_token"] < 10 for r in steps)
    if kind == "discriminative":  # the flow loss's own parts are not logged; the twin's one term is
        assert all(r["loss"] == pytest.approx(r[main] + 0.5 * r["loss_token"], rel=1e-5) for r in steps)
    segmenter, _ = load_segmenter(result.checkpoint)
    assert segmenter.model.token_head.out_features == 7


def test_a_conv_stem_run_saves_a_checkpoint_that_eval_and_predict_rebuild(tmp_path):
    config = tiny_config(tmp_path, "model.stem=conv")
    result = train(config, datasets=tiny_datasets())
    segmenter, _ = load_segmenter(result.checkpoint)  # strict key matching: the stem must be rebuilt
    assert isinstance(segmenter.model.stem, ConvStem)
    saved = load_weights(result.checkpoint, "ema")
    assert torch.equal(segmenter.model.stem.layers[0].weight, saved["stem.layers.0.weight"])


class Killed(Exception):
    pass


class DiesAfter(torch.utils.data.Dataset):
    """Wraps a dataset and raises after `calls` reads (a process killed mid-run)."""

    def __init__(self, dataset, calls):
        self.dataset, self.calls = dataset, calls
        self.class_names, self.palette, self.num_classes = dataset.class_names, dataset.palette, dataset.num_classes

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        self.calls -= 1
        if self.calls < 0:
            raise Killed()
        return self.dataset[index]


def test_a_killed_and_resumed_run_ends_with_the_same_weights(tmp_path):
    steps = ["train.steps=6", "train.ckpt_every=3"]
    straight = train(tiny_config(tmp_path / "a", *steps), datasets=tiny_datasets())
    train_set, val_set = tiny_datasets()
    with pytest.raises(Killed):  # dies while reading step 5's batch, after the step-3 checkpoint
        train(tiny_config(tmp_path / "b", *steps), datasets=(DiesAfter(train_set, 4 * 4 + 1), val_set))
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "run")] == ["step_00000003"]
    resumed = train(tiny_config(tmp_path / "b", *steps), resume=True, datasets=tiny_datasets())
    assert resumed.step == 6
    for which in ("model", "ema"):
        expected, actual = load_weights(straight.checkpoint, which), load_weights(resumed.checkpoint, which)
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=1e-6)
    expected_state = load_train_state(straight.checkpoint)["optimizer"]["state"]
    actual_state = load_train_state(resumed.checkpoint)["optimizer"]["state"]
    for key in expected_state:
        torch.testing.assert_close(actual_state[key]["exp_avg_sq"], expected_state[key]["exp_avg_sq"],
                                   rtol=0, atol=1e-8)


def test_resuming_a_finished_run_returns_its_final_checkpoint(tmp_path):
    first = train(tiny_config(tmp_path, "train.steps=2"), datasets=tiny_datasets())
    again = train(tiny_config(tmp_path, "train.steps=2"), resume=True, datasets=tiny_datasets())
    assert again.step == 2 and again.checkpoint == first.checkpoint
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_00000002"]


def test_an_existing_run_needs_resume(tmp_path):
    train(tiny_config(tmp_path, "train.steps=2"), datasets=tiny_datasets())
    with pytest.raises(ValueError, match="already holds checkpoints .*pass --resume"):
        train(tiny_config(tmp_path, "train.steps=2"), datasets=tiny_datasets())


# ---- what a resume checks ----------------------------------------------------------------------

def folder_contents(folder):
    return {path.relative_to(folder): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 2-step run that refused resumes must leave exactly as it is."""
    base = tmp_path_factory.mktemp("finished")
    train(tiny_config(base, "train.steps=2"), datasets=tiny_datasets())
    return base


@pytest.mark.parametrize("override, listed", [
    ("optim.lr=0.002", "optim.lr: 0.001 -> 0.002"),
    ("train.batch_size=8", "train.batch_size: 4 -> 8"),
    ("train.grad_accum=2", "train.grad_accum: 1 -> 2"),
    ("train.seed=7", "train.seed: 0 -> 7"),
    ("objective.kind=vanilla", "objective.kind: 'reshaped' -> 'vanilla'"),
    ("data.image_size=32", "data.image_size: 16 -> 32"),
    ("data.augment={}", "data.augment: None -> {'scale_range': "),
    ("data.options.length=10", "data.options.length: 12 -> 10"),
    ("data.options.max_objects=2", "data.options.max_objects: unset -> 2"),
    ("model.size=S/8", "model.size: 'T/8' -> 'S/8'"),
    ("train.val_samples=2", "train.val_samples: 4 -> 2"),
    ("eval.steps=5", "eval.steps: 2 -> 5"),
    ("train.steps=1", "train.steps: 2 -> 1"),          # a budget may grow, not shrink
    ("train.minutes=5", "train.minutes: None -> 5.0"),  # None: no time limit
])
def test_resume_refuses_every_setting_that_changes_what_is_trained(finished_run, override, listed):
    before = folder_contents(finished_run)
    with pytest.raises(ValueError, match="cannot resume .* was trained with other settings") as caught:
        train(tiny_config(finished_run, "train.steps=2", override), resume=True, datasets=tiny_datasets())
    assert listed in str(caught.value) and str(caught.value).count(" -> ") == 1
    assert folder_contents(finished_run) == before  # refused before anything is written


def test_a_refused_resume_lists_every_difference(finished_run):
    with pytest.raises(ValueError) as caught:
        train(tiny_config(finished_run, "train.steps=2", "optim.lr=0.01", "train.seed=3", "train.log_every=5"),
              resume=True, datasets=tiny_datasets())
    message = str(caught.value)
    assert "(optim.lr: 0.001 -> 0.01; train.seed: 0 -> 3)" in message  # train.log_every may change
    assert "step_00000002/config.yaml" in message


def test_a_resumed_run_may_grow_its_budgets(tmp_path):
    train(tiny_config(tmp_path, "train.steps=2", "train.minutes=60"), datasets=tiny_datasets())
    grown = train(tiny_config(tmp_path, "train.steps=3", "train.minutes=90"), resume=True, datasets=tiny_datasets())
    assert grown.step == 3
    unlimited = train(tiny_config(tmp_path, "train.steps=4"), resume=True, datasets=tiny_datasets())  # no time limit
    assert unlimited.step == 4
    assert [p.name for p in list_checkpoints(tmp_path / "run")][-1] == "step_00000004"


def test_a_moved_run_resumed_with_other_reporting_settings_ends_with_the_same_weights(tmp_path):
    """RESUME_MAY_CHANGE holds what cannot change the result: a run killed after its step-3 checkpoint,
    moved, and resumed with other reporting, validation and checkpoint cadences, matches a straight run;
    its metrics.jsonl lists every step once (the killed run's step-4 record is dropped)."""
    steps = ["train.steps=6", "train.ckpt_every=3"]
    straight = train(tiny_config(tmp_path / "a", *steps), datasets=tiny_datasets())
    train_set, val_set = tiny_datasets()
    with pytest.raises(Killed):  # dies while reading step 5's batch, after step 4 was logged
        train(tiny_config(tmp_path / "b", *steps), datasets=(DiesAfter(train_set, 4 * 4 + 1), val_set))
    (tmp_path / "b" / "run").rename(tmp_path / "moved")
    changed = ["train.log_every=2", "train.val_every=2", "train.ckpt_every=2", "train.keep_checkpoints=1",
               "train.progress=true", "train.tensorboard=true", "train.threads=1", "eval.device=cpu"]
    resumed = train(load_config(None, [*TINY, *steps, f"train.out_dir={tmp_path / 'moved'}", *changed]),
                    resume=True, datasets=tiny_datasets())
    for which in ("model", "ema"):
        expected, actual = load_weights(straight.checkpoint, which), load_weights(resumed.checkpoint, which)
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=1e-6)
    records = [json.loads(line) for line in (tmp_path / "moved" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 6]
    assert [r["step"] for r in records if r["kind"] == "val"] == [4, 6]


def test_a_fresh_run_drops_the_metrics_a_run_killed_before_its_first_checkpoint_left(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 9.0}\n{"kind": "tra')
    train(tiny_config(tmp_path, "train.steps=2"), datasets=tiny_datasets())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in records] == [("train", 1), ("train", 2), ("val", 2)]
    assert records[0]["loss"] != 9.0


def test_tensorboard_hides_what_a_killed_run_logged_after_the_checkpoint_resumed(tmp_path, monkeypatch):
    opened = []
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = lambda log_dir, **kwargs: opened.append((log_dir, kwargs))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    MetricsLog(tmp_path, enabled=True, tensorboard=True, start_step=3)
    assert opened == [(str(tmp_path / "tensorboard"), {"purge_step": 4})]  # events of steps >= 4 are hidden


def test_resume_of_a_missing_or_checkpointless_run_folder_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=r"nothing to resume: run folder .*run does not exist; leave out --resume"):
        train(tiny_config(tmp_path), resume=True, datasets=tiny_datasets())
    assert not run.exists()
    run.mkdir()
    (run / "train.log").write_text("a run killed before its first checkpoint\n")
    with pytest.raises(ValueError, match=r"nothing to resume in .*run: it holds no checkpoint"):
        train(tiny_config(tmp_path), resume=True, datasets=tiny_datasets())
    assert main(["train", "shapes", *TINY, f"train.out_dir={run}", "--resume"]) == EXIT_USAGE
    assert "nothing to resume" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["run.lock", "train.log"]


def test_a_resumed_run_needs_no_pretrained_file(tmp_path):
    """The weights of a resumed run come from its checkpoint: its pretrained file may have moved."""
    config = tiny_config(tmp_path, "train.steps=2")
    model, _ = build_network(config, 7)
    ours = model.state_dict()
    pretrained = tmp_path / "pixnerd.safetensors"
    save_file({theirs: ours[name] for theirs, name in pixnerd_key_map(model).items()}, pretrained)
    train(tiny_config(tmp_path, "train.steps=2", f"model.pretrained={pretrained}"), datasets=tiny_datasets())
    pretrained.unlink()
    resumed = train(tiny_config(tmp_path, "train.steps=3", f"model.pretrained={pretrained}"), resume=True,
                    datasets=tiny_datasets())
    assert resumed.step == 3


def test_a_resumed_run_keeps_the_centroids_its_checkpoint_stores(tmp_path):
    """Centroids are read from the checkpoint, not derived again: a run resumed from a checkpoint whose
    mu_k differ from what its config derives trains on, and saves, the stored ones."""
    first = train(tiny_config(tmp_path, "train.steps=2", "model.encoding=random"), datasets=tiny_datasets())
    stored = load_centroids(first.checkpoint)
    torch.testing.assert_close(stored, random_centroids(7, 3, seed=0).float())
    other = torch.linspace(-1, 1, 21).view(7, 3)
    replace_encoding(first.checkpoint, {"centroids": other})
    resumed = train(tiny_config(tmp_path, "train.steps=4", "model.encoding=random"), resume=True,
                    datasets=tiny_datasets())
    assert torch.equal(load_centroids(resumed.checkpoint), other)


class NanAfterCalls(torch.nn.Module):
    """The real model, whose output turns NaN from the `calls`-th forward pass on."""

    def __init__(self, model, calls):
        super().__init__()
        self.model, self.size, self.calls = model, model.size, calls

    def forward(self, *args, **kwargs):
        self.calls -= 1
        output = self.model(*args, **kwargs)
        return FieldOutput(output.out + float("nan"), output.token_logits) if self.calls < 0 else output


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    config = tiny_config(tmp_path, "train.steps=6", "train.ckpt_every=2")
    model, encoding = build_network(config, 7)
    with pytest.raises(TrainingDiverged) as caught:  # steps 1-3 are clean, step 4's loss is NaN
        train(config, network=(NanAfterCalls(model, 3), encoding), datasets=tiny_datasets())
    good = tmp_path / "run" / "checkpoints" / "step_00000002"
    assert caught.value.step == 4 and caught.value.last_checkpoint == good
    assert "diverged at step 4" in str(caught.value) and str(good) in str(caught.value)
    assert list_checkpoints(tmp_path / "run") == [good]
    assert load_train_state(good)["step"] == 2
    assert all(torch.isfinite(v).all() for v in load_weights(good, "model").values())


def test_train_and_validation_class_counts_must_agree(tmp_path):
    mnist = build_dataset("mnist-seg", "val", image_size=16, length=2)
    with pytest.raises(ValueError, match="training split has 7 classes but validation split has 11"):
        train(tiny_config(tmp_path), datasets=(tiny_datasets()[0], mnist))
