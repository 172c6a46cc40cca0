"""Datasets in the on-disk layouts of the standard benchmarks, and a generic image/label folder.

Each layout only decides which (image file, label file) pairs make a split and what the classes are;
`FilePairDataset` reads and checks the pairs. Paths are resolved when the dataset is built, so a missing
folder or label file is reported before training starts; a pair's files are read (and their sizes and
label values checked) when the sample is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from flowseg.data.base import JointTransform, SegmentationDataset, check_split
from flowseg.data.classes import (ADE20K_CLASSES, CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, COCO_STUFF_CLASSES,
                                  COCO_STUFF_RAW_NAMES, VOC_CLASSES, coco_stuff_raw_to_train, read_class_file,
                                  read_text_lines)
from flowseg.data.io import IMAGE_EXTENSIONS, check_label_values, image_to_tensor, read_image, read_label
from flowseg.encoding import IGNORE_INDEX


class FilePairDataset(SegmentationDataset):
    """(image file, label file) pairs. With reduce_zero_label, file value 0 becomes ignore and k becomes
    k - 1 (ADE20K stores "other" as 0 and its classes as 1..150). classes_file: where class_names came
    from, named when a label value lies outside them."""

    def __init__(self, pairs: list[tuple[Path, Path]], class_names: list[str], palette: np.ndarray | None = None,
                 transform: JointTransform | None = None, reduce_zero_label: bool = False,
                 classes_file: Path | None = None):
        super().__init__(class_names, palette, transform)
        self.pairs = pairs
        self.reduce_zero_label = reduce_zero_label
        self.classes_file = classes_file

    def __len__(self) -> int:
        return len(self.pairs)

    def sample_name(self, image_path: Path) -> str:
        return image_path.stem

    def load(self, index: int) -> tuple[Tensor, Tensor, str]:
        image_path, label_path = self.pairs[index]
        image, label = read_image(image_path), read_label(label_path)
        if image.shape[:2] != label.shape:
            raise ValueError(f"image {image_path} is {image.shape[1]}x{image.shape[0]} (WxH) but its label "
                             f"{label_path} is {label.shape[1]}x{label.shape[0]}")
        return image_to_tensor(image), torch.from_numpy(self.decode_label(label, label_path)), \
            self.sample_name(image_path)

    def decode_label(self, label: np.ndarray, label_path: Path) -> np.ndarray:
        """File values (H, W) -> label ids (H, W), after checking that each is a class or ignore."""
        try:
            check_label_values(label, label_path, self.num_classes, zero_is_ignore=self.reduce_zero_label)
        except ValueError as error:
            if self.classes_file is None:
                raise
            raise ValueError(f"{error}; the {self.num_classes} classes are those named in classes file "
                             f"{self.classes_file}") from None
        if self.reduce_zero_label:
            label = np.where((label == 0) | (label == IGNORE_INDEX), IGNORE_INDEX, label - 1)
        return label


def _require_dir(path: Path, layout: str) -> Path:
    if not path.is_dir():
        raise ValueError(f"{layout}: folder {path} not found (see docs/data.md for the expected layout)")
    return path


def _images_in(folder: Path, pattern: str = "*", extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> list[Path]:
    return sorted(p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in extensions)


def pair_files(images: list[Path], label_for: Callable[[Path], Path], layout: str,
               searched: Path) -> list[tuple[Path, Path]]:
    """Pair every image with its label file; no images, or images without labels, are errors."""
    if not images:
        raise ValueError(f"{layout}: no images found in {searched}")
    pairs = [(image, label_for(image)) for image in images]
    missing = [(image, label) for image, label in pairs if not label.is_file()]
    if missing:
        image, label = missing[0]
        raise ValueError(f"{layout}: {len(missing)} of {len(pairs)} images have no label file, e.g. {image} "
                         f"(expected {label})")
    return pairs




class ADE20KDataset(FilePairDataset):
    """ADEChallengeData2016/{images,annotations}/{training,validation}/ (root may be that folder or its
    parent). 150 classes, file value 0 = ignore (reduce_zero_label). classes_file replaces the class list
    for data in this layout with another class count."""

    SPLITS = {"train": "training", "val": "validation"}

    def __init__(self, root: str | Path, split: str = "train", transform: JointTransform | None = None,
                 classes_file: str | Path | None = None, reduce_zero_label: bool = True):
        check_split(split, self.SPLITS)
        root = Path(root)
        base = root / "ADEChallengeData2016" if (root / "ADEChallengeData2016").is_dir() else root
        image_dir = _require_dir(base / "images" / self.SPLITS[split], "ADE20K")
        label_dir = _require_dir(base / "annotations" / self.SPLITS[split], "ADE20K")
        pairs = pair_files(_images_in(image_dir, "*.jpg", (".jpg",)), lambda p: label_dir / f"{p.stem}.png",
                           "ADE20K", image_dir)
        class_names = ADE20K_CLASSES if classes_file is None else read_class_file(classes_file)
        super().__init__(pairs, class_names, transform=transform, reduce_zero_label=reduce_zero_label,
                         classes_file=None if classes_file is None else Path(classes_file))


class CityscapesDataset(FilePairDataset):
    """leftImg8bit/{split}/{city}/*_leftImg8bit.png with gtFine/{split}/{city}/*_gtFine_labelTrainIds.png
    (the 19 train ids made by cityscapesscripts' createTrainIdLabelImgs; 255 = ignore)."""

    SPLITS = ("train", "val", "test")

    def __init__(self, root: str | Path, split: str = "train", transform: JointTransform | None = None):
        check_split(split, self.SPLITS)
        root = Path(root)
        image_dir = _require_dir(root / "leftImg8bit" / split, "Cityscapes")
        label_dir = _require_dir(root / "gtFine" / split, "Cityscapes")

        def label_for(image: Path) -> Path:
            frame = image.name.removesuffix("_leftImg8bit.png")
            return label_dir / image.parent.name / f"{frame}_gtFine_labelTrainIds.png"

        pairs = pair_files(_images_in(image_dir, "*/*_leftImg8bit.png", (".png",)), label_for, "Cityscapes",
                           image_dir)
        super().__init__(pairs, CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, transform)

    def sample_name(self, image_path: Path) -> str:
        return image_path.name.removesuffix("_leftImg8bit.png")


class CocoStuffDataset(FilePairDataset):
    """images/{train2017,val2017}/<stem>.jpg with labels in annotations/{train2017,val2017}/: the train-id
    map <stem>_labelTrainIds.png (the 171 contiguous ids 0..170, 255 = ignore) when it exists, else the
    released stuffthingmaps <stem>.png (COCO-Stuff ids 0..181, 255 = unlabelled), converted on loading
    by the 182 -> 171 table (the 11 ids COCO never annotated become ignore)."""

    SPLITS = {"train": "train2017", "val": "val2017"}
    RAW_TO_TRAIN = coco_stuff_raw_to_train()  # (256,) stuffthingmaps value -> train id

    def __init__(self, root: str | Path, split: str = "train", transform: JointTransform | None = None):
        check_split(split, self.SPLITS)
        root = Path(root)
        image_dir = _require_dir(root / "images" / self.SPLITS[split], "COCO-Stuff")
        label_dir = _require_dir(root / "annotations" / self.SPLITS[split], "COCO-Stuff")

        def label_for(image: Path) -> Path:
            train_ids = label_dir / f"{image.stem}_labelTrainIds.png"
            return train_ids if train_ids.is_file() else label_dir / f"{image.stem}.png"

        pairs = pair_files(_images_in(image_dir, "*.jpg", (".jpg",)), label_for, "COCO-Stuff", image_dir)
        super().__init__(pairs, COCO_STUFF_CLASSES, transform=transform)

    def decode_label(self, label: np.ndarray, label_path: Path) -> np.ndarray:
        if label_path.name.endswith("_labelTrainIds.png"):
            return super().decode_label(label, label_path)
        raw_ids = len(COCO_STUFF_RAW_NAMES)
        bad = ((label < 0) | (label >= raw_ids)) & (label != IGNORE_INDEX)
        if bad.any():
            raise ValueError(f"COCO-Stuff: label file {label_path} (a stuffthingmaps map: there is no "
                             f"{label_path.stem}_labelTrainIds.png beside it) has value {int(label[bad].min())} "
                             f"({int(bad.sum())} pixels) outside the COCO-Stuff ids 0..{raw_ids - 1}; "
                             f"{IGNORE_INDEX} = unlabelled")
        return self.RAW_TO_TRAIN[label]


class VOCDataset(FilePairDataset):
    """VOC2012/{JPEGImages/<id>.jpg, SegmentationClass/<id>.png, ImageSets/Segmentation/<list>.txt}
    (root may be VOC2012, VOCdevkit or their parent). 21 classes, 255 = object borders (ignored).

    Split `s` lists its images in ImageSets/Segmentation/<s>.txt. The augmented lists (AUG_SPLITS: VOC
    with the SBD annotations added) take their labels from SegmentationClassAug/ instead. "train+aug"
    is train's pairs followed by aug's, the set mmsegmentation trains on. train_split names the split
    that "train" reads, so that training (always on "train") can use an augmented set.
    """

    SPLITS = ("train", "val", "trainval", "aug", "trainaug", "train_aug", "train+aug")
    AUG_SPLITS = ("aug", "trainaug", "train_aug")

    def __init__(self, root: str | Path, split: str = "train", transform: JointTransform | None = None,
                 train_split: str = "train"):
        check_split(split, self.SPLITS)
        if train_split == "val" or train_split not in self.SPLITS:
            raise ValueError(f"VOC: train_split={train_split!r} is not a training split; valid ones: "
                             f"{[name for name in self.SPLITS if name != 'val']}")
        root = Path(root)
        base = next((candidate for candidate in (root / "VOCdevkit" / "VOC2012", root / "VOC2012")
                     if candidate.is_dir()), root)
        pairs = [pair for part in (train_split if split == "train" else split).split("+")
                 for pair in self._list_pairs(base, part)]
        repeated = len(pairs) - len({image for image, _ in pairs})
        if repeated:
            raise ValueError(f"VOC: split {split!r} lists {repeated} image(s) twice (its lists overlap); each "
                             f"image must have one label")
        super().__init__(pairs, VOC_CLASSES, transform=transform)

    def _list_pairs(self, base: Path, split: str) -> list[tuple[Path, Path]]:
        """(image, label) of every id in ImageSets/Segmentation/<split>.txt. A line is an id, or an image
        path and a label path (the DeepLab list form "/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png"),
        of which the image's stem is the id."""
        list_file = base / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not list_file.is_file():
            raise ValueError(f"VOC: split list {list_file} not found (see docs/data.md for the expected layout)")
        ids = [Path(line.split()[0]).stem for line in read_text_lines(list_file, "VOC: split list")]
        if not ids:
            raise ValueError(f"VOC: split list {list_file} names no images")
        images = [base / "JPEGImages" / f"{image_id}.jpg" for image_id in ids]
        absent = [image for image in images if not image.is_file()]
        if absent:
            raise FileNotFoundError(f"VOC: {len(absent)} images listed in {list_file} do not exist, e.g. {absent[0]}")
        label_dir = base / ("SegmentationClassAug" if split in self.AUG_SPLITS else "SegmentationClass")
        return pair_files(images, lambda p: label_dir / f"{p.stem}.png", "VOC", list_file)


class FolderDataset(FilePairDataset):
    """root/images/<split>/* and root/labels/<split>/<same stem>.png, classes in root/classes.txt (one name
    per line; line k names label id k). A flat root/images/ without split folders is split "all"."""

    def __init__(self, root: str | Path, split: str = "train", transform: JointTransform | None = None,
                 classes_file: str | Path | None = None, reduce_zero_label: bool = False):
        root = Path(root)
        image_root, label_root = _require_dir(root / "images", "folder"), _require_dir(root / "labels", "folder")
        splits = sorted(p.name for p in image_root.iterdir() if p.is_dir())
        if _images_in(image_root):
            splits.append("all")
        if not splits:
            raise ValueError(f"folder: no images found in {image_root} (expected images/<split>/ folders, or the "
                             f"images directly in it for split 'all')")
        check_split(split, splits)
        image_dir, label_dir = (image_root, label_root) if split == "all" else (image_root / split, label_root / split)
        classes_file = root / "classes.txt" if classes_file is None else Path(classes_file)
        class_names = read_class_file(classes_file)
        pairs = pair_files(_images_in(image_dir), lambda p: label_dir / f"{p.stem}.png", "folder", image_dir)
        super().__init__(pairs, class_names, transform=transform, reduce_zero_label=reduce_zero_label,
                         classes_file=classes_file)
