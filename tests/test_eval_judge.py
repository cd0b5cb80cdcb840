"""Answers and judging: verdict parsing on real-looking judge outputs (malformed ones included), pairwise
order swapping, resuming after an interruption, and judges reached over HTTP (a stand-in OpenAI-style
judge server whose verdicts the test controls, and a real `camelid serve`)."""
from __future__ import annotations

import json
import re
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from camelid.eval.judge import combine_orders, parse_pair, parse_rating
from .helpers import run_camelid

RATINGS = [
    ("The answer is accurate and well organised, though brief.\n\nRating: [[7]]", 7.0),
    ("Rating: [[8.5]]", 8.5),
    ("Explanation: mostly correct.\nRating: [ 6 ]", 6.0),  # one bracket dropped: FastChat's backup pattern
    ("I would rate this [[ 4 ]] out of 10.", 4.0),
    ("Score [[9]]. To repeat, the final rating is [[9]].", 9.0),
    ("Rating: [[rating]]", None),  # the format echoed back, no number
    ("Rating: [[11]]", None),  # out of range
    ("First I thought [[3]], but on reflection [[6]].", None),  # two different ratings: never guess
    ("The response is helpful. I give it a seven.", None),
    ("", None),
]
PAIRS = [
    ("Assistant A explains the steps; B skips them.\n\n[[A]]", "A"),
    ("Both are equally good. Final verdict: [[C]]", "tie"),
    ("B is clearly more accurate. [[B]]", "B"),
    ("Verdict: [[ B ]]", "B"),
    ("Either [[A]] or [[B]] could be argued.", None),
    ("Assistant A is better.", None),
    ("[[a]]", None),
    ("[A]", None),
]


@pytest.mark.parametrize("text,score", RATINGS)
def test_parse_rating(text: str, score) -> None:
    assert parse_rating(text) == score


@pytest.mark.parametrize("text,verdict", PAIRS)
def test_parse_pair(text: str, verdict) -> None:
    assert parse_pair(text) == verdict


def test_combining_both_orders() -> None:
    assert combine_orders("A", "B") == "A"  # A first: A wins; B first: the first position (our B) loses
    assert combine_orders("B", "A") == "B"
    assert combine_orders("tie", "tie") == "tie"
    assert combine_orders("A", "A") == "inconsistent"  # position bias: the judge always picks the first
    assert combine_orders("A", "tie") == "inconsistent"
    assert combine_orders(None, "A") == "error" and combine_orders("B", None) == "error"


QUESTIONS = [
    {"question_id": 1, "category": "writing", "turns": ["Write a haiku about rain.", "Now make it about snow."]},
    {"question_id": 2, "category": "math", "turns": ["What is 2 + 3?"]},
    {"question_id": 3, "category": "math", "turns": ["What is 10 / 4?", "And 10 // 4 in Python?"]},
    {"question_id": 4, "category": "roleplay", "turns": ["Pretend to be a pirate and greet me."]},
]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def answers(model: str, good: set[int]) -> list[dict]:
    """Answers whose quality the stand-in judge can see: GOOD or BAD in the text."""
    return [{"question_id": q["question_id"], "model_id": model,
             "choices": [{"index": 0, "turns": [("GOOD " if q["question_id"] in good else "BAD ") + t
                                                for t in q["turns"]]}]} for q in QUESTIONS]


class StandInJudge(BaseHTTPRequestHandler):
    """An OpenAI-style chat server playing a judge with known habits: it prefers the GOOD answer, always
    says [[A]] on question 3 (position bias), and rambles without a verdict on question 4."""
    requests: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        StandInJudge.requests.append({"auth": self.headers.get("Authorization"), "body": body})
        prompt = body["messages"][-1]["content"]
        if "Pirate" in prompt or "pirate" in prompt:
            text = "Both answers have their charm; hard to say."
        elif "Assistant A" in prompt:
            a = re.search(r"\[The Start of Assistant A's Answer\]\n(.*?)\n\[The End|"
                          r"Start of Assistant A's Conversation with User\|>(.*?)<\|The End", prompt, re.S)
            a_text = a.group(1) or a.group(2)
            if "10 / 4" in prompt:
                text = "The first answer reads better. [[A]]"
            else:
                text = "A is better. [[A]]" if "GOOD" in a_text else "B wins. [[B]]"
        else:
            text = "Solid work. Rating: [[8]]" if "GOOD" in prompt else "Weak. Rating: [[3]]"
        data = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def stand_in():
    StandInJudge.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandInJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def judge_cli(camelid_bin: Path, *args, env=None) -> subprocess.CompletedProcess:
    return run_camelid(camelid_bin, "eval", "judge", *args, timeout=600, env=env)


def test_pairwise_both_orders_summary_chart_and_resume(camelid_bin: Path, tmp_path: Path, stand_in: str) -> None:
    import os
    q = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    a = write_jsonl(tmp_path / "a.jsonl", answers("alpha", good={1, 3}))
    b = write_jsonl(tmp_path / "b.jsonl", answers("beta", good={2}))
    out, chart = tmp_path / "j.jsonl", tmp_path / "j.png"
    env = dict(os.environ, JUDGE_KEY="secret-1")
    args = ["--answers", a, b, "--questions", q, "--mode", "pairwise", "--judge-url", f"{stand_in}/v1",
            "--judge-api-key-env", "JUDGE_KEY", "--out", out, "--chart", chart]
    proc = judge_cli(camelid_bin, *args, env=env)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(records) == 6 and len(StandInJudge.requests) == 12  # 6 question-turns, each judged in both orders
    assert all(r["auth"] == "Bearer secret-1" for r in StandInJudge.requests)
    verdicts = {(r["question_id"], r["turn"]): r["verdict"] for r in records}
    assert verdicts == {(1, 1): "A", (1, 2): "A", (2, 1): "B", (3, 1): "inconsistent", (3, 2): "inconsistent",
                        (4, 1): "error"}
    assert {r["g1_verdict"] for r in records if r["question_id"] == 4} == {"unparsable"}
    summary = json.loads(proc.stdout)
    assert summary["overall"] == {"win": 2, "tie": 2, "loss": 1, "inconsistent": 2, "error": 1, "win_rate": 0.4,
                                  "win_rate_ties_half": 0.6}
    assert summary["per_category"]["math"]["loss"] == 1 and chart.stat().st_size > 1000
    # Resume: an interrupted run left a torn last line; only the missing judgments are asked for again.
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:4]) + "\n" + lines[4][:20])
    before = len(StandInJudge.requests)
    proc = judge_cli(camelid_bin, *args, env=env)
    assert proc.returncode == 0, proc.stderr
    assert len(StandInJudge.requests) - before == 4  # two pairs, both orders
    again = [json.loads(x) for x in out.read_text().splitlines()]
    assert {(r["question_id"], r["turn"]): r["verdict"] for r in again} == verdicts and len(again) == 6


def test_single_grading_with_reference(camelid_bin: Path, tmp_path: Path, stand_in: str) -> None:
    q = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    a = write_jsonl(tmp_path / "a.jsonl", answers("alpha", good={1, 2}))
    ref = write_jsonl(tmp_path / "ref.jsonl", [{"question_id": 2, "model_id": "reference",
                                                "choices": [{"index": 0, "turns": ["5"]}]}])
    proc = judge_cli(camelid_bin, "--answers", a, "--questions", q, "--reference", ref, "--judge-url", stand_in,
                     "--out", tmp_path / "j.jsonl", "--summary", tmp_path / "s.json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "s.json").read_text())["models"]["alpha"]
    assert summary["judgments"] == 6 and summary["unparsable"] == 1  # the rambling judgment of question 4
    assert summary["per_category"] == {"math": 4.6667, "writing": 8.0}
    assert summary["per_turn"] == {"1": 6.3333, "2": 5.5} and summary["score"] == 6.0
    prompts = [r["body"]["messages"][-1]["content"] for r in StandInJudge.requests]
    with_ref = [p for p in prompts if "Reference Answer" in p]
    assert len(with_ref) == 1 and "What is 2 + 3?" in with_ref[0]
    second = [p for p in prompts if "Now make it about snow." in p]
    assert len(second) == 1 and "Write a haiku about rain." in second[0]  # turn 2 shows the whole conversation


def test_answer_resumes_and_judge_over_a_real_camelid_serve(camelid_bin: Path, tmp_path: Path) -> None:
    import os

    from camelid.serve.launch import start_server
    q = write_jsonl(tmp_path / "q.jsonl", QUESTIONS[:3])
    out = tmp_path / "a.jsonl"
    kept = {"question_id": 2, "model_id": "smol", "choices": [{"index": 0, "turns": ["5, kept from before"]}]}
    out.write_text(json.dumps(kept) + "\n" + '{"question_id": 3, "model_')  # killed mid-line
    proc = subprocess.run([str(camelid_bin), "eval", "answer", "--questions", str(q), "--out", str(out),
                           "--model-id", "smol", "--max-new-tokens", "12", "--batch", "2"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert records[0] == kept and sorted(r["question_id"] for r in records) == [1, 2, 3]
    by_id = {r["question_id"]: r for r in records}
    assert len(by_id[1]["choices"][0]["turns"]) == 2 and len(by_id[3]["choices"][0]["turns"]) == 2
    assert all(t for t in by_id[1]["choices"][0]["turns"])
    server = start_server(["--api-key", "k-77", "--max-batch", "4", "--context", "2048"], tmp_path / "log")
    try:
        proc = judge_cli(camelid_bin, "--answers", out, "--questions", q, "--judge-url", server.url,
                         "--judge-api-key-env", "K", "--max-new-tokens", "24", "--out", tmp_path / "j.jsonl",
                         env=dict(os.environ, K="k-77"))
    finally:
        server.stop()
    assert proc.returncode == 0, proc.stderr
    judged = [json.loads(x) for x in (tmp_path / "j.jsonl").read_text().splitlines()]
    assert len(judged) == 5 and all(r["judgment"] for r in judged)
    # A 135M model rarely follows the verdict format: whatever it wrote is kept, parsed or marked unparsable.
    assert all((r["score"] is None) == (r["verdict"] == "unparsable") for r in judged)
    summary = json.loads(proc.stdout)["models"]["smol"]
    assert summary["judgments"] == 5


@pytest.mark.parametrize("args,words", [
    (["--answers", "a.jsonl", "--questions", "q.jsonl", "--out", "j.jsonl", "--mode", "pairwise"], ["pairwise", "2"]),
    (["--answers", "nope.jsonl", "--questions", "nope.jsonl", "--out", "j.jsonl"], ["nope.jsonl"]),
    (["--answers", "a.jsonl", "--questions", "q.jsonl", "--out", "j.jsonl", "--judge-url", "http://127.0.0.1:9",
      "--judge-api-key-env", "CAMELID_NO_SUCH_VAR"], ["CAMELID_NO_SUCH_VAR"]),
])
def test_judge_bad_input(camelid_bin: Path, tmp_path: Path, args, words) -> None:
    from .helpers import one_line_error
    write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    write_jsonl(tmp_path / "a.jsonl", answers("alpha", good=set()))
    proc = subprocess.run([str(camelid_bin), "eval", "judge", *args], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    one_line_error(proc, *words)
