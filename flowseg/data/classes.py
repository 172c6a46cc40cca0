"""Class lists and palettes of the standard benchmarks, as data.

Label id k of a dataset is class_names[k]. ADE20K's ids are those after reduce_zero_label (file value
1 = "wall" becomes 0); COCO-Stuff's are the 171 contiguous train ids of the 164k release, derived here
from the official 182-id list. Class files and split lists are UTF-8 text.
"""

from __future__ import annotations

import codecs
from pathlib import Path

import numpy as np

from flowseg.encoding import IGNORE_INDEX


def pascal_palette(num_colours: int) -> np.ndarray:
    """The PASCAL VOC colour map: class c's colour spreads the bits of c over R, G, B from the top bit.

    Neighbouring class ids get clearly different colours, and 0 is black. Used for VOC itself and for
    every dataset without a palette of its own.
    """
    ids = np.arange(num_colours, dtype=np.int64)
    palette = np.zeros((num_colours, 3), dtype=np.int64)
    for bit in range(8):
        for channel in range(3):
            palette[:, channel] |= ((ids >> (3 * bit + channel)) & 1) << (7 - bit)
    return palette.astype(np.uint8)


VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]

CITYSCAPES_CLASSES = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
]
CITYSCAPES_PALETTE = np.array([
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
], dtype=np.uint8)

ADE20K_CLASSES = [
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
]

# COCO-Stuff's official ids 1..182 in order (the stuffthingmaps PNGs store id - 1, 255 = unlabelled):
# COCO's 91 thing ids, then the 91 stuff ids. COCO defined 11 thing ids it never annotated; the 171
# train ids are the other 182 - 11 ids, renumbered 0..170 in the same order.
_COCO_THING_IDS = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "street sign", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep",
    "cow", "elephant", "bear", "zebra", "giraffe", "hat", "backpack", "umbrella", "shoe", "eye glasses",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat",
    "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle", "plate", "wine glass", "cup", "fork",
    "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza",
    "donut", "cake", "chair", "couch", "potted plant", "bed", "mirror", "dining table", "window", "desk",
    "toilet", "door", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "blender", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush", "hair brush",
]
_COCO_UNANNOTATED = {"street sign", "hat", "shoe", "eye glasses", "plate", "mirror", "window", "desk", "door",
                     "blender", "hair brush"}
_COCO_STUFF_IDS = [
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage", "cardboard", "carpet",
    "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard", "curtain",
    "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile",
    "floor-wood", "flower", "fog", "food-other", "fruit", "furniture-other", "grass", "gravel", "ground-other",
    "hill", "house", "leaves", "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin",
    "net", "paper", "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield", "railing",
    "railroad", "river", "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf", "sky-other",
    "skyscraper", "snow", "solid-other", "stairs", "stone", "straw", "structural-other", "table", "tent",
    "textile-other", "towel", "tree", "vegetable", "wall-brick", "wall-concrete", "wall-other", "wall-panel",
    "wall-stone", "wall-tile", "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
]
COCO_STUFF_RAW_NAMES = _COCO_THING_IDS + _COCO_STUFF_IDS  # stuffthingmaps value v names COCO_STUFF_RAW_NAMES[v]
COCO_STUFF_CLASSES = [name for name in COCO_STUFF_RAW_NAMES if name not in _COCO_UNANNOTATED]


def coco_stuff_raw_to_train() -> np.ndarray:
    """(256,) int64 lookup table: stuffthingmaps value v -> train id, IGNORE_INDEX for 255, for the 11
    unannotated ids and for values above 181 (which the caller reports before looking up)."""
    table = np.full(256, IGNORE_INDEX, dtype=np.int64)
    annotated = [raw for raw, name in enumerate(COCO_STUFF_RAW_NAMES) if name not in _COCO_UNANNOTATED]
    table[annotated] = np.arange(len(annotated))
    return table


def read_text_lines(path: Path, what: str) -> list[str]:
    """The stripped non-blank lines of a UTF-8 text file (a UTF-8 byte-order mark is dropped). Any other
    encoding is refused naming the file, rather than read as wrong names: `what` is how errors call it."""
    data = path.read_bytes()
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise ValueError(f"{what} {path} is UTF-16 text (it starts with a UTF-16 byte-order mark); save it as UTF-8")
    if b"\0" in data:
        raise ValueError(f"{what} {path} holds NUL bytes (UTF-16 without a byte-order mark, or not text); "
                         f"save it as UTF-8 text")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise ValueError(f"{what} {path} is not UTF-8 text: byte 0x{data[error.start]:02x} on line {line} "
                         f"(latin-1 or another legacy encoding?); save it as UTF-8") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_class_file(path: str | Path) -> list[str]:
    """One class name per line of UTF-8 text (blank lines skipped); line k (from 0) names label id k."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"classes file not found: {path} (expected a text file with one class name per line)")
    names = read_text_lines(path, "classes file")
    if not names:
        raise ValueError(f"classes file {path} lists no class names (expected one name per line)")
    if len(set(names)) != len(names):
        duplicates = sorted({name for name in names if names.count(name) > 1})
        raise ValueError(f"classes file {path} repeats class name(s) {duplicates}")
    if len(names) > IGNORE_INDEX:
        raise ValueError(f"classes file {path} names {len(names)} classes; at most {IGNORE_INDEX} fit below the "
                         f"ignore label {IGNORE_INDEX}")
    return names
