"""Reading image and label files: 16-bit greyscale scaled by its bit depth, EXIF orientation applied to
images (not to labels), and an EXIF-rotated photo staying aligned with its label."""

import numpy as np
import pytest
from PIL import Image

from flowseg.data.io import read_image, read_label
from flowseg.data.layouts import FilePairDataset

ORIENTATION = 0x0112  # the EXIF tag
# EXIF orientation -> how the stored pixels become the displayed ones (the EXIF specification's table)
# (mirror, transpose and rotations by 90 degrees clockwise: -1, or counter-clockwise: 1)
DISPLAYED = {1: lambda a: a, 2: np.fliplr, 3: lambda a: np.rot90(a, 2), 4: np.flipud,
             5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1),
             7: lambda a: np.rot90(a, 2).transpose(1, 0, 2), 8: lambda a: np.rot90(a, 1)}


def _exif(orientation):
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return exif.tobytes()


def test_sixteen_bit_grey_is_scaled_by_its_bit_depth(tmp_path):
    values = np.array([[0, 1000, 30000], [32768, 65000, 65535]], np.uint16)
    expected = np.array([[0, 4, 117], [128, 253, 255]], np.uint8)  # round(v * 255 / 65535), not min(v, 255)
    for name, array in (("little.png", values), ("big.tif", values.astype(">u2"))):
        Image.fromarray(array).save(tmp_path / name)
        assert Image.open(tmp_path / name).mode in ("I;16", "I;16B")
        rgb = read_image(tmp_path / name)
        assert rgb.dtype == np.uint8 and rgb.shape == (2, 3, 3)
        np.testing.assert_array_equal(rgb, np.repeat(expected[..., None], 3, axis=2))
    # 8-bit files are read as they are
    Image.fromarray(expected).save(tmp_path / "eight.png")
    np.testing.assert_array_equal(read_image(tmp_path / "eight.png")[..., 0], expected)


@pytest.mark.parametrize("array, kind", [(np.array([[0, 70000]], np.int32), "32-bit integer"),
                                         (np.array([[0.0, 0.5]], np.float32), "floating-point")])
def test_images_without_a_standard_8_bit_reading_are_refused(tmp_path, array, kind):
    Image.fromarray(array).save(tmp_path / "deep.tif")
    with pytest.raises(ValueError, match=f"image file .*deep.tif holds {kind} pixels"):
        read_image(tmp_path / "deep.tif")


def _blocky(height, width):
    """Blocks of 8 px with distinct colours, so the orientation shows through JPEG's losses."""
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    return np.kron(blocks, np.ones((8, 8, 1), np.uint8))


@pytest.mark.parametrize("orientation", sorted(DISPLAYED))
def test_jpeg_exif_orientation_is_applied(tmp_path, orientation):
    path = tmp_path / "photo.jpg"
    Image.fromarray(_blocky(16, 24)).save(path, quality=95, exif=_exif(orientation))
    stored = np.asarray(Image.open(path).convert("RGB"))  # (16, 24, 3): the decoded pixels as stored
    np.testing.assert_array_equal(read_image(path), DISPLAYED[orientation](stored))


def test_unparsable_exif_leaves_the_pixels_as_stored(tmp_path):
    rgb = _blocky(16, 24)
    Image.fromarray(rgb).save(tmp_path / "odd.jpg", quality=95, exif=b"Exif\x00\x00not a TIFF header")
    np.testing.assert_array_equal(read_image(tmp_path / "odd.jpg"),
                                  np.asarray(Image.open(tmp_path / "odd.jpg").convert("RGB")))


def test_labels_are_read_as_stored(tmp_path):
    label = np.arange(12, dtype=np.uint8).reshape(3, 4)
    Image.fromarray(label, mode="L").save(tmp_path / "label.png", exif=_exif(6))
    assert Image.open(tmp_path / "label.png").getexif()[ORIENTATION] == 6
    np.testing.assert_array_equal(read_label(tmp_path / "label.png"), label)


def test_an_exif_rotated_photo_stays_aligned_with_its_label(tmp_path):
    """A camera stores a portrait shot as landscape pixels + orientation 6; the dataset's label map is
    drawn on the displayed (portrait) picture."""
    stored = np.zeros((16, 24, 3), np.uint8)
    stored[:8, :8] = 255                                  # top left as stored = top right as displayed
    Image.fromarray(stored).save(tmp_path / "shot.jpg", quality=95, exif=_exif(6))
    label = np.zeros((24, 16), np.uint8)                  # displayed: 24 rows, 16 columns
    label[:8, 8:] = 1
    Image.fromarray(label, mode="L").save(tmp_path / "shot.png")
    dataset = FilePairDataset([(tmp_path / "shot.jpg", tmp_path / "shot.png")], ["dark", "bright"])
    image, labels, _ = dataset.load(0)                    # (3, 24, 16) in [-1, 1], (24, 16)
    assert image.shape == (3, 24, 16)
    brightness = image.mean(0)
    assert brightness[labels == 1].min() > 0.8 and brightness[labels == 0].max() < -0.8
