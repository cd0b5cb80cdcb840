"""Answers to FastChat-format questions (`question_id`, `category`, `turns`), MT-bench style.

Each turn is asked through the model's own chat template with the earlier turns and answers before it;
questions are answered in batches through the scheduler. The output JSONL gets one line per finished
question as soon as it is done, so an interrupted run resumes where it stopped: ids already in the
file are skipped (a half-written last line is dropped).
"""
from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Callable

from ..errors import CamelidError
from ..generate import SamplingParams
from .batch_generate import generate_batch


def read_jsonl(path: str | Path, what: str) -> list[dict]:
    """Records of a JSONL file; a bad line is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise CamelidError(f"{what} {path}: no such file")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise CamelidError(f"{what} {path}: line {n} is not JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise CamelidError(f"{what} {path}: line {n} is not a JSON object")
        out.append(record)
    return out


def read_questions(path: str | Path) -> list[dict]:
    """FastChat questions, checked: a unique question_id and a non-empty list of string turns each."""
    questions = read_jsonl(path, "--questions")
    seen = set()
    for q in questions:
        qid = q.get("question_id")
        turns = q.get("turns")
        if qid is None or not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise CamelidError(f"--questions {path}: question {qid!r} needs a question_id and a list of text turns")
        if qid in seen:
            raise CamelidError(f"--questions {path}: question_id {qid!r} appears twice")
        seen.add(qid)
    if not questions:
        raise CamelidError(f"--questions {path}: no questions")
    return questions


def answered_ids(out: Path) -> set:
    """question_ids already answered in `out`; a torn last line (an interrupted write) is cut off."""
    if not out.is_file():
        return set()
    lines = out.read_text(encoding="utf-8").splitlines(keepends=True)
    done, good = set(), []
    for line in lines:
        try:
            done.add(json.loads(line)["question_id"])
            good.append(line if line.endswith("\n") else line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            break  # only the last line can be torn; anything after it is not trusted either
    if len(good) != len(lines):
        out.write_text("".join(good), encoding="utf-8")
    return done


def answer_questions(loaded, template, questions: list[dict], out: Path, *, model_id: str,
                     params: SamplingParams, batch: int = 8, system: str | None = None,
                     progress: Callable[[int], None] | None = None) -> int:
    """Answer the questions not yet in `out`, appending one FastChat answer record per question; returns
    how many were answered now."""
    done = answered_ids(out)
    todo = [q for q in questions if q["question_id"] not in done]
    tok = loaded.tokenizer
    stop_ids = template.stop_token_ids(tok) | tok.stop_ids
    for start in range(0, len(todo), batch):
        chunk = todo[start:start + batch]
        chats = [[{"role": "system", "content": system}] if system else [] for _ in chunk]
        replies: list[list[str]] = [[] for _ in chunk]
        for turn in range(max(len(q["turns"]) for q in chunk)):
            active = [i for i, q in enumerate(chunk) if turn < len(q["turns"])]
            prompts = []
            for i in active:
                chats[i].append({"role": "user", "content": chunk[i]["turns"][turn]})
                prompts.append(template.prompt_ids(chats[i], tok, add_generation_prompt=True))
            texts = generate_batch(loaded, prompts, params, stop_ids=stop_ids, stop_strings=template.stop_strings,
                                   batch=batch)
            for i, text in zip(active, texts):
                text = text.strip()
                chats[i].append({"role": "assistant", "content": text})
                replies[i].append(text)
        with out.open("a", encoding="utf-8") as f:
            for q, turns in zip(chunk, replies):
                f.write(json.dumps({"question_id": q["question_id"], "answer_id": uuid.uuid4().hex[:22],
                                    "model_id": model_id, "choices": [{"index": 0, "turns": turns}],
                                    "tstamp": time.time()}, ensure_ascii=False) + "\n")
        if progress is not None:
            progress(len(chunk))
    return len(todo)
