"""The chat page in headless Chromium (Debian's, driven by playwright) against a live `camelid serve`:
type a message, watch the reply stream in, regenerate, stop, reset; Markdown rendering; phone layout.
Screenshots are saved under tests/artifacts/ and their paths printed."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from playwright import sync_api as playwright_api

from camelid.serve.launch import start_server

from .builders import transformers_folder

pytestmark = pytest.mark.slow  # a real browser / fastllm's library: minutes, not seconds

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def server(tmp_path_factory, llama2_tokenizer_dir):
    # Two models so the picker has a choice to make: the built-in one and a tiny random one.
    tmp = tmp_path_factory.mktemp("page")
    tiny = transformers_folder(tmp / "tiny", llama2_tokenizer_dir)
    srv = start_server(["--model", "smol=", "--model", f"tiny={tiny}", "--max-batch", "2", "--context", "512"],
                       tmp / "server.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    if not shutil.which(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (make setup)")
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


def _set(page, selector: str, value: str) -> None:
    """Set an input (range or number) the way a user would, firing its input/change events."""
    page.eval_on_selector(selector, """(el, v) => { el.value = v;
        el.dispatchEvent(new Event('input', {bubbles: true})); el.dispatchEvent(new Event('change', {bubbles: true})); }""",
                          value)


def _wait_reply_done(page, count: int) -> str:
    page.wait_for_function(f"document.querySelectorAll('.message.assistant[data-done=true]').length === {count}",
                           timeout=60_000)
    return page.locator(".message.assistant .content").nth(count - 1).inner_text()


def test_chat_page_stream_regenerate_stop_reset(server, browser):
    page = browser.new_page(viewport={"width": 1100, "height": 800})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    page.wait_for_function("document.querySelector('#model').options.length > 0")
    assert page.locator("#model").input_value() == "smol"
    assert page.locator("#model option").all_inner_texts() == ["smol", "tiny"]
    page.select_option("#model", "tiny")  # its tokenizer carries no chat template: the page says so
    assert page.locator("#model-info").inner_text().startswith("context 512")
    assert page.locator("[data-testid=template]").inner_text() == "no chat template"
    page.select_option("#model", "smol")
    assert "template:" in page.locator("[data-testid=template]").inner_text()
    _set(page, "#temperature", "0")
    _set(page, "#max-tokens", "40")
    page.fill("#system", "You are a concise assistant.")
    # Count how often the reply changes while it streams: one update would mean no streaming.
    page.evaluate("""() => { window.updates = 0; new MutationObserver(() => window.updates++)
        .observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true}); }""")
    page.fill("#input", "Show a Python hello world program in a code block.")
    page.press("#input", "Enter")
    first = _wait_reply_done(page, 1)
    assert first.strip() and page.evaluate("window.updates") > 5
    assert page.locator(".message.user").inner_text().endswith("Show a Python hello world program in a code block.")
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "serve_page.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"\nchat page screenshot: {shot}")

    # Regenerate replaces the last reply; at temperature 0 it is the same text.
    page.click("[data-testid=regenerate]")
    again = _wait_reply_done(page, 1)
    assert again == first and page.locator(".message").count() == 2

    # Stop ends a long reply early and frees the server for the next message.
    _set(page, "#temperature", "0.8")
    _set(page, "#max-tokens", "600")
    page.fill("#input", "Write a very long story about a llama.")
    page.click("[data-testid=send]")
    page.wait_for_function("(document.querySelectorAll('.message.assistant .content')[1] || {}).innerText?.length > 10")
    page.click("[data-testid=stop]")
    stopped = _wait_reply_done(page, 2)
    assert page.locator("[data-testid=status]").inner_text() == "stopped"
    assert 0 < len(stopped) < 2000
    # The stop reached the server and freed the row (the log line follows the page's stop shortly).
    deadline = time.monotonic() + 10
    while "client gone" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    gone = [line for line in server.log().splitlines() if "client gone" in line]
    assert gone and "prompt_tokens=0 " not in gone[-1] and "completion_tokens=0 " not in gone[-1]

    page.click("[data-testid=reset]")
    assert page.locator(".message").count() == 0
    assert not errors, errors
    page.close()


def test_markdown_rendering_and_escaping(server, browser):
    page = browser.new_page()
    page.goto(server.url + "/")
    html = page.evaluate("""() => renderMarkdown(
        "# Title\\nSome **bold**, *italic* and `code<b>`.\\n\\n```python\\nprint('<hi>')\\n```\\n- one\\n- two\\n" +
        "1. first\\n\\n<script>alert(1)</script> [link](https://example.com) [bad](javascript:alert(1))")""")
    assert "<h1>Title</h1>" in html and "<strong>bold</strong>" in html and "<em>italic</em>" in html
    assert "<code>code&lt;b&gt;</code>" in html
    assert '<pre><code class="language-python" data-lang="python">print(&#39;&lt;hi&gt;&#39;)</code></pre>' in html
    assert "<ul><li>one</li><li>two</li></ul>" in html and "<ol><li>first</li></ol>" in html
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert '<a href="https://example.com"' in html and 'href="javascript' not in html
    page.close()


def test_phone_layout(server, browser):
    page = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True)
    page.goto(server.url + "/")
    page.wait_for_function("document.querySelector('#model').options.length > 0")
    assert not page.locator("#settings").is_visible()  # settings fold away on a phone
    page.click("#toggle-settings")
    assert page.locator("#settings").is_visible()
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the page scrolls sideways on a phone ({width}px)"
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "serve_page_phone.png"
    page.screenshot(path=str(shot))
    print(f"\nphone screenshot: {shot}")
    page.close()
