"""How large the reshaped objective's correction is for a trained flow model (docs/core.md, "How large
the correction gets").

    .venv/bin/python benchmarks/correction_magnitude.py CHECKPOINT [CHECKPOINT ...] [--images 32]

For each checkpoint: the model at t = 0 (x_t = x_0) on the first --images canvases of its dataset's
val split, x1_hat = x_0 + v, and the correction lam * dPhi/dx1_hat of the checkpoint's objective
settings (tau, eps, lam, transform), unclipped whatever correction_clip says, so that runs trained with
and without the clip are measured alike. Prints per-pixel norm quantiles, the mean norm on
foreground (non-background) pixels, and the share of the squared correction carried by pixels whose
norm exceeds 1, next to ||x1_hat - x_1||, the plain flow-matching error.
"""
from __future__ import annotations

import argparse
import dataclasses

import torch

from flowseg.build import load_segmenter
from flowseg.data import build_dataset
from flowseg.objective import FlowMatchingObjective

QUANTILES = (0.5, 0.9, 0.99, 0.999)


@torch.no_grad()
def measure(checkpoint: str, images: int) -> str:
    segmenter, info = load_segmenter(checkpoint, ["eval.use_ema=false"])
    if segmenter.encoding is None or segmenter.config.objective.kind == "categorical":
        raise SystemExit(f"{checkpoint}: a discriminative or categorical checkpoint has no correction to measure")
    config = segmenter.config
    # every draw at t = 0 and no clip: the correction the paper's target would ask for
    settings = dataclasses.replace(config.objective, kind="reshaped", t_zero_fraction=1.0,
                                   correction_clip=None)
    objective = FlowMatchingObjective(segmenter.encoding, settings)
    dataset = build_dataset(config.data.name, "val", root=config.data.root, image_size=config.data.image_size)
    samples = [dataset[i] for i in range(min(images, len(dataset)))]
    image = torch.stack([s["image"] for s in samples])  # (B, 3, H, W)
    labels = torch.stack([s["label"] for s in samples])  # (B, H, W)
    model = segmenter.model.eval()
    f = objective.targets(lambda x_t, t, img: model(x_t, t, img).out, image, labels)
    x1 = segmenter.encoding.encode(labels, ignore_fill=f.x1_hat)
    norm = (f.v_target - f.v_star).norm(dim=1)[f.valid]  # (P,) per labelled pixel
    error = (f.x1_hat - x1).norm(dim=1)[f.valid]
    foreground = labels[f.valid] != 0
    large = norm > 1
    quantiles = " / ".join(f"{q:.3g}" for q in norm.quantile(torch.tensor(QUANTILES)).tolist())
    return (f"{info.path} (step {info.step}, tau {settings.tau:g}, eps {settings.eps:g}, lam {settings.lam:g})\n"
            f"  |lam grad| quantiles {QUANTILES}: {quantiles}; max {norm.max():.3g}\n"
            f"  mean |lam grad|: class != 0 {norm[foreground].mean():.3g}, class 0 {norm[~foreground].mean():.3g}\n"
            f"  pixels with |lam grad| > 1: {large.float().mean():.1%} of pixels, "
            f"{(norm[large] ** 2).sum() / (norm ** 2).sum():.1%} of the squared correction\n"
            f"  mean |x1_hat - x_1|: class != 0 {error[foreground].mean():.3g}, class 0 {error[~foreground].mean():.3g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--images", type=int, default=32, help="val canvases to measure on (default 32)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for checkpoint in args.checkpoints:
        print(measure(checkpoint, args.images))


if __name__ == "__main__":
    main()
