"""MT-bench-style judging: verdict parsing, single grading, pairwise comparison judged in both orders,
judges (a camelid model or an OpenAI-compatible server), resumable JSONL judgments and their summary."""
from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

from ..errors import CamelidError
from ..generate import SamplingParams
from .judge_prompts import pair_prompt, single_prompt

_RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
_RATING_BACKUP = re.compile(r"\[\s*(\d+(?:\.\d+)?)\s*\]")  # "[7]": a judge that dropped one bracket
_PAIR = re.compile(r"\[\[\s*([ABC])\s*\]\]")


def parse_rating(text: str) -> float | None:
    """The 1-10 score of a single-grading judgment; None when there is none, several different ones, or
    one out of range (never a guess)."""
    found = {float(x) for x in _RATING.findall(text)} or {float(x) for x in _RATING_BACKUP.findall(text)}
    if len(found) != 1:
        return None
    score = found.pop()
    return score if 1 <= score <= 10 else None


def parse_pair(text: str) -> str | None:
    """"A", "B" or "tie" from a pairwise judgment; None when no verdict or conflicting verdicts appear."""
    found = set(_PAIR.findall(text))
    if len(found) != 1:
        return None
    return {"A": "A", "B": "B", "C": "tie"}[found.pop()]


def combine_orders(first: str | None, swapped: str | None) -> str:
    """The pair's result from the judgment with A first and the one with B first (whose A is our B):
    "A", "B" or "tie" when both agree, "inconsistent" when they differ (counted as a tie), "error" when
    either could not be parsed."""
    if first is None or swapped is None:
        return "error"
    back = {"A": "B", "B": "A", "tie": "tie"}[swapped]
    return first if first == back else "inconsistent"


# --- judges -------------------------------------------------------------------------------------------
class LocalJudge:
    """A camelid model as the judge: greedy, batched through the scheduler, its own chat template."""

    def __init__(self, loaded, template, *, max_new_tokens: int = 512, batch: int = 8):
        self.loaded, self.template, self.batch = loaded, template, batch
        self.params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
        self.name = loaded.name

    def __call__(self, prompts: Sequence[tuple[str, str]]) -> list[str]:
        from .batch_generate import generate_batch
        tok = self.loaded.tokenizer
        ids = [self.template.prompt_ids([{"role": "system", "content": s}, {"role": "user", "content": u}], tok,
                                        add_generation_prompt=True) for s, u in prompts]
        return generate_batch(self.loaded, ids, self.params, stop_ids=self.template.stop_token_ids(tok) | tok.stop_ids,
                              stop_strings=self.template.stop_strings, batch=self.batch)


def chat_url(url: str) -> str:
    """The chat-completions address of a server given as its root, its /v1, or the full route."""
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


class HTTPJudge:
    """Any OpenAI-compatible server as the judge (temperature 0), a few requests at a time."""

    def __init__(self, url: str, *, model: str | None = None, api_key: str | None = None,
                 max_new_tokens: int = 512, concurrency: int = 4, timeout: float = 600):
        self.url, self.model, self.api_key = chat_url(url), model, api_key
        self.max_new_tokens, self.concurrency, self.timeout = max_new_tokens, concurrency, timeout
        self.name = model or url

    def _one(self, prompt: tuple[str, str]) -> str:
        body = {"messages": [{"role": "system", "content": prompt[0]}, {"role": "user", "content": prompt[1]}],
                "temperature": 0, "max_tokens": self.max_new_tokens}
        if self.model:
            body["model"] = self.model
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, json.dumps(body).encode(), headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as r:
                answer = json.loads(r.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:200]
            raise CamelidError(f"--judge-url {self.url}: HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as e:
            raise CamelidError(f"--judge-url {self.url}: cannot reach the judge ({e})") from None
        try:
            return answer["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise CamelidError(f"--judge-url {self.url}: the answer is not a chat completion") from None

    def __call__(self, prompts: Sequence[tuple[str, str]]) -> list[str]:
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(self._one, prompts))


# --- judging ------------------------------------------------------------------------------------------
def _turns(record: dict) -> list[str]:
    return record["choices"][0]["turns"]


def judgment_key(record: dict) -> tuple:
    return (record["question_id"], record["turn"], record.get("model") or (record["model_a"], record["model_b"]))


def done_keys(out: Path) -> set:
    """Judgments already in `out` (resuming); a torn last line is cut off."""
    if not out.is_file():
        return set()
    keys, good = set(), []
    lines = out.read_text(encoding="utf-8").splitlines(keepends=True)
    for line in lines:
        try:
            keys.add(judgment_key(json.loads(line)))
            good.append(line if line.endswith("\n") else line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            break
    if len(good) != len(lines):
        out.write_text("".join(good), encoding="utf-8")
    return keys


def plan_single(questions: dict, answers: dict, references: dict) -> list[tuple[dict, tuple[str, str]]]:
    """(judgment record without the verdict, prompt) for every question, turn and answer."""
    jobs = []
    for qid, q in questions.items():
        if qid not in answers:
            continue
        a, ref = answers[qid], references.get(qid)
        for turn in range(min(len(q["turns"]), len(_turns(a)))):
            record = {"question_id": qid, "category": q.get("category"), "turn": turn + 1, "mode": "single",
                      "model": a["model_id"]}
            jobs.append((record, single_prompt(q["turns"], _turns(a), turn, _turns(ref) if ref else None)))
    return jobs


def plan_pairs(questions: dict, answers_a: dict, answers_b: dict, references: dict) -> list[tuple[dict, list]]:
    """Pairwise jobs: each with two prompts, A first and B first."""
    jobs = []
    for qid, q in questions.items():
        if qid not in answers_a or qid not in answers_b:
            continue
        a, b, ref = _turns(answers_a[qid]), _turns(answers_b[qid]), references.get(qid)
        r = _turns(ref) if ref else None
        for turn in range(min(len(q["turns"]), len(a), len(b))):
            record = {"question_id": qid, "category": q.get("category"), "turn": turn + 1, "mode": "pairwise",
                      "model_a": answers_a[qid]["model_id"], "model_b": answers_b[qid]["model_id"]}
            jobs.append((record, [pair_prompt(q["turns"], a, b, turn, r), pair_prompt(q["turns"], b, a, turn, r)]))
    return jobs


def run_judgments(jobs: list, judge: Callable, out: Path, *, chunk: int = 16,
                  progress: Callable[[int], None] | None = None) -> int:
    """Judge the jobs not yet in `out`, appending one line per judgment; returns how many were judged now."""
    done = done_keys(out)
    todo = [(r, p) for r, p in jobs if judgment_key(r) not in done]
    for start in range(0, len(todo), chunk):
        part = todo[start:start + chunk]
        pairwise = part[0][0]["mode"] == "pairwise"
        prompts = [x for _, p in part for x in p] if pairwise else [p for _, p in part]
        texts = judge(prompts)
        with out.open("a", encoding="utf-8") as f:
            for n, (record, _) in enumerate(part):
                record = dict(record, judge=getattr(judge, "name", "judge"), tstamp=time.time())
                if pairwise:
                    g1, g2 = texts[2 * n], texts[2 * n + 1]
                    v1, v2 = parse_pair(g1), parse_pair(g2)
                    record.update(verdict=combine_orders(v1, v2), g1_verdict=v1 or "unparsable",
                                  g2_verdict=v2 or "unparsable", g1_judgment=g1, g2_judgment=g2)
                else:
                    score = parse_rating(texts[n])
                    record.update(score=score, verdict="unparsable" if score is None else "ok", judgment=texts[n])
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        if progress is not None:
            progress(len(part))
    return len(todo)
