"""Render a report in headless Chromium: a screenshot (for docs and tests) and the rendered DOM."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def find_chromium() -> str | None:
    """The path of a Chromium (or Chrome) executable, or None."""
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    chromium = find_chromium()
    if chromium is None:
        raise FileNotFoundError("no chromium found (apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="preftune-chromium-") as profile:
        command = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


def screenshot(
    html_path: str | Path, png_path: str | Path, width: int = 1280, height: int = 2000, timeout: float = 90
) -> Path:
    """Screenshot of the page at `html_path`, written to `png_path`."""
    png_path = Path(png_path).resolve()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    url = Path(html_path).resolve().as_uri()
    done = _run([f"--screenshot={png_path}", f"--window-size={width},{height}", url], timeout)
    if not png_path.is_file():
        raise RuntimeError(f"chromium wrote no screenshot (exit {done.returncode}): {done.stderr[-500:]}")
    return png_path


def dump_dom(html_path: str | Path, timeout: float = 90) -> str:
    """The DOM of the page after Chromium has loaded it, serialized as HTML."""
    done = _run(["--dump-dom", Path(html_path).resolve().as_uri()], timeout)
    return done.stdout
