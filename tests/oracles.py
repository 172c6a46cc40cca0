"""Oracle models whose predictions are known exactly, shared by the inference and evaluation tests,
and checkpoint-editing helpers.

An oracle reads the class painted into the image's red channel (paint / labels_in_image) and answers
it through `mapping`, so a test knows every pixel's prediction before the Segmenter runs.
"""

import hashlib
import json
from types import SimpleNamespace

import torch
from safetensors.torch import save
from torch import nn

from flowseg.checkpoint import ENCODING_FILE, META_FILE
from flowseg.config import load_config
from flowseg.encoding import IGNORE_INDEX, build_encoding
from flowseg.inference import Segmenter
from flowseg.models import FieldOutput

NUM_CLASSES = 4


def labels_in_image(image):
    """The oracle's knowledge: class id k is painted into the red channel as -1 + 2k/(N-1)."""
    return torch.round((image[:, 0] + 1) / 2 * (NUM_CLASSES - 1)).long()


def paint(label):
    image = torch.zeros(3, *label.shape)
    image[0] = -1 + 2 * label.clamp(max=NUM_CLASSES - 1).float() / (NUM_CLASSES - 1)
    return image


class OracleFlow(nn.Module):
    """v(x, t, I) = (mu_{f(label(I))} - x) / (1 - t): Euler lands exactly on mu_{f(label)} at t = 1."""

    def __init__(self, encoding, mapping):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # Segmenter reads the device from the parameters
        self.size = SimpleNamespace(patch_size=4)
        self.encoding, self.mapping, self.query_scales = encoding, torch.tensor(mapping), []

    def forward(self, x, t, image, query_scale=1):
        self.query_scales.append(query_scale)
        if x.shape[-1] % (4 * query_scale) or x.shape[-2] % (4 * query_scale):
            raise ValueError("not a multiple of the patch")
        target = self.encoding.centroids[self.mapping[labels_in_image(image)]].permute(0, 3, 1, 2)
        return FieldOutput((target - x) / (1 - t.view(-1, 1, 1, 1)).clamp_min(1e-6), None)


class OracleCleanEstimate(OracleFlow):
    """x-prediction: x1_hat(x, t, I) = mu_{f(label(I))}; integrated as v = (x1_hat - x) / (1 - t), Euler
    lands on it at t = 1 (read as a velocity it would not)."""

    def forward(self, x, t, image, query_scale=1):
        return FieldOutput(self.encoding.centroids[self.mapping[labels_in_image(image)]].permute(0, 3, 1, 2), None)


class OracleCategorical(OracleFlow):
    """Categorical: at time t the posterior puts 0.34 on f(label) + floor(4 t) and 0.33 on each of the next
    two classes (mod N), whatever x; so with 4 steps the posterior at state x_i favours f(label) + i, and
    the posterior mean of such a p can lie nearest a third class."""

    def forward(self, x, t, image, query_scale=1):
        shift = torch.floor(4 * t + 1e-6).long().view(-1, 1, 1)
        first = (self.mapping[labels_in_image(image)] + shift) % NUM_CLASSES  # (B, H, W)
        p = sum(share * nn.functional.one_hot((first + shift) % NUM_CLASSES, NUM_CLASSES)
                for shift, share in ((0, 0.34), (1, 0.33), (2, 0.33)))
        return FieldOutput(p.clamp_min(1e-12).log().permute(0, 3, 1, 2).float(), None)


class OracleTwin(OracleFlow):
    def forward(self, image, query_scale=1):
        labels = self.mapping[labels_in_image(image)]
        return FieldOutput(10.0 * nn.functional.one_hot(labels, NUM_CLASSES).permute(0, 3, 1, 2).float(), None)


class CornerTwin(OracleTwin):
    """Every pixel gets the class painted at the top-left pixel of its 4 x 4 patch, so the answer
    depends on where the patch grid falls."""

    def forward(self, image, query_scale=1):
        corner = labels_in_image(image)[:, ::4, ::4].repeat_interleave(4, 1).repeat_interleave(4, 2)
        one_hot = nn.functional.one_hot(self.mapping[corner], NUM_CLASSES)
        return FieldOutput(10.0 * one_hot.permute(0, 3, 1, 2).float(), None)


class Painted(torch.utils.data.Dataset):
    def __init__(self, labels):
        self.labels = labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        label = self.labels[index]
        return {"image": paint(label), "label": label, "name": f"painted_{index}"}


def make_labels(count=5, size=(8, 12), seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = [torch.randint(0, NUM_CLASSES, size, generator=generator) for _ in range(count)]
    labels[0][0, :3] = IGNORE_INDEX
    return labels


def oracle_segmenter(mapping=(0, 1, 2, 3), twin=False, *overrides, oracle=None):
    """A Segmenter of OracleFlow, OracleTwin (twin=True) or another oracle class of this module."""
    config = load_config(None, ["data.image_size=8", "eval.batch_size=2", *overrides])
    encoding = build_encoding("kronecker", NUM_CLASSES)
    model = (oracle or (OracleTwin if twin else OracleFlow))(encoding, mapping)
    return Segmenter(model, None if twin else encoding, config, torch.device("cpu"))


def forge(checkpoint, name, data):
    """Replace (or, with data None, remove) a checkpoint file and record its sha256 in meta.json as a save
    would: a crafted checkpoint, which only its content can give away."""
    meta = json.loads((checkpoint / META_FILE).read_text())
    if data is None:
        (checkpoint / name).unlink()
        del meta["sha256"][name]
    else:
        # a new file, not the old one rewritten in place: tensors memory-mapped from it stay as they were
        (checkpoint / name).unlink(missing_ok=True)
        (checkpoint / name).write_bytes(data)
        meta["sha256"][name] = hashlib.sha256(data).hexdigest()
    (checkpoint / META_FILE).write_text(json.dumps(meta))


def replace_tensors(checkpoint, name, tensors):
    """Write (or, with None, remove) a checkpoint's safetensors file `name`, recording its sha256."""
    forge(checkpoint, name, None if tensors is None else save(tensors))


def replace_encoding(checkpoint, tensors):
    """Write (or, with None, remove) a checkpoint's encoding file, recording its sha256."""
    replace_tensors(checkpoint, ENCODING_FILE, tensors)
