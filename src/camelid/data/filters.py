"""Koala's filters: conversation shape, length, teacher mentions, language, duplicate and
near-duplicate user queries.

Each filter returns the name it is counted under in the manifest, or None to keep the conversation.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata

import numpy as np

# Koala dropped every ShareGPT conversation with one of these anywhere in it (koala_data_pipeline,
# process_chat_data.py FILTER_KEYWORDS), so the model does not learn to call itself ChatGPT or credit OpenAI.
# Case-insensitive substrings; extend the tuple to extend the filter.
TEACHER_PATTERNS = (
    "openai", "open-ai", "open ai", "chatgpt", "chat-gpt", "chadgpt", "gpt-3", "gpt3", "gpt-4", "gpt4",
)
# Replies that are ChatGPT's page errors rather than answers (FastChat drops the same in clean_sharegpt).
ERROR_REPLIES = (
    "Too many requests in 1 hour. Try again later.",
    "!Too many requests in 1 hour. Try again later.",
    "An error occurred. If this issue persists please contact us through our help center",
    "network error",
)
FILTER_NAMES = ("turns", "empty", "too_short", "too_long", "error_reply", "teacher", "language", "duplicate",
                "near_duplicate")


def shape(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], str | None]:
    """Make a trainable dialog: optional system, then user/assistant alternating, ending on an assistant reply.

    Like FastChat: leading assistant turns and a trailing user turn are dropped, and the conversation is cut
    before the first empty reply. Turns that do not alternate drop the conversation ("turns").
    """
    system = [m for m in messages[:1] if m["role"] == "system"]
    rest = messages[len(system):]
    while rest and rest[0]["role"] == "assistant":
        rest = rest[1:]
    if any(m["role"] == "system" for m in rest):
        return messages, "turns"
    for i, m in enumerate(rest):
        if m["role"] != ("user" if i % 2 == 0 else "assistant"):
            return messages, "turns"
    for i, m in enumerate(rest):
        if not m["content"].strip():
            rest = rest[: i - i % 2]  # cut before the user turn of this exchange
            break
    rest = rest[: len(rest) // 2 * 2]
    if not rest:
        return messages, "empty"
    return system + rest, None


def length_check(messages: list[dict[str, str]], min_chars: int, max_chars: int | None) -> str | None:
    n = sum(len(m["content"]) for m in messages)
    if n < min_chars:
        return "too_short"
    if max_chars is not None and n > max_chars:
        return "too_long"
    return None


def error_reply(messages: list[dict[str, str]]) -> str | None:
    for m in messages:
        if m["role"] == "assistant" and m["content"].lstrip().startswith(ERROR_REPLIES):
            return "error_reply"
    return None


def teacher_mention(messages: list[dict[str, str]], patterns: tuple[str, ...] = TEACHER_PATTERNS) -> str | None:
    for m in messages:
        low = m["content"].lower()
        if any(p in low for p in patterns):
            return "teacher"
    return None


_CODE = re.compile(r"```.*?(```|$)|`[^`\n]*`", re.DOTALL)
_URL = re.compile(r"https?://\S+")
_NON_LETTERS = re.compile(r"[\W\d_]+")


class LanguageFilter:
    """Drops conversations written in another language, with py3langid (its model ships inside the wheel).

    Code and URLs are removed before classifying (they read as random languages), and a text with too few
    letters is kept: a language cannot be told from "ok".
    """

    def __init__(self, language: str = "en", min_letters: int = 25, min_probability: float = 0.8,
                 max_chars: int = 2000) -> None:
        self.language, self.min_letters, self.min_probability, self.max_chars = (
            language, min_letters, min_probability, max_chars)
        self._identifier = None

    def identify(self, text: str) -> tuple[str, float] | None:
        """(language, probability) of the prose in `text`, or None when there is too little of it."""
        prose = _URL.sub(" ", _CODE.sub(" ", text))[: self.max_chars]
        if len(_NON_LETTERS.sub("", prose)) < self.min_letters:
            return None
        if self._identifier is None:
            from py3langid.langid import MODEL_FILE, LanguageIdentifier
            self._identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        lang, prob = self._identifier.classify(prose)
        return lang, float(prob)

    def __call__(self, messages: list[dict[str, str]]) -> str | None:
        found = self.identify("\n".join(m["content"] for m in messages))
        if found and found[0] != self.language and found[1] >= self.min_probability:
            return "language"
        return None


def normalize_query(text: str) -> str:
    """Casefold, collapse whitespace, strip punctuation at both ends: 'What is AI?' == ' what  is ai'."""
    text = " ".join(text.casefold().split())
    start, end = 0, len(text)
    while start < end and _is_punct_or_space(text[start]):
        start += 1
    while end > start and _is_punct_or_space(text[end - 1]):
        end -= 1
    return text[start:end]


def _is_punct_or_space(c: str) -> bool:
    return c.isspace() or unicodedata.category(c).startswith("P")


def _digest(parts: list[str]) -> bytes:
    return hashlib.blake2b("\x1f".join(parts).encode("utf-8", "surrogatepass"), digest_size=16).digest()


class Deduplicator:
    """Koala's dedup at the user-query level: one conversation per (normalized) sequence of user queries.

    Conversations of one group (the answers HC3 gives to one question, the two sides of a comparison, the
    several comparisons of one summarized post) share their query on purpose and are not duplicates of each
    other; an exact copy of a whole conversation always is. Keys are 16-byte hashes, so memory stays small.
    """

    def __init__(self) -> None:
        self.query_owner: dict[bytes, str] = {}
        self.exact: set[bytes] = set()

    def __call__(self, messages: list[dict[str, str]], group: str, scope: str = "") -> str | None:
        exact = _digest([scope] + [f"{m['role']}\x1e{m['content']}" for m in messages])
        query = _digest([scope] + [normalize_query(m["content"]) for m in messages if m["role"] == "user"])
        owner = self.query_owner.get(query)
        if exact in self.exact or (owner is not None and owner != group):
            return "duplicate"
        self.exact.add(exact)
        self.query_owner.setdefault(query, group)
        return None


_WORD = re.compile(r"\w+")


def _h64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def shingles(text: str, n: int = 5) -> set[str]:
    """Word n-grams of `text` (casefolded words, punctuation ignored); a text shorter than n words is one gram."""
    words = _WORD.findall(text.casefold())
    n = min(n, len(words))
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)} if n else set()


class NearDuplicateFilter:
    """Drops a conversation whose user queries have Jaccard similarity >= `threshold` (word 5-gram shingles)
    with an earlier kept conversation of another group in the same scope.

    MinHash (`permutations` seeded 64-bit mixers over blake2b hashes of the shingles) split into b bands of
    r rows finds candidates; r is the largest for which a pair exactly at the threshold shares a band with
    probability >= 0.9 (1 - (1 - t^r)^b), so pairs above it are missed rarely and unrelated ones seldom
    compared. Every candidate is confirmed on the exact Jaccard of the two shingle sets, so nothing is
    dropped for a hash collision. Memory per kept conversation: its sorted 64-bit shingle hashes (8 bytes per
    shingle, ~ one per user word), its group name, and one index entry per band (~75 bytes each; 16 bands
    at 0.8): ~1.6 KB for a 45-word query.
    """

    def __init__(self, threshold: float, permutations: int = 128) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"near-duplicate threshold {threshold}: expected a number in (0, 1]")
        self.threshold = threshold
        self.rows = max(r for r in range(1, permutations + 1)
                        if r == 1 or 1 - (1 - threshold ** r) ** (permutations // r) >= 0.9)
        self.bands = permutations // self.rows
        self._seeds = np.array([_h64(f"camelid-minhash:{i}".encode()) for i in range(self.bands * self.rows)],
                               dtype=np.uint64)
        self._index: dict[int, int | list[int]] = {}   # band key -> kept item(s)
        self._items: list[tuple[bytes, str]] = []       # (sorted shingle hashes, group) per kept conversation

    def signature(self, hashes: np.ndarray) -> np.ndarray:
        """MinHash: per seed, the least splitmix64 finalizer of (hash ^ seed) over the shingles."""
        sig = np.full(len(self._seeds), np.iinfo(np.uint64).max, dtype=np.uint64)
        for start in range(0, len(hashes), 2048):  # bounded temporaries for very long queries
            z = hashes[start:start + 2048, None] ^ self._seeds[None, :]
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            np.minimum(sig, (z ^ (z >> np.uint64(31))).min(axis=0), out=sig)
        return sig

    def __call__(self, messages: list[dict[str, str]], group: str, scope: str = "") -> str | None:
        text = "\n".join(normalize_query(m["content"]) for m in messages if m["role"] == "user")
        hashes = np.unique(np.fromiter((_h64(s.encode("utf-8", "surrogatepass")) for s in shingles(text)),
                                       dtype=np.uint64))
        if not len(hashes):
            return None
        sig = self.signature(hashes)
        prefix = scope.encode("utf-8", "surrogatepass") + b"\x1f"
        keys = [_h64(prefix + band.to_bytes(2, "little") + sig[band * self.rows:(band + 1) * self.rows].tobytes())
                for band in range(self.bands)]
        seen: set[int] = set()
        for key in keys:
            found = self._index.get(key)
            for item in (found if isinstance(found, list) else () if found is None else (found,)):
                if item in seen:
                    continue
                seen.add(item)
                other, other_group = self._items[item]
                if other_group == group:  # a group shares its query on purpose (see Deduplicator)
                    continue
                other_hashes = np.frombuffer(other, dtype=np.uint64)
                inter = len(np.intersect1d(hashes, other_hashes, assume_unique=True))
                if inter / (len(hashes) + len(other_hashes) - inter) >= self.threshold:
                    return "near_duplicate"
        item = len(self._items)
        self._items.append((hashes.tobytes(), group))
        for key in keys:
            found = self._index.setdefault(key, item)
            if found != item:
                if isinstance(found, list):
                    found.append(item)
                else:
                    self._index[key] = [found, item]
        return None
