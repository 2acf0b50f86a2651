"""Headless Chromium (Debian's `chromium`, which `make test` installs): screenshots of a local HTML file, and Playwright pages."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM_NAMES = ("chromium", "chromium-browser")


def chromium() -> str | None:
    return next((path for path in map(shutil.which, CHROMIUM_NAMES) if path), None)


def screenshot(page: Path, png: Path, width: int = 1200, height: int = 2000) -> Path:
    """``page`` rendered headless into ``png``; skips the test when Chromium is not installed."""
    binary = chromium()
    if binary is None:
        pytest.skip("headless Chromium is not installed (apt-get install -y chromium; `make test` installs it)")
    subprocess.run(
        [binary, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", f"--screenshot={png}",
         f"--window-size={width},{height}", Path(page).resolve().as_uri()],
        check=True, capture_output=True, timeout=180,
    )  # fmt: skip
    return png


def distinct_colours(png: Path) -> tuple[int, float]:
    """(distinct RGB colours, share of pixels that are not white) of a screenshot."""
    from PIL import Image

    image = Image.open(png).convert("RGB")
    pixels = list(image.getdata())
    return len(set(pixels)), sum(p != (255, 255, 255) for p in pixels) / len(pixels)


@contextlib.contextmanager
def playwright_page(width: int = 1200, height: int = 900):
    """A Playwright page in headless Debian Chromium (Playwright's own browser download needs the internet); skips
    the test when either is missing."""
    binary = chromium()
    if binary is None:
        pytest.skip("headless Chromium is not installed (apt-get install -y chromium; `make test` installs it)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=binary, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield browser.new_page(viewport={"width": width, "height": height})
        finally:
            browser.close()
