"""`flowseg predict`: image files in, label PNGs, overlays and confidence maps out.

    CHECKPOINT, INPUT... (files, folders, glob patterns)  ->  OUT/<stem>.png             palette labels
                                                              OUT/<stem>_overlay.png     labels over the image
                                                              OUT/<stem>_confidence.png  max_k p_k
Every picture is written at its input's resolution; the segmenting itself is flowseg.inference's.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from flowseg.build import load_segmenter
from flowseg.checkpoint import ensure_writable_dir
from flowseg.data.io import IMAGE_EXTENSIONS, image_to_tensor, read_image
from flowseg.visualize import confidence_image, overlay, save_label_png, save_rgb_png


def expand_inputs(inputs: Sequence[str]) -> list[Path]:
    """Image files named directly, inside folders (not recursive), or matched by glob patterns."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if any(char in item for char in "*?["):
            matches = sorted(Path(match) for match in glob.glob(item))
            if not matches:
                raise FileNotFoundError(f"no file matches the pattern {item!r}")
            found += [match for match in matches if match.is_file()]
        elif path.is_dir():
            images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            if not images:
                raise ValueError(f"folder {path} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            found += images
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"input image {path} does not exist")
    if not found:
        raise ValueError("no input images given")
    return found


def output_stems(paths: Sequence[Path]) -> list[str]:
    """File stems for the outputs; inputs that share a stem (a/x.png, b/x.jpg) get a numeric suffix."""
    seen: dict[str, int] = {}
    stems = []
    for path in paths:
        count = seen.get(path.stem, 0)
        seen[path.stem] = count + 1
        stems.append(path.stem if count == 0 else f"{path.stem}_{count}")
    return stems


@dataclass
class PredictedFile:
    source: Path
    labels: Path
    overlay: Path
    confidence: Path
    mean_confidence: float


def predict_files(checkpoint: str | Path, inputs: Sequence[str], out_dir: str | Path,
                  overrides: Sequence[str] = ()) -> list[PredictedFile]:
    """Segment every input image with the checkpoint's model (`overrides` adjust its saved config);
    write <stem>.png, <stem>_overlay.png and <stem>_confidence.png to out_dir. Every input is read
    before the model is loaded and the folder made, so a bad input fails fast and leaves nothing."""
    paths = expand_inputs(inputs)
    images = [image_to_tensor(read_image(path)) for path in paths]  # each (3, H, W) in [-1, 1]
    segmenter, info = load_segmenter(checkpoint, overrides)
    out_dir = ensure_writable_dir(out_dir)
    results = []
    for path, stem, image in zip(paths, output_stems(paths), images):
        prediction = segmenter.predict(image[None])
        labels, confidence = prediction.labels[0].cpu(), prediction.confidence[0].cpu()
        written = PredictedFile(path, out_dir / f"{stem}.png", out_dir / f"{stem}_overlay.png",
                                out_dir / f"{stem}_confidence.png", float(confidence.mean()))
        save_label_png(labels, info.palette, written.labels)
        save_rgb_png(overlay(image, labels, info.palette), written.overlay)
        save_rgb_png(confidence_image(confidence, 1.0 / info.num_classes), written.confidence)
        results.append(written)
    return results
