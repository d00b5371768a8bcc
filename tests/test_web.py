"""`tuner web` in a real browser: headless Chromium (Debian's package) driven by Playwright."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from test_serve import free_port, wait_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# CI installs Chromium (.ci/run) and sets CI=1: there a missing browser is a failure, not a skip.
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not CHROMIUM and not os.environ.get("CI"),
                                                   reason="no chromium on this machine (apt install chromium)")]


def test_chat_page_streams_a_reply_and_clears_history(tiny_model_dir, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    port = free_port()
    # With a key (as serve): the page's address carries it in the fragment, which the page sends.
    server = subprocess.Popen([sys.executable, "-m", "tuner.cli", "web", str(tiny_model_dir), "--port", str(port),
                               "--torch-dtype", "fp32", "--max-new-tokens", "64"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "TUNER_API_KEY": "sk-web-test"})
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for(url.rstrip("/"), server)
        printed = next(line for line in server.stdout if "Chat page" in line)
        assert f"{url}#key=sk-web-test" in printed, printed
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"])
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            page.goto(url)  # without the key the API refuses the page
            expect(page.locator("#model")).to_have_text("server not reachable")
            page.goto(url + "#key=sk-web-test")
            page.reload()
            expect(page.locator("#model")).to_have_text(tiny_model_dir.name)
            page.fill("#system", "You are a test.")
            page.fill("#max-tokens", "40")
            # Record every length the reply had while it streamed.
            page.evaluate("""() => { window.lengths = [];
                new MutationObserver(() => { const t = document.querySelector('.assistant .text');
                    if (t) window.lengths.push(t.textContent.length); })
                .observe(document.getElementById('messages'), {subtree: true, childList: true,
                                                                characterData: true}); }""")
            page.fill("#input", "Tell me a story about a cat.")
            page.keyboard.press("Enter")
            expect(page.locator(".message.user .text")).to_have_text("Tell me a story about a cat.")
            expect(page.locator(".message.assistant")).to_have_attribute("data-state", "done", timeout=60_000)
            reply = page.locator(".message.assistant .text").inner_text()
            lengths = [n for n in page.evaluate("window.lengths") if n > 0]
            assert reply.strip() and len(set(lengths)) > 2, (reply, lengths)  # it grew piece by piece
            screenshot = tmp_path / "chat.png"
            page.screenshot(path=str(screenshot))
            _check_screenshot(screenshot)
            if os.environ.get("TUNER_KEEP_SCREENSHOT"):
                shutil.copy(screenshot, os.environ["TUNER_KEEP_SCREENSHOT"])
            # A second turn sends the history: two user bubbles, two replies.
            page.fill("#input", "And then?")
            page.keyboard.press("Enter")
            expect(page.locator(".message.assistant").nth(1)).to_have_attribute("data-state", "done",
                                                                                 timeout=60_000)
            expect(page.locator(".message")).to_have_count(4)
            page.click("#clear")
            expect(page.locator(".message")).to_have_count(0)
            expect(page.locator("#empty")).to_be_visible()
            browser.close()
    finally:
        server.terminate()
        server.wait(10)


def _check_screenshot(path) -> None:
    """The page rendered as designed: the sidebar, a blue user bubble, a white reply box."""
    from PIL import Image

    image = Image.open(path).convert("RGB")
    assert image.size == (1100, 700)
    colours = {colour for _, colour in image.getcolors(1100 * 700)}
    assert (0xdb, 0xe8, 0xff) in colours  # the user's bubble
    assert (0x2f, 0x6f, 0xed) in colours  # the Send button
    assert (0xf4, 0xf6, 0xfa) in colours  # the chat background
