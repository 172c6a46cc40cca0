"""Config layering (defaults <- YAML <- overrides), error messages, and the YAML round trip."""

import re

import pytest

from flowseg.config import (
    Config, DataConfig, EvalConfig, TrainConfig, available_configs, config_from_yaml, load_config, to_yaml,
)
from flowseg.data import AugmentConfig

SHIPPED = ("mnist-seg", "shapes", "ade20k", "cityscapes", "coco-stuff", "voc", "folder")


def test_every_dataset_has_a_shipped_config_that_loads():
    assert set(SHIPPED) <= set(available_configs())
    for name in SHIPPED:
        config = load_config(name)
        assert isinstance(config, Config)
        assert config.data.name == name


def test_defaults_then_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  steps: 7\n  batch_size: 6\ndata:\n  image_size: 48\n")
    config = load_config(path, ["train.steps=9", "objective.tau=0.25", "eval.sweep=[1,2,5]"])
    assert config.train.steps == 9                            # override beats YAML
    assert config.train.batch_size == 6                       # YAML beats default
    assert config.data.image_size == 48
    assert config.train.seed == TrainConfig().seed            # untouched default
    assert config.objective.tau == 0.25
    assert config.eval.sweep == [1, 2, 5] and config.eval.step_counts == [1, 2, 5]
    assert isinstance(config.data, DataConfig) and isinstance(config.eval, EvalConfig)


def test_later_override_of_the_same_key_wins():
    assert load_config(None, ["train.steps=3", "train.steps=4"]).train.steps == 4


def test_null_and_dict_overrides():
    config = load_config("mnist-seg", ["data.augment=null", "data.options.max_digits=2", "train.minutes=1.5"])
    assert config.data.augment is None
    assert config.data.options == {"max_digits": 2}
    assert config.train.minutes == 1.5


def test_augment_is_a_typed_section_or_null():
    assert load_config("shapes").data.augment == AugmentConfig()
    flipless = load_config("shapes", ["data.augment.hflip=false", "data.augment.scale_range=[0.8,1.25]"])
    assert flipless.data.augment == AugmentConfig(scale_range=(0.8, 1.25), hflip=False)
    assert config_from_yaml(to_yaml(flipless)) == flipless
    assert load_config("mnist-seg").data.augment is None  # the shipped config turns it off
    assert load_config("mnist-seg", ["data.augment.hflip=false"]).data.augment == AugmentConfig(hflip=False)
    assert load_config("mnist-seg", ["data.augment={}"]).data.augment == AugmentConfig()
    assert load_config("shapes", ["data.augment=null"]).data.augment is None
    with pytest.raises(ValueError, match=r"unknown config key 'data\.augment\.rotate'.*hflip"):
        load_config(None, ["data.augment.rotate=10"])
    with pytest.raises(ValueError, match="scale_range must satisfy 0 < low <= high"):
        load_config(None, ["data.augment.scale_range=[2.0,1.0]"])


def test_the_token_head_is_architecture_and_its_weight_a_loss_setting():
    config = load_config("mnist-seg")
    assert config.model.token_head and config.objective.token_loss_weight == 3.0
    assert not load_config(None).model.token_head
    with pytest.raises(ValueError, match=r"model\.token_head needs objective\.token_loss_weight > 0"):
        load_config("mnist-seg", ["objective.token_loss_weight=0"])
    assert not load_config("mnist-seg", ["model.token_head=false", "objective.token_loss_weight=0"]).model.token_head


@pytest.mark.parametrize("removed", ["optim.beta1=0.9", "optim.min_lr_ratio=0.1", "data.train_split=train",
                                     "objective.t_sampling=uniform", "model.token_loss_weight=1.0"])
def test_removed_knobs_are_unknown_keys(removed):
    with pytest.raises(ValueError, match="unknown config key"):
        load_config(None, [removed])


def test_unknown_key_names_the_key_and_where_it_came_from(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config key 'train\.stepz' in override 'train\.stepz=3'.*steps"):
        load_config("mnist-seg", ["train.stepz=3"])
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown config key 'optim\.learning_rate' in config file .*bad\.yaml"):
        load_config(path)
    with pytest.raises(ValueError, match=r"unknown config key 'trian'"):
        load_config(None, ["trian.steps=3"])


def test_wrong_type_names_the_key_and_value():
    with pytest.raises(ValueError, match=r"wrong type for config key 'train\.steps'.*'many'"):
        load_config(None, ["train.steps=many"])
    with pytest.raises(ValueError, match=r"train\.batch_size.*1\.5"):
        load_config(None, ["train.batch_size=1.5"])
    with pytest.raises(ValueError, match=r"eval\.sweep\[1\]"):
        load_config(None, ["eval.sweep=[1,x]"])


@pytest.mark.parametrize("override, message", [
    ("train.steps=0", r"train\.steps must be > 0, got 0"),
    ("optim.lr=-1", r"optim\.lr must be > 0"),
    ("optim.ema_decay=1.0", r"optim\.ema_decay must lie in \[0, 1\)"),
    ("model.kind=gan", r"model\.kind must be one of \('flow', 'discriminative'\), got 'gan'"),
    ("eval.sampler=rk4", r"eval\.sampler must be one of"),
    ("model.stem=mlp", r"model\.stem must be one of \('patch', 'conv'\), got 'mlp'"),
    ("eval.sweep=[]", r"eval\.sweep must be a non-empty list"),
    ("objective.kind=other", r"kind must be one of \('vanilla', 'reshaped', 'categorical'\)"),
    ("train.grad_accum=3", r"batch_size \(32\) must be divisible by train\.grad_accum \(3\)"),
])
def test_values_out_of_range_are_rejected(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize("override", ["train.steps", "steps", "=3", "train..steps=3", "train.steps-x=3"])
def test_malformed_overrides_are_rejected(override):
    with pytest.raises(ValueError, match="section.key=value"):
        load_config(None, [override])


def test_unknown_config_name_and_bad_files(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config 'mnist'.*mnist-seg"):
        load_config("mnist")
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(broken)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_config(scalar)


def test_yaml_round_trip_preserves_every_value():
    config = load_config("ade20k", ["train.steps=11", "eval.sweep=[1,10]", "model.dim=5", "data.options.x=1"])
    again = config_from_yaml(to_yaml(config))
    assert again == config
    assert config_from_yaml(to_yaml(config), ["eval.steps=3"]).eval.steps == 3


@pytest.mark.parametrize("override, value", [("eval.sweep=[1,2", "'[1,2'"), ("data.options.k={a: 1", "'{a: 1'"),
                                             ("train.out_dir='runs", "\"'runs\"")])
def test_override_values_that_are_not_yaml_name_the_override(override, value):
    with pytest.raises(ValueError, match=rf"override .*: the value {re.escape(value)} is not valid YAML \(.+\)"):
        load_config(None, [override])


@pytest.mark.parametrize("override, key, value", [
    ("optim.lr=.nan", "optim.lr", "nan"), ("optim.lr=.inf", "optim.lr", "inf"), ("optim.lr=nan", "optim.lr", "nan"),
    ("optim.lr=1e400", "optim.lr", "inf"), ("objective.tau=.inf", "objective.tau", "inf"),
    ("objective.lam=.nan", "objective.lam", "nan"), ("train.minutes=.inf", "train.minutes", "inf"),
    ("data.augment.scale_range=[0.5,.inf]", r"data.augment.scale_range\[1\]", "inf"),
    ("data.options.weights=[1, .nan]", r"data.options.weights\[1\]", "nan"),
])
def test_non_finite_numbers_are_refused_naming_the_key(override, key, value):
    with pytest.raises(ValueError, match=rf"config key '{key}' in override '.*' is {value}; settings must be finite"):
        load_config(None, [override])


def test_bad_yaml_and_non_finite_numbers_in_files_and_saved_configs(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: .nan\n")
    with pytest.raises(ValueError, match=r"config key 'optim.lr' in config file .*run.yaml is nan"):
        load_config(path)
    saved = to_yaml(load_config(None))
    with pytest.raises(ValueError, match=r"config key 'objective.tau' in saved config is inf"):
        config_from_yaml(saved.replace("tau: 0.5", "tau: .inf"))
    with pytest.raises(ValueError, match="config of checkpoint c is not valid YAML"):
        config_from_yaml(saved[:-5] + "\n  [unclosed", origin="config of checkpoint c")
    with pytest.raises(ValueError, match="config of checkpoint c must hold a mapping of sections, got list"):
        config_from_yaml("- 1\n", origin="config of checkpoint c")
