"""Readers for the seven Koala sources, each in the file format its publisher released.

Every reader streams (JSONL line by line, JSON lists item by item with ijson; `.gz` anywhere) and turns one
published record into one or more `Conversation`s. A record that does not have the published shape raises
`BadRecord`; the pipeline names the file and line (or list index) and either stops or counts it (--skip-bad).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import CamelidError
from .html import clean_chatgpt_text, html_to_markdown, looks_like_html

# --- Chain-of-Hindsight, as Koala did it (young-geng/koala_data_pipeline, create_hf_data_v2.py) -------------
# Koala rendered every turn as "USER: <query> GPT:" + reply. For the rejected answer of a comparison it put
# another marker where "GPT:" goes, so that prompt read "USER: <query> An Unhelpful Answer:" and the reply after
# it was still trained with the ordinary LM loss; the preferred answer kept the plain "GPT:" marker (no extra
# text). Koala wrote the rejected answer as a conversation of its own, not next to the preferred one.
# Our records are template-neutral messages, so the marker goes at the end of the user turn that precedes a
# rejected reply (the prompt side, never trained on), joined with a space as Koala's "+" joined fields.
# Unlike Koala we mark only the replies that differ from the preferred conversation: Anthropic HH's rejected
# dialogue repeats the chosen one's earlier turns, and calling those "unhelpful" would contradict the chosen copy.
HINDSIGHT_MARKER = "An Unhelpful Answer:"
HINDSIGHT_PREFERRED_MARKER = ""  # Koala: the preferred answer gets no marker beyond its usual role label
HINDSIGHT_JOIN = " "

# Koala wrote the comparison prompts with a task phrase picked at random; we pick one by a hash of the record,
# so the output does not change from run to run. Phrases are ours.
SUMMARY_TASKS = (
    "Summarize the following post: ",
    "Write a short summary of this text: ",
    "Give a summary of the following post: ",
    "Please summarize the text below: ",
)
WEBGPT_QUOTE_TASKS = (
    "You may use the following sources in your answer: ",
    "The following sources may help: ",
    "Use these sources in your answer: ",
)

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant",
         "bing": "assistant", "assistant": "assistant", "model": "assistant", "system": "system"}


class BadRecord(Exception):
    """A record without the source's published shape."""


class Skip(Exception):
    """A well-formed record the source itself says to leave out (a WebGPT tie)."""


@dataclass
class Conversation:
    id: str
    group: str                       # the published record (or question/post) it came from: split + dedup unit
    messages: list[dict[str, str]]
    preferred: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def _pick(options: tuple[str, ...], key: str) -> str:
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return options[h % len(options)]


def _str(obj: dict, key: str, *, optional: bool = False) -> str:
    if not isinstance(obj, dict):
        raise BadRecord(f"expected a JSON object, got {type(obj).__name__}")
    if key not in obj or obj[key] is None:
        if optional:
            return ""
        raise BadRecord(f"missing field {key!r}")
    value = obj[key]
    if not isinstance(value, str):
        raise BadRecord(f"field {key!r} should be a string, got {type(value).__name__}")
    return value


def _list(obj: dict, key: str) -> list:
    if not isinstance(obj, dict):
        raise BadRecord(f"expected a JSON object, got {type(obj).__name__}")
    value = obj.get(key)
    if not isinstance(value, list):
        raise BadRecord(f"missing field {key!r}" if value is None else f"field {key!r} should be a list")
    return value


def _turn(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def _record_id(obj: dict, uid: str, key: str = "id") -> str:
    value = obj.get(key) if isinstance(obj, dict) else None
    return str(value) if isinstance(value, (str, int)) and str(value) else uid


def _preference_pair(cid: str, group: str, chosen: list[dict], rejected: list[dict]) -> list[Conversation]:
    """The preferred conversation plus the rejected one with Koala's marker before each differing reply."""
    marked = [dict(m) for m in rejected]
    for i, m in enumerate(marked):
        if m["role"] != "assistant" or i == 0:
            continue
        same = i < len(chosen) and chosen[i]["role"] == "assistant" and chosen[i]["content"] == m["content"]
        if not same and marked[i - 1]["role"] == "user":
            marked[i - 1]["content"] = marked[i - 1]["content"].rstrip() + HINDSIGHT_JOIN + HINDSIGHT_MARKER
    return [Conversation(cid, group, chosen, True),
            Conversation(f"{cid}:rejected", group, marked, False, {"marker": HINDSIGHT_MARKER})]


# --- the seven sources ------------------------------------------------------------------------------------

def read_sharegpt(obj: Any, uid: str) -> list[Conversation]:
    """ShareGPT: {id, conversations: [{from: human|gpt, value}]}; old dumps hold the page's HTML."""
    turns = _list(obj, "conversations")
    messages = []
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadRecord(f"conversations[{j}] should be an object")
        speaker = _str(turn, "from")
        role = ROLES.get(speaker.strip().lower())
        if role is None:
            raise BadRecord(f"conversations[{j}]: unknown speaker {speaker!r} (expected human or gpt)")
        text = _str(turn, "value")
        if looks_like_html(text):
            text = html_to_markdown(text)
        elif role == "assistant":
            text = clean_chatgpt_text(text)
        else:
            text = text.strip()
        messages.append(_turn(role, text))
    cid = _record_id(obj, uid)
    return [Conversation(cid, cid, messages)]


def read_hc3(obj: Any, uid: str) -> list[Conversation]:
    """HC3: {id, question, human_answers: [...], chatgpt_answers: [...], source}; one conversation per answer."""
    question = _str(obj, "question").strip()
    cid = _record_id(obj, uid)
    out = []
    for kind in ("human", "chatgpt"):
        for j, answer in enumerate(_list(obj, f"{kind}_answers")):
            if not isinstance(answer, str):
                raise BadRecord(f"{kind}_answers[{j}] should be a string")
            out.append(Conversation(f"{cid}:{kind}:{j}", cid,
                                    [_turn("user", question), _turn("assistant", answer.strip())]))
    return out


_OIG_TURN = re.compile(r"(<human>:|<bot>:)")


def read_oig(obj: Any, uid: str) -> list[Conversation]:
    """OIG: {text: "<human>: ...\\n<bot>: ..."}; text before the first turn is context for the first query."""
    parts = _OIG_TURN.split(_str(obj, "text"))
    if len(parts) < 3:
        raise BadRecord("no '<human>:' / '<bot>:' turns in 'text'")
    preamble, messages = parts[0].strip(), []
    for marker, body in zip(parts[1::2], parts[2::2]):
        messages.append(_turn("user" if marker == "<human>:" else "assistant", body.strip()))
    if preamble and messages and messages[0]["role"] == "user":
        messages[0]["content"] = preamble + "\n\n" + messages[0]["content"]
    return [Conversation(uid, uid, messages)]


def read_alpaca(obj: Any, uid: str) -> list[Conversation]:
    """Stanford Alpaca: a JSON list of {instruction, input, output}."""
    instruction, extra = _str(obj, "instruction").strip(), _str(obj, "input", optional=True).strip()
    query = instruction + ("\n\n" + extra if extra else "")
    return [Conversation(uid, uid, [_turn("user", query), _turn("assistant", _str(obj, "output").strip())])]


_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")


def parse_hh(text: str, name: str) -> list[dict[str, str]]:
    parts = _HH_TURN.split(text)
    if len(parts) < 3:
        raise BadRecord(f"{name!r} has no '\\n\\nHuman:' / '\\n\\nAssistant:' turns")
    if parts[0].strip():
        raise BadRecord(f"{name!r} has text before its first 'Human:' turn")
    return [_turn("user" if who == "Human" else "assistant", body.strip())
            for who, body in zip(parts[1::2], parts[2::2])]


def read_hh(obj: Any, uid: str) -> list[Conversation]:
    """Anthropic HH-RLHF: {chosen, rejected}, each a transcript of "\\n\\nHuman: ..." / "\\n\\nAssistant: ..." turns."""
    chosen = parse_hh(_str(obj, "chosen"), "chosen")
    rejected = parse_hh(_str(obj, "rejected"), "rejected")
    return _preference_pair(uid, uid, chosen, rejected)


def _quotes(q: Any, name: str) -> list[tuple[str, str]]:
    if q is None:
        return []
    if isinstance(q, dict):  # the Hugging Face layout: {title: [...], extract: [...]}
        titles, extracts = q.get("title") or [], q.get("extract") or []
        if not isinstance(titles, list) or not isinstance(extracts, list) or len(titles) != len(extracts):
            raise BadRecord(f"{name}: 'title' and 'extract' should be lists of the same length")
        return list(zip(map(str, titles), map(str, extracts)))
    if isinstance(q, list):  # one object per quote
        return [(str(x.get("title", "")), str(x.get("extract", ""))) for x in q if isinstance(x, dict)]
    raise BadRecord(f"{name} should be an object or a list")


def read_webgpt(obj: Any, uid: str) -> list[Conversation]:
    """OpenAI WebGPT comparisons: {question: {full_text, id}, answer_0/1, score_0/1, quotes_0/1}; ties skipped."""
    if isinstance(obj, list) and len(obj) == 2 and all(isinstance(x, dict) for x in obj):
        # OpenAI's own comparisons.jsonl holds the two sides as a pair; flatten it to the published HF layout.
        flat = {"question": obj[0].get("question")}
        for i, side in enumerate(obj):
            for key in ("answer", "score", "quotes"):
                flat[f"{key}_{i}"] = side.get(key)
        obj = flat
    if not isinstance(obj, dict):
        raise BadRecord(f"expected a JSON object, got {type(obj).__name__}")
    q = obj.get("question")
    question = (q.get("full_text") if isinstance(q, dict) else q)
    if not isinstance(question, str):
        raise BadRecord("missing field 'question.full_text'")
    scores = []
    for i in (0, 1):
        s = obj.get(f"score_{i}")
        if isinstance(s, bool) or not isinstance(s, (int, float)):
            raise BadRecord(f"field 'score_{i}' should be a number")
        scores.append(float(s))
    if scores[0] == scores[1]:
        raise Skip("tie")
    best = 0 if scores[0] > scores[1] else 1
    group = _record_id(q, uid) if isinstance(q, dict) else uid

    def convo(i: int) -> list[dict[str, str]]:
        answer = _str(obj, f"answer_{i}").strip()
        query = question.strip()
        quotes = _quotes(obj.get(f"quotes_{i}"), f"quotes_{i}")
        if quotes:
            listing = "\n".join(f"[{k}] {title}: {extract}" for k, (title, extract) in enumerate(quotes, 1))
            query += "\n\n" + _pick(WEBGPT_QUOTE_TASKS, uid) + "\n" + listing
        return [_turn("user", query), _turn("assistant", answer)]

    return _preference_pair(uid, group, convo(best), convo(1 - best))


def read_summarize(obj: Any, uid: str) -> list[Conversation]:
    """OpenAI summarize-from-feedback comparisons:
    {info: {id, post, title, subreddit}, summaries: [{text}, {text}], choice}."""
    info = obj.get("info") if isinstance(obj, dict) else None
    if not isinstance(info, dict):
        raise BadRecord("missing field 'info'")
    post = info.get("post") or info.get("article")  # the CNN/DM batches hold an article instead of a post
    if not isinstance(post, str):
        raise BadRecord("missing field 'info.post'")
    summaries = _list(obj, "summaries")
    if len(summaries) != 2 or not all(isinstance(s, dict) and isinstance(s.get("text"), str) for s in summaries):
        raise BadRecord("'summaries' should be two objects with a 'text'")
    choice = obj.get("choice")
    if choice not in (0, 1) or isinstance(choice, bool):
        raise BadRecord("field 'choice' should be 0 or 1")
    # Koala's prompt was the task phrase and the post; we keep the post's title too, which the summaries rely on.
    title = info.get("title")
    text = (f"Title: {title.strip()}\n\n" if isinstance(title, str) and title.strip() else "") + post.strip()
    query = _pick(SUMMARY_TASKS, uid) + "\n\n" + text
    chosen = [_turn("user", query), _turn("assistant", summaries[choice]["text"].strip())]
    rejected = [_turn("user", query), _turn("assistant", summaries[1 - choice]["text"].strip())]
    return _preference_pair(uid, _record_id(info, uid), chosen, rejected)


READERS: dict[str, Callable[[Any, str], list[Conversation]]] = {
    "sharegpt": read_sharegpt, "hc3": read_hc3, "oig": read_oig, "alpaca": read_alpaca,
    "hh": read_hh, "webgpt": read_webgpt, "summarize": read_summarize,
}


# --- files ------------------------------------------------------------------------------------------------

@dataclass
class RawRecord:
    where: str        # "file:LINE" or "file: record index N", for error messages
    uid: str          # stable id when the record has none: "<file stem>:<line or index>"
    value: Any = None
    error: str | None = None  # set when the line is not JSON at all


def source_files(path: Path) -> list[Path]:
    """A file, or every .json/.jsonl(.gz) file in a folder (sorted), e.g. OIG's several unified_*.jsonl."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and
                       re.search(r"\.(json|jsonl)(\.gz)?$", p.name))
        if not files:
            raise CamelidError(f"{path}: no .json or .jsonl files in this folder")
        return files
    if not path.is_file():
        raise CamelidError(f"{path}: no such file or folder")
    return [path]


def _stem(path: Path) -> str:
    name = path.name
    for ext in (".gz", ".jsonl", ".json"):
        name = name[: -len(ext)] if name.endswith(ext) else name
    return name


def open_binary(path: Path):
    """(decoded stream, raw file) — the raw file's position drives the progress bar."""
    raw = open(path, "rb")
    if raw.read(2) == b"\x1f\x8b":
        raw.seek(0)
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw
    raw.seek(0)
    return raw, raw


BOM = b"\xef\xbb\xbf"


def iter_records(path: Path, on_progress: Callable[[int], None] | None = None) -> Iterator[RawRecord]:
    """Records of a JSON list (streamed with ijson) or of a JSONL file, by first non-blank character."""
    stream, raw = open_binary(path)
    stem = _stem(path)
    try:
        head = stream.read(4096)
        stream.seek(0)
        if head.startswith(BOM):  # a UTF-8 byte-order mark, as some Windows tools write
            stream.read(len(BOM))
        first = head.removeprefix(BOM).lstrip()[:1]
        if first == b"[":
            import ijson
            i = -1
            try:
                for i, value in enumerate(ijson.items(stream, "item", use_float=True)):
                    if on_progress:
                        on_progress(raw.tell())
                    yield RawRecord(f"{path}: record index {i}", f"{stem}:{i}", value)
            except ijson.JSONError as e:
                raise CamelidError(f"{path}: invalid JSON after record index {i}: {e}; "
                                   "the file is cut short or corrupt") from None
        else:
            for lineno, line in enumerate(stream, 1):
                if on_progress and lineno % 256 == 0:
                    on_progress(raw.tell())
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    value = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    yield RawRecord(where, f"{stem}:{lineno}", error=f"not valid JSON ({e})")
                    continue
                yield RawRecord(where, f"{stem}:{lineno}", value)
        if on_progress:
            on_progress(raw.tell())
    except (OSError, EOFError) as e:
        raise CamelidError(f"{path}: cannot read ({e})") from None
    finally:
        stream.close()
        raw.close()
