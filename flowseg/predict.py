"""`flowseg predict`: image files in, label PNGs, overlays and confidence maps out.

    CHECKPOINT, INPUT... (files, folders, glob patterns)  ->  OUT/<stem>.png             palette labels
                                                              OUT/<stem>_overlay.png     labels over the image
                                                              OUT/<stem>_confidence.png  max_k p_k
Every picture is written at its input's resolution; the segmenting itself is flowseg.inference's.

Nothing is lost: every output name is decided before anything is written and no two outputs share
one; an output that is an input file (by path, symlink or hard link) is refused, always; a folder
that already holds files is refused unless overwrite=True (`--overwrite`), so an earlier run's outputs
are never replaced silently. Each file is written whole or not at all (visualize's atomic writes).
"""

from __future__ import annotations

import glob
import os
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


OUTPUT_SUFFIXES = ("", "_overlay", "_confidence")  # each input's files: <stem><suffix>.png


def _output_names(stem: str) -> list[str]:
    # casefolded: on macOS and Windows file systems X.png and x.png are one file
    return [f"{stem}{suffix}.png".casefold() for suffix in OUTPUT_SUFFIXES]


def output_stems(paths: Sequence[Path]) -> list[str]:
    """A stem per input, such that no two inputs' output files share a name: the input's own stem if
    none of its three names is taken yet, else the first free <stem>_1, <stem>_2, ..., in input order
    (x.png and x_overlay.png -> x, x_overlay_1; a.png, a.jpg, a_1.png -> a, a_1, a_1_1)."""
    taken: set[str] = set()
    stems = []
    for path in paths:
        stem, count = path.stem, 0
        while any(name in taken for name in _output_names(stem)):
            count += 1
            stem = f"{path.stem}_{count}"
        taken.update(_output_names(stem))
        stems.append(stem)
    return stems


def _file_id(path: Path) -> tuple[int, int]:
    status = os.stat(path)  # follows symlinks: a link to an input is that input
    return status.st_dev, status.st_ino


def check_outputs(inputs: Sequence[Path], outputs: Sequence[Path], out_dir: Path, overwrite: bool) -> None:
    """Refuse, before anything is written, an output file that is one of the inputs (always) and an
    output folder that already holds anything (unless overwrite)."""
    input_ids = {_file_id(path): path for path in inputs}
    for output in outputs:
        if output.exists() and _file_id(output) in input_ids:
            raise ValueError(f"output {output} would replace the input image {input_ids[_file_id(output)]}; "
                             f"give another --out folder")
    if not overwrite and out_dir.is_dir():
        held = sorted(entry.name for entry in out_dir.iterdir())
        if held:
            raise ValueError(f"output folder {out_dir} is not empty (it holds {', '.join(held[:3])}"
                             f"{', ...' if len(held) > 3 else ''}); give a new or empty folder, or pass "
                             f"--overwrite to write into it, replacing files of the same names")


@dataclass
class PredictedFile:
    source: Path
    labels: Path
    overlay: Path
    confidence: Path
    mean_confidence: float


def predict_files(checkpoint: str | Path, inputs: Sequence[str], out_dir: str | Path,
                  overrides: Sequence[str] = (), overwrite: bool = False) -> list[PredictedFile]:
    """Segment every input image with the checkpoint's model (`overrides` adjust its saved config);
    write <stem>.png, <stem>_overlay.png and <stem>_confidence.png to out_dir (stems: output_stems).
    Every input is read and every output checked (check_outputs) before the model is loaded and the
    folder made, so a bad input or output fails fast and leaves nothing."""
    paths = expand_inputs(inputs)
    pictures = [read_image(path) for path in paths]  # each (H, W, 3) uint8: a quarter of its float32 tensor
    out_dir = Path(out_dir)
    planned = [[out_dir / f"{stem}{suffix}.png" for suffix in OUTPUT_SUFFIXES] for stem in output_stems(paths)]
    check_outputs(paths, [path for files in planned for path in files], out_dir, overwrite)
    segmenter, info = load_segmenter(checkpoint, overrides)
    ensure_writable_dir(out_dir)
    results = []
    for path, files, picture in zip(paths, planned, pictures):
        image = image_to_tensor(picture)  # (3, H, W) in [-1, 1]
        prediction = segmenter.predict(image[None])
        labels, confidence = prediction.labels[0].cpu(), prediction.confidence[0].cpu()
        written = PredictedFile(path, *files, float(confidence.mean()))
        save_label_png(labels, info.palette, written.labels)
        save_rgb_png(overlay(image, labels, info.palette), written.overlay)
        save_rgb_png(confidence_image(confidence, 1.0 / info.num_classes), written.confidence)
        results.append(written)
    return results
