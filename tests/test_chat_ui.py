"""End to end in a real browser: `preftune chat --ui`'s page in headless Chromium, driven by Selenium
through the system chromedriver (Debian packages chromium and chromium-driver; nothing is downloaded).

The page loads, a message is sent, both panes stream a non-empty answer, a vote lands in the votes
file as a pair preftune's loader reads, and a screenshot is kept as a test artifact in
$PREFTUNE_TEST_ARTIFACTS (default: test-artifacts/ at the repository root).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import time
from pathlib import Path

import pytest

from preftune.chat.engine import REFERENCE, TUNED, GenerationSettings, load_chat
from preftune.chat.votes import VOTES_FILE

CHROMIUM = next(
    (
        p
        for p in (shutil.which("chromium"), "/usr/bin/chromium", shutil.which("chromium-browser"))
        if p and Path(p).is_file()
    ),
    None,
)
CHROMEDRIVER = next(
    (p for p in (shutil.which("chromedriver"), "/usr/bin/chromedriver") if p and Path(p).is_file()), None
)
MISSING = [
    name
    for name, ok in (
        ("gradio", importlib.util.find_spec("gradio") is not None),
        ("selenium", importlib.util.find_spec("selenium") is not None),
        ("chromium", CHROMIUM is not None),
        ("chromedriver (apt-get install chromium-driver)", CHROMEDRIVER is not None),
    )
    if not ok
]
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"not installed: {', '.join(MISSING)}")

ARTIFACTS = Path(
    os.environ.get("PREFTUNE_TEST_ARTIFACTS") or Path(__file__).resolve().parents[1] / "test-artifacts"
)
PIECE_DELAY_S = 0.15  # slows each streamed piece down so the browser sees a reply grow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition, timeout: float = 120.0, what: str = "the page"):
    """Poll `condition` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
        "--disable-background-networking",
        "--disable-component-update",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture
def served(chat_adapter_dir, tmp_path):
    """The web chat on the tiny adapter, on a free 127.0.0.1 port; yields (url, engine, votes file)."""
    from preftune.chat.ui import build_app, launch

    engine = load_chat(str(chat_adapter_dir))
    real_stream = engine.stream

    def slow_stream(*args, **kwargs):
        for piece in real_stream(*args, **kwargs):
            time.sleep(PIECE_DELAY_S)
            yield piece

    engine.stream = slow_stream
    votes = tmp_path / "run" / VOTES_FILE
    # sampling: a random tiny base repeats one token greedily; sampled words make non-empty replies
    app = build_app(engine, votes, GenerationSettings(max_new_tokens=10, temperature=1.0, top_p=1.0))
    port = free_port()
    _, url, share_url = launch(app, port=port, block=False)
    assert share_url is None and url.startswith("http://127.0.0.1:")
    yield url, engine, votes
    app.close()


def test_chat_page_streams_both_panes_and_saves_a_vote(served, browser):
    from selenium.webdriver.common.by import By

    from preftune.data import load_preference_splits

    url, engine, votes = served
    browser.get(url)
    box = wait_for(
        lambda: browser.find_elements(By.CSS_SELECTOR, "#message textarea"), what="the message box"
    )[0]
    titles = {
        side: browser.find_element(By.CSS_SELECTOR, f"#pane-{side}").text for side in (REFERENCE, TUNED)
    }
    assert titles[REFERENCE].startswith("reference") and titles[TUNED].startswith("tuned")
    vote_button = browser.find_element(By.CSS_SELECTOR, "#vote-tuned")
    assert not vote_button.is_enabled()  # nothing to vote on yet

    box.send_keys("Hello there")
    browser.find_element(By.CSS_SELECTOR, "#send").click()

    def bot_text(side: str) -> str:
        found = browser.find_elements(By.CSS_SELECTOR, f"#pane-{side} [data-testid='bot']")
        return found[-1].text.strip() if found else ""

    seen: dict[str, list[str]] = {REFERENCE: [], TUNED: []}

    def finished() -> bool:
        for side in seen:
            text = bot_text(side)
            if text and (not seen[side] or seen[side][-1] != text):
                seen[side].append(text)
        return browser.find_element(By.CSS_SELECTOR, "#vote-tuned").is_enabled()

    wait_for(finished, what="both replies")
    finished()  # the page may draw the last piece after the vote buttons come on: record it too
    for side in seen:
        text = bot_text(side)
        assert text, f"the {side} pane shows no reply"
        assert len(seen[side]) >= 2 and seen[side][-1] == text, f"{side} did not stream: {seen[side]}"
        assert text.startswith(seen[side][0])  # it grew piece by piece
        user = browser.find_elements(By.CSS_SELECTOR, f"#pane-{side} [data-testid='user']")
        assert [u.text.strip() for u in user] == ["Hello there"]
    replies = {side: bot_text(side) for side in seen}
    assert replies[REFERENCE] != replies[TUNED]

    browser.find_element(By.CSS_SELECTOR, "#vote-tuned").click()
    status = wait_for(
        lambda: "Saved" in (s := browser.find_element(By.CSS_SELECTOR, "#status").text) and s, what="the vote"
    )
    assert "tuned is better" in status
    wait_for(
        lambda: not browser.find_element(By.CSS_SELECTOR, "#vote-tuned").is_enabled(), what="one vote a turn"
    )

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "chat_ui.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000

    lines = [json.loads(line) for line in votes.read_text().splitlines()]
    assert len(lines) == 1 and lines[0]["vote"] == TUNED
    (pair,) = load_preference_splits(str(votes), splits=["train"])["train"]
    assert pair.prompt == [{"role": "user", "content": "Hello there"}]
    # the panes show the replies as markdown: compare ignoring whitespace
    assert (
        pair.chosen.split() == replies[TUNED].split() and pair.rejected.split() == replies[REFERENCE].split()
    )
