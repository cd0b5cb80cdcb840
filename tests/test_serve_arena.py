"""The arena in headless Chromium against a live `camelid serve` with two models: five blind rounds
(both replies streamed, a vote, names shown after it), the server killed with SIGKILL and restarted on
the same votes database, and the leaderboard page showing both models and all five votes."""
from __future__ import annotations

import shutil
import signal
import sqlite3
from pathlib import Path

import httpx
import pytest
from playwright import sync_api as playwright_api

from camelid.serve.launch import start_server

from .builders import transformers_folder

pytestmark = pytest.mark.slow  # a real browser and two server starts

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking", "--no-first-run"]
KEY = "arena-key-5"


def serve(tmp: Path, models: list[Path], votes: Path, log: str):
    return start_server(["--model", f"red={models[0]}", "--model", f"blue={models[1]}", "--template", "llama-2",
                         "--api-key", KEY, "--votes", str(votes), "--context", "256", "--max-batch", "2"], tmp / log)


def test_five_votes_survive_sigkill_and_show_on_the_leaderboard(tmp_path: Path, llama2_tokenizer_dir: Path) -> None:
    if not shutil.which(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (make setup)")
    models = [transformers_folder(tmp_path / n, llama2_tokenizer_dir, s) for n, s in (("red", 0), ("blue", 1))]
    votes = tmp_path / "votes.db"
    server = serve(tmp_path, models, votes, "first.log")
    winners = ["vote-a", "vote-b", "vote-tie", "vote-a", "vote-bad"]
    try:
        # Voting needs the key like every other route.
        assert httpx.post(f"{server.url}/arena/battles").status_code == 401
        with playwright_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + "/arena")
            page.fill("#api-key", KEY)
            page.dispatch_event("#api-key", "change")
            page.fill("#max-tokens", "6")
            for n, button in enumerate(winners):
                page.fill("#prompt", f"Question number {n}: which colour is the sky?")
                page.click("#send")
                page.wait_for_selector(f"[data-testid={button}]:not([disabled])", timeout=60_000)
                for side in ("a", "b"):  # both replies came in, under anonymous headings
                    assert page.locator(f"#conv-{side} .turn-assistant").count() == 1
                    assert page.locator(f"#name-{side}").inner_text() == f"Model {side.upper()}"
                page.click(f"[data-testid={button}]")
                page.wait_for_selector("#name-a.reveal", timeout=30_000)
                names = {page.locator(f"#name-{s}").inner_text().split(": ")[1] for s in ("a", "b")}
                assert names == {"red", "blue"}
                assert "recorded" in page.locator("#status").inner_text()
                page.click("#new-round")
            page.screenshot(path=str(tmp_path / "arena.png"))
            browser.close()
        assert not errors, errors
    finally:
        server.process.send_signal(signal.SIGKILL)  # a crash: no shutdown, no cleanup
        server.process.wait()
    rows = sqlite3.connect(votes).execute("SELECT model_a, model_b, winner, conversation_a FROM votes").fetchall()
    assert [r[2] for r in rows] == ["model_a", "model_b", "tie", "model_a", "tie (bothbad)"]
    assert all({r[0], r[1]} == {"red", "blue"} and "sky" in r[3] for r in rows)
    server = serve(tmp_path, models, votes, "second.log")
    try:
        assert httpx.get(f"{server.url}/leaderboard.json").status_code == 401
        data = httpx.get(f"{server.url}/leaderboard.json", headers={"Authorization": f"Bearer {KEY}"}).json()
        assert data["votes"] == 5 and {r["model"] for r in data["leaderboard"]} == {"red", "blue"}
        with playwright_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
            page = browser.new_page()
            page.goto(server.url + "/arena")  # stores the key for the leaderboard page
            page.fill("#api-key", KEY)
            page.dispatch_event("#api-key", "change")
            page.goto(server.url + "/leaderboard")
            page.wait_for_function("document.querySelectorAll('#rows tr').length === 2", timeout=30_000)
            assert page.locator("#summary").inner_text() == "5 votes"
            table = page.locator("#rows").inner_text()
            assert "red" in table and "blue" in table
            browser.close()
    finally:
        server.stop()
