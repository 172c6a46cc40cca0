"""REPA: the alignment loss, the teacher's features on the token grid, the exposed trunk block, and
training with it (gradients reach the projector, the teacher stays frozen, --resume restores it)."""

import math

import pytest
import torch
from torch import nn

from flowseg.checkpoint import load_train_state, load_weights
from flowseg.config import load_config
from flowseg.distributed import setup
from flowseg.models import build_model
from flowseg.models.layers import rope_2d_angles
from flowseg.repa import align_block, alignment_loss, build_projector, teacher_features
from flowseg.train import REPA_STATE, Trainer, train

from test_teachers import dinov2_state
from test_train import DiesAfter, Killed, tiny_config, tiny_datasets


def test_alignment_loss_is_one_minus_the_mean_cosine():
    projected = torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[0.0, 2.0], [3.0, 0.0]]])  # (B=2, L=2, D=2)
    target = torch.tensor([[[5.0, 0.0], [0.0, 1.0]], [[0.0, -1.0], [1.0, 1.0]]])
    # cosines: 1, 1/sqrt(2), -1, 1/sqrt(2)
    expected = ((1 - 1) + (1 - 1 / math.sqrt(2)) + (1 + 1) + (1 - 1 / math.sqrt(2))) / 4
    assert alignment_loss(projected, target).item() == pytest.approx(expected, abs=1e-6)


def test_the_projector_is_three_linears_with_silu_between():
    projector = build_projector(32, 112)
    kinds = [type(layer) for layer in projector]
    assert kinds == [nn.Linear, nn.SiLU, nn.Linear, nn.SiLU, nn.Linear]
    assert [(layer.in_features, layer.out_features) for layer in projector[::2]] == [(32, 32), (32, 32), (32, 112)]


def test_default_block_is_pixnerds_eighth_but_at_most_half_the_trunk():
    assert align_block(None, 22) == 8 and align_block(None, 26) == 8
    assert align_block(None, 4) == 2 and align_block(None, 12) == 6
    assert align_block(3, 4) == 3


class GridTeacher(nn.Module):
    """A stand-in teacher: records its input size and returns feature (d, i, j) = 100 d + 10 i + j."""
    stride, dim = 4, 2

    def forward(self, image):
        self.seen = tuple(image.shape[-2:])
        batch, _, height, width = image.shape
        d, i, j = torch.meshgrid(torch.arange(self.dim), torch.arange(height // 4), torch.arange(width // 4),
                                 indexing="ij")
        return (100 * d + 10 * i + j).float().expand(batch, -1, -1, -1)


def test_teacher_features_come_on_the_token_grid_in_row_major_order():
    teacher = GridTeacher()
    features = teacher_features(teacher, torch.zeros(2, 3, 16, 24), (2, 3))
    assert teacher.seen == (8, 12)  # the image resized to stride x grid
    assert features.shape == (2, 6, 2)
    assert features[0, :, 0].tolist() == [0, 1, 2, 10, 11, 12]  # token l = row * 3 + col
    assert features[1, 4].tolist() == [11, 111]


@pytest.mark.parametrize("kind", ["flow", "discriminative"])
def test_expose_block_returns_the_tokens_after_that_block_and_changes_nothing_else(kind):
    torch.manual_seed(0)
    model = build_model(kind, "T/8", dim=3, num_classes=3)
    for block in model.trunk:  # non-zero gates, so every block changes the tokens
        nn.init.normal_(block.modulation.weight, std=0.1)
    x_t, t, image = torch.randn(2, 3, 16, 16), torch.rand(2), torch.randn(2, 3, 16, 16)
    args = (x_t, t, image) if kind == "flow" else (image,)
    inputs = torch.cat([x_t, image], 1) if kind == "flow" else image
    t_used = t if kind == "flow" else torch.zeros(2)
    plain, exposed = model(*args), model(*args, expose_block=3)
    assert plain.block_tokens is None
    torch.testing.assert_close(exposed.out, plain.out, rtol=0, atol=0)
    tokens = model.stem(inputs)
    condition = torch.nn.functional.silu(model.time_embed(t_used))
    rope = rope_2d_angles(2, 2, model.size.width // model.size.heads)
    for block in model.trunk[:3]:
        tokens = block(tokens, condition, rope)
    torch.testing.assert_close(exposed.block_tokens, tokens)
    for wrong in (0, len(model.trunk) + 1):
        with pytest.raises(ValueError, match="expose_block must be in 1..4"):
            model(*args, expose_block=wrong)


def test_repa_is_off_by_default_and_checks_its_keys():
    assert load_config(None).repa.teacher is None
    assert load_config("mnist-seg", ["repa.teacher=efficientnet-lite0"]).repa.weight == 0.5
    with pytest.raises(ValueError, match="repa.teacher must be one of"):
        load_config(None, ["repa.teacher=resnet"])
    with pytest.raises(ValueError, match="repa.teacher=dinov2 needs repa.weights"):
        load_config(None, ["repa.teacher=dinov2"])
    with pytest.raises(ValueError, match=r"repa.block \(5\) must be at most the depth of model.size T/8 \(4"):
        load_config(None, ["repa.teacher=efficientnet-lite0", "repa.block=5"])
    with pytest.raises(ValueError, match="repa.weight must be > 0"):
        load_config(None, ["repa.teacher=efficientnet-lite0", "repa.weight=0"])


REPA_ON = ["repa.teacher=efficientnet-lite0", "repa.block=2"]


@pytest.mark.parametrize("kind", ["flow", "discriminative"])
def test_a_repa_run_trains_the_projector_and_leaves_the_teacher_frozen(tmp_path, kind):
    config = tiny_config(tmp_path, *REPA_ON, f"model.kind={kind}", "train.steps=3")
    (tmp_path / "run").mkdir()
    trainer = Trainer(config, setup("cpu"), False, None, tiny_datasets())  # train() without the run lock
    projector = {key: value.clone() for key, value in trainer.repa.projector.state_dict().items()}
    teacher = {key: value.clone() for key, value in trainer.repa.teacher.state_dict().items()}
    result = trainer.run()
    records = [line for line in (result.run_dir / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    assert len(records) == 3 and all('"loss_repa"' in line for line in records)
    losses = [float(line.split('"loss_repa": ')[1].split(",")[0]) for line in records]
    assert all(0 < loss < 2 for loss in losses)  # 1 - cos lies in [0, 2]
    for key, value in trainer.repa.projector.state_dict().items():
        assert not torch.equal(value, projector[key]), f"the projector's {key} was not trained"
    for key, value in trainer.repa.teacher.state_dict().items():
        assert torch.equal(value, teacher[key]), f"the teacher's {key} changed"
    assert not trainer.repa.teacher.training and not any(p.requires_grad for p in trainer.repa.teacher.parameters())
    saved = load_train_state(result.checkpoint)[REPA_STATE]
    assert set(saved) == set(projector)
    assert not any(key.startswith("repa") or "teacher" in key for key in load_weights(result.checkpoint, "model"))


def test_a_dinov2_teacher_from_a_weights_file_trains(tmp_path):
    torch.save(dinov2_state(patch=14, grid=4, registers=4), tmp_path / "vit.pth")
    result = train(tiny_config(tmp_path, "repa.teacher=dinov2", f"repa.weights={tmp_path / 'vit.pth'}",
                               "train.steps=2"), datasets=tiny_datasets())
    assert result.step == 2 and math.isfinite(result.validation.miou)


def test_resume_restores_the_projector(tmp_path):
    straight = train(tiny_config(tmp_path / "a", *REPA_ON), datasets=tiny_datasets())
    train_set, val_set = tiny_datasets()
    with pytest.raises(Killed):  # dies while reading step 3's batch, after the step-2 checkpoint
        train(tiny_config(tmp_path / "b", *REPA_ON), datasets=(DiesAfter(train_set, 2 * 4 + 1), val_set))
    resumed = train(tiny_config(tmp_path / "b", *REPA_ON), resume=True, datasets=tiny_datasets())
    assert resumed.step == 4
    expected, actual = load_train_state(straight.checkpoint), load_train_state(resumed.checkpoint)
    for key, value in expected[REPA_STATE].items():
        torch.testing.assert_close(actual[REPA_STATE][key], value, rtol=0, atol=1e-6)
    for key, value in load_weights(straight.checkpoint, "model").items():
        torch.testing.assert_close(load_weights(resumed.checkpoint, "model")[key], value, rtol=0, atol=1e-6)
