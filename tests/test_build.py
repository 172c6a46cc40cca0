"""Objects made from a config: the network and its encoding, the dataset splits, and a trained model
read back from a checkpoint with the weights it was saved with."""

import shutil

import pytest
import torch
from safetensors.torch import save_file

import flowseg.build as build_module
from flowseg.build import build_network, load_segmenter, load_split, load_trained
from flowseg.checkpoint import EMA_FILE, ENCODING_FILE, load_centroids, load_weights
from flowseg.config import load_config
from flowseg.encoding import build_encoding
from flowseg.inference import Segmenter
from oracles import Painted, replace_encoding, replace_tensors


def test_the_flow_network_and_the_twin_each_give_p_over_the_classes():
    config = load_config("shapes", ["model.encoding=random", "model.dim=5", "eval.inference=whole", "eval.steps=1"])
    model, encoding = build_network(config, 7)
    assert encoding.centroids.shape == (7, 5)  # the flow model's x_1 lives in R^5, decoded against 7 mu_k
    twin_config = load_config("shapes", ["model.kind=discriminative", "eval.inference=whole"])
    twin, no_encoding = build_network(twin_config, 7)
    assert no_encoding is None
    image = torch.zeros(1, 3, 16, 16)
    for segmenter in (Segmenter(model, encoding, config), Segmenter(twin, None, twin_config)):
        p = segmenter.probabilities(image)
        assert p.shape == (1, 7, 16, 16)
        torch.testing.assert_close(p.sum(1), torch.ones(1, 16, 16))


def test_random_centroids_follow_train_seed():
    def centroids(seed):
        config = load_config("shapes", ["model.encoding=random", "model.dim=5", f"train.seed={seed}"])
        return build_network(config, 7)[1].centroids

    assert torch.equal(centroids(3), centroids(3)) and not torch.equal(centroids(3), centroids(4))


def test_evaluation_splits_do_not_depend_on_the_training_seed():
    def first_label(seed, training):
        config = load_config("shapes", ["data.image_size=16", "data.options.length=4", f"train.seed={seed}"])
        return load_split(config, "train" if training else "val", training=training)[0]["label"]

    assert torch.equal(first_label(0, False), first_label(1, False))
    assert not torch.equal(first_label(0, True), first_label(1, True))


def test_empty_split_is_a_clear_error(monkeypatch):
    class Empty(Painted):
        num_classes = 4

    monkeypatch.setattr(build_module, "build_dataset", lambda *args, **kwargs: Empty([]))
    with pytest.raises(ValueError, match="dataset 'folder' split 'val' under /data is empty"):
        load_split(load_config("folder", ["data.root=/data"]), "val")


# ---- a trained model read back from its checkpoint ----------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, train_tiny_checkpoint):
    return train_tiny_checkpoint(tmp_path_factory.mktemp("build_run"), "shapes")


def test_load_trained_takes_the_ema_weights_unless_told_otherwise(checkpoint):
    ema, raw = load_weights(checkpoint, "ema"), load_weights(checkpoint, "model")
    differing = [key for key in ema if not torch.equal(ema[key], raw[key])]
    assert differing  # two steps of training leave the average behind the raw weights
    key = differing[0]
    trained = load_trained(checkpoint, ["eval.steps=3"])
    assert torch.equal(trained.model.state_dict()[key], ema[key]) and not trained.model.training
    assert trained.config.eval.steps == 3 and trained.info.step == 2 and trained.info.num_classes == 7
    assert trained.encoding.centroids.shape[0] == 7
    assert torch.equal(load_trained(checkpoint, ["eval.use_ema=false"]).model.state_dict()[key], raw[key])


def test_a_checkpoint_from_before_the_null_embedding_loads_with_it_at_zero(checkpoint, tmp_path):
    """Earlier versions conditioned the trunk on SiLU(e_t), which is SiLU(e_t + y_0) at y_0 = 0."""
    older = tmp_path / "older"
    shutil.copytree(checkpoint, older)
    ema = load_weights(older, "ema")
    del ema["null_embedding"]
    replace_tensors(older, EMA_FILE, ema)
    state = load_trained(older).model.state_dict()
    assert torch.equal(state["null_embedding"], torch.zeros_like(state["null_embedding"]))
    assert all(torch.equal(state[key], value) for key, value in ema.items())


def test_a_checkpoint_of_another_model_size_is_refused(checkpoint):
    with pytest.raises(ValueError, match=r"model\.size=T/8, 7 classes\) does not fit this model"):
        load_trained(checkpoint, ["model.size=S/8"])


def test_the_segmenter_runs_on_eval_device_whatever_train_device_says(checkpoint):
    # train.device=cuda would be refused on a machine without CUDA, were it read
    segmenter, info = load_segmenter(checkpoint, ["eval.device=cpu", "train.device=cuda"])
    assert segmenter.device == torch.device("cpu") and info.step == 2
    assert next(segmenter.model.parameters()).device == torch.device("cpu")


# ---- the encoding a checkpoint was trained with -------------------------------------------------

@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory, train_tiny_checkpoint):
    return train_tiny_checkpoint(tmp_path_factory.mktemp("random_run"), "shapes", "model.encoding=random",
                                 "model.dim=5", "train.seed=3")


def test_the_centroids_travel_in_the_checkpoint_and_no_override_changes_them(random_checkpoint, monkeypatch):
    trained_with = build_encoding("random", 7, 5, seed=3).centroids
    assert torch.equal(load_centroids(random_checkpoint), trained_with)
    # train.seed drew the random mu_k; at eval it no longer does
    assert torch.equal(load_trained(random_checkpoint, ["train.seed=7"]).encoding.centroids, trained_with)
    # nor does the code that derives them: the stored ones are read as they are
    monkeypatch.setattr(build_module, "build_encoding", lambda *args, **kwargs: build_encoding("kronecker", 7, 5))
    assert torch.equal(load_trained(random_checkpoint).encoding.centroids, trained_with)


def test_model_settings_of_a_checkpoint_cannot_be_overridden(random_checkpoint):
    with pytest.raises(ValueError, match=r"does not fit this model \(model\.encoding: 'random' -> 'rd'\): the "
                                         r"model\.\* settings of a trained network cannot be overridden"):
        load_trained(random_checkpoint, ["model.encoding=rd"])
    # nor what the network outputs: v read as x1_hat, or as class logits, would be sampled wrongly
    for override in ("objective.parameterization=x", "objective.kind=categorical"):
        key, value = override.split("=")
        with pytest.raises(ValueError, match=rf"\({key}: '(v|reshaped)' -> '{value}'\).* nor objective\.kind and "
                                             r"objective\.parameterization"):
            load_trained(random_checkpoint, [override])
    assert load_trained(random_checkpoint, ["objective.tau=0.7"]).config.objective.tau == 0.7


def test_a_flow_checkpoint_without_centroids_is_refused(random_checkpoint, tmp_path):
    older = tmp_path / "older"
    shutil.copytree(random_checkpoint, older)
    replace_encoding(older, None)
    with pytest.raises(ValueError, match="holds no encoding.safetensors"):
        load_trained(older)


def test_stored_centroids_of_the_wrong_shape_are_refused(random_checkpoint, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(random_checkpoint, broken)
    replace_encoding(broken, {"centroids": torch.zeros(7, 3)})
    with pytest.raises(ValueError, match=r"encoding .*encoding.safetensors holds centroids of shape \(7, 3\), "
                                         r"but the checkpoint's 7 classes in model.dim 5 need \(7, 5\)"):
        load_trained(broken)
    replace_encoding(broken, {"mu": torch.zeros(7, 5)})
    with pytest.raises(ValueError, match="holds no 'centroids' tensor"):
        load_trained(broken)
    save_file({"centroids": torch.ones(7, 5)}, broken / ENCODING_FILE)  # bytes changed behind the record
    with pytest.raises(ValueError, match="is damaged"):
        load_trained(broken)
