"""The viewer in a real browser: Debian's chromium (/usr/bin/chromium, which `make install` installs)
driven headless by Playwright. An upload makes each model's label map appear at the image's size in
the model's palette; a file that is not an image makes a message appear, and the server goes on."""

import io
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flowseg.serve.page import Viewer, start
from flowseg.serve.views import ViewerModel

CHROMIUM = Path("/usr/bin/chromium")
TIMEOUT_MS = 20_000
pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")  # raised inside gradio's queue


@pytest.fixture(scope="module")
def served(tmp_path_factory, train_tiny_checkpoint):
    """(url, models) of a page serving a flow model and its twin side by side."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `make install` installs Debian's chromium package")
    root = tmp_path_factory.mktemp("served")
    models = [ViewerModel.load(train_tiny_checkpoint(root / "flow", "mnist-seg")),
              ViewerModel.load(train_tiny_checkpoint(root / "twin", "mnist-seg", "model.kind=discriminative"))]
    with socket.socket() as probe:  # a free port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    page, url = start(Viewer(models, root), port=port, block=False)
    yield url, models
    page.close()


def test_an_upload_shows_each_models_label_map_at_the_image_size_in_its_palette(served, tmp_path):
    from playwright.sync_api import sync_playwright

    url, models = served
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (36, 52, 3), dtype=np.uint8)).save(tmp_path / "up.png")
    (tmp_path / "notes.png").write_text("not an image")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url)
            upload = page.locator("#upload input[type=file]")
            upload.set_input_files(str(tmp_path / "notes.png"))
            page.locator("#status", has_text="notes.png is not an image file that can be read").wait_for()

            page.locator("#upload button[aria-label='Clear']").first.click()
            upload.set_input_files(str(tmp_path / "up.png"))
            page.locator("#status", has_text="up.png, 52 x 36").wait_for()
            for index, model in enumerate(models):
                source = page.locator(f"#labels-model{index + 1} img").get_attribute("src")
                mask = Image.open(io.BytesIO(page.request.get(source).body()))
                assert mask.size == (52, 36)
                colours = {tuple(colour) for colour in np.asarray(mask.convert("RGB")).reshape(-1, 3)}
                assert colours <= {tuple(colour) for colour in model.palette}
        finally:
            browser.close()
