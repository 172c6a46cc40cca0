"""The CPU form of benchmarks/gpu_check.py: every part the GPU run measures runs here at toy sizes."""
import math

import pytest
import torch

from benchmarks import gpu_check
from flowseg.config import load_config
from flowseg.build import build_network


def test_the_trunk_alone_computes_the_tokens_the_whole_network_feeds_its_field():
    """The trunk-only timing and FLOP count stand for the network's own trunk: the same tokens."""
    torch.manual_seed(0)
    model, encoding = build_network(load_config("shapes", ["model.size=T/8"]), 5)
    for parameter in model.parameters():  # adaLN-Zero starts every block as the identity: make them act
        parameter.data.normal_(0, 0.05)
    captured = {}
    hook = model.trunk[-1].register_forward_hook(lambda module, args, out: captured.update(tokens=out))
    x_t, image, t = torch.randn(2, encoding.dim, 32, 32), torch.rand(2, 3, 32, 32), torch.rand(2)
    model(x_t, t, image)
    hook.remove()  # trunk_tokens runs the same blocks
    tokens = gpu_check.trunk_tokens(model, torch.cat([x_t, image], dim=1), t)
    assert tokens.shape == (2, 16, model.size.width)
    torch.testing.assert_close(tokens, captured["tokens"], rtol=0, atol=0)


def test_the_cpu_form_runs_every_part_and_reports_finite_figures(tmp_path):
    results = gpu_check.main(["--out", str(tmp_path), "--device", "cpu", "--tiny"])
    assert (tmp_path / "gpu_check.json").exists()
    failed = {name: part["error"] for name, part in results.items() if isinstance(part, dict) and "error" in part}
    assert not failed
    assert results["machine"]["matmul_tflops"] > 0
    attention = results["attention T/8 32"]
    assert attention["default_picks"] == ["flash"] and isinstance(attention["math"], float)  # torch's CPU choice
    assert results["adamw"]["fused_ms"] > 0 and results["adamw"]["foreach_ms"] > 0
    case = results["train T/8 32"]
    assert case["batch"] == 2 and case["trunk_tflop"] > 0
    for key in ("train_images_per_s", "trunk_tflops_per_s", "infer_1_images_per_s", "infer_10_images_per_s"):
        assert math.isfinite(case[key]) and case[key] > 0
    assert case["train_peak_gib"] is None  # no device memory count on the CPU
    assert results["ddp"]["returncode"] == 0 and "(gloo process group, DDP)" in results["ddp"]["group"]
    compiled = results["compile T/8 32"]
    assert compiled["compiled_step_ms"] > 0 and compiled["eager_step_ms"] > 0


def test_sizes_keeps_only_the_named_sizes_and_rejects_one_the_plan_lacks(tmp_path, capsys):
    results = gpu_check.main(["--out", str(tmp_path), "--device", "cpu", "--tiny", "--sizes", "T/8",
                              "--skip", "attention", "adamw", "ddp", "compile"])
    assert [name for name in results if name.startswith(("train", "compile", "attention"))] == ["train T/8 32"]
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--out", str(tmp_path), "--device", "cpu", "--tiny", "--sizes", "L/16"])
    assert exit_info.value.code == 2
    assert "'L/16'" in capsys.readouterr().err
