"""`camelid data prepare`: read the sources, filter, mix, split, write train.jsonl / eval.jsonl / manifest.json.

Kept conversations are spooled to disk as they stream in (memory holds offsets and hashes only), then drawn
from the spool for the mixture. Everything that is random is seeded and keyed by the record, so the same
inputs and seed give byte-identical outputs.
"""
from __future__ import annotations

import hashlib
import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import CamelidError
from .filters import (FILTER_NAMES, Deduplicator, LanguageFilter, NearDuplicateFilter, error_reply, length_check,
                      shape, teacher_mention)
from .sources import READERS, BadRecord, Skip, iter_records, source_files

MANIFEST_VERSION = 1
RECORD_SCHEMA = "{id, source, messages: [{role: system|user|assistant, content}], preferred: bool}"


@dataclass
class SourceStats:
    files: list[str] = field(default_factory=list)
    records: int = 0                  # published records read (JSONL lines / list items)
    malformed: int = 0
    skipped: dict[str, int] = field(default_factory=dict)   # left out by the source's own rule (WebGPT ties)
    conversations: int = 0            # conversations made from the records, before filtering
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FILTER_NAMES, 0))
    kept: int = 0
    kept_rejected: int = 0            # of `kept`: hindsight (preferred: false) conversations
    weight: float = 1.0
    train: int = 0
    eval: int = 0


@dataclass(slots=True)
class _Spooled:
    offset: int
    source: str
    group: str


def parse_sources(specs: list[str]) -> list[tuple[str, Path]]:
    out = []
    for spec in specs:
        kind, sep, path = spec.partition(":")
        kind = kind.strip().lower()
        if not sep or not path:
            raise CamelidError(f"--source {spec!r}: expected KIND:PATH, e.g. sharegpt:sg_90k.json")
        if kind not in READERS:
            raise CamelidError(f"--source {spec!r}: unknown kind {kind!r}; kinds: {', '.join(READERS)}")
        out.append((kind, Path(path)))
    return out


def parse_mix(text: str | None, kinds: list[str]) -> dict[str, float]:
    """'sharegpt=1.0,alpaca=0.5' -> weights; a source not named keeps weight 1.0."""
    weights = dict.fromkeys(kinds, 1.0)
    for item in filter(None, (s.strip() for s in (text or "").split(","))):
        name, sep, value = item.partition("=")
        name = name.strip().lower()
        try:
            w = float(value)
        except ValueError:
            w = -1.0
        if not sep or w < 0 or w != w or w == float("inf"):
            raise CamelidError(f"--mix {item!r}: expected NAME=WEIGHT with a weight >= 0, e.g. alpaca=0.5")
        if name not in weights:
            raise CamelidError(f"--mix names {name!r}, which is not among the --source kinds ({', '.join(kinds)})")
        weights[name] = w
    return weights


def _unit(*parts: object) -> float:
    """A number in [0, 1) fixed by its inputs (not by Python's hash seed or by record order)."""
    h = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64


def mixture(indices_by_source: dict[str, list[int]], weights: dict[str, float], seed: int) -> list[tuple[int, int]]:
    """(index, copy number) picks: weight w takes floor(w) copies of every record plus a seeded sample of
    round((w - floor(w)) * n) records without repetition; 0.5 keeps half, 2.5 repeats all twice and half thrice."""
    picks: list[tuple[int, int]] = []
    for name, idx in indices_by_source.items():
        w = weights.get(name, 1.0)
        full, frac = int(w), w - int(w)
        rng = random.Random(f"camelid-mix:{seed}:{name}")
        for copy in range(full):
            picks.extend((i, copy) for i in idx)
        extra = sorted(rng.sample(idx, round(frac * len(idx)))) if frac and idx else []
        picks.extend((i, full) for i in extra)
    random.Random(f"camelid-shuffle:{seed}").shuffle(picks)
    return picks


@dataclass
class Settings:
    """How conversations are kept, mixed and split (recorded in the manifest)."""
    seed: int = 0
    eval_fraction: float = 0.05
    hindsight: bool = False
    min_chars: int = 16
    max_chars: int | None = None
    language: str = "en"
    teacher_filter: bool = True
    dedup: str = "source"
    near_dup: float | None = None
    skip_bad: bool = False

    def check(self) -> None:
        if not 0.0 <= self.eval_fraction < 1.0:
            raise CamelidError(f"--eval-fraction {self.eval_fraction}: expected a fraction in [0, 1)")
        if self.min_chars < 0 or (self.max_chars is not None and self.max_chars < self.min_chars):
            raise CamelidError("--min-chars/--max-chars: expected 0 <= min <= max")
        if self.dedup not in ("source", "global", "none"):
            raise CamelidError(f"--dedup {self.dedup!r}: expected source, global or none")
        if self.near_dup is not None and not 0.0 < self.near_dup <= 1.0:
            raise CamelidError(f"--near-dup {self.near_dup}: expected a Jaccard similarity threshold in (0, 1], e.g. 0.8")
        if self.near_dup is not None and self.dedup == "none":
            raise CamelidError("--near-dup works within the --dedup scope: use it with --dedup source or global")


class _Filters:
    """Why a conversation is dropped (a FILTER_NAMES entry), or None to keep it; duplicates are remembered."""

    def __init__(self, settings: Settings):
        self.s = settings
        self.language = LanguageFilter(settings.language) if settings.language != "any" else None
        self.exact = Deduplicator()
        self.near = NearDuplicateFilter(settings.near_dup) if settings.near_dup is not None else None

    def __call__(self, kind: str, conv: Any) -> tuple[list[dict], str | None]:
        s = self.s
        messages, reason = shape(conv.messages)
        reason = (reason or length_check(messages, s.min_chars, s.max_chars)
                  or error_reply(messages)
                  or (s.teacher_filter and teacher_mention(messages) or None)
                  or (self.language(messages) if self.language else None))
        if reason is None and s.dedup != "none":
            scope = kind if s.dedup == "source" else ""
            reason = self.exact(messages, f"{kind}:{conv.group}", scope=scope)
            if reason is None and self.near is not None:
                reason = self.near(messages, f"{kind}:{conv.group}", scope=scope)
        return messages, reason


class _Spooler:
    """Reads the sources record by record, keeps the conversations the filters pass and appends them to the spool
    (memory holds offsets only), counting everything per source."""

    def __init__(self, settings: Settings, stats: dict[str, SourceStats], spool: BinaryIO, progress: bool | None):
        self.s, self.stats, self.spool = settings, stats, spool
        self.disable = None if progress is None else not progress
        self.filters = _Filters(settings)
        self.spooled: list[_Spooled] = []
        self.ids_seen: set[str] = set()
        self.malformed_examples: list[str] = []

    def read(self, kind: str, path: Path) -> None:
        from tqdm import tqdm
        st = self.stats[kind]
        st.files.append(str(path))
        with tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=f"{kind} {path.name}",
                  disable=self.disable, leave=False, file=sys.stderr) as bar:
            for rec in iter_records(path, lambda pos: bar.update(max(pos - bar.n, 0))):
                st.records += 1
                for conv in self._conversations(kind, rec, st):
                    if conv.preferred or self.s.hindsight:
                        self._keep(kind, conv, st)

    def _conversations(self, kind: str, rec: Any, st: SourceStats) -> list:
        """The conversations a record makes; none for a record its source skips or a malformed one (counted with
        --skip-bad, else one clear error)."""
        try:
            if rec.error:
                raise BadRecord(rec.error)
            return READERS[kind](rec.value, rec.uid)
        except Skip as s:
            st.skipped[str(s)] = st.skipped.get(str(s), 0) + 1
        except (BadRecord, KeyError, TypeError, AttributeError, ValueError) as e:
            msg = f"{rec.where}: malformed {kind} record: {e}"
            if not self.s.skip_bad:
                raise CamelidError(f"{msg}; fix it or pass --skip-bad to skip and count such records") from None
            st.malformed += 1
            if len(self.malformed_examples) < 20:
                self.malformed_examples.append(msg)
        return []

    def _keep(self, kind: str, conv: Any, st: SourceStats) -> None:
        st.conversations += 1
        messages, reason = self.filters(kind, conv)
        if reason:
            st.dropped[reason] += 1
            return
        cid, n = f"{kind}:{conv.id}", 2
        while cid in self.ids_seen:  # e.g. one ShareGPT id shared by different conversations
            cid, n = f"{kind}:{conv.id}~{n}", n + 1
        self.ids_seen.add(cid)
        self.spooled.append(_Spooled(self.spool.tell(), kind, f"{kind}:{conv.group}"))
        record = {"id": cid, "source": kind, "messages": messages, "preferred": conv.preferred}
        self.spool.write(json.dumps(record, ensure_ascii=False).encode() + b"\n")
        st.kept += 1
        st.kept_rejected += not conv.preferred


def split(spooled: list[_Spooled], weights: dict[str, float], settings: Settings
          ) -> tuple[list[tuple[int, int]], list[int]]:
    """(training picks after the mixture, eval indices): split by conversation group, so a comparison's two
    sides and a question's answers stay together; the eval split is never resampled."""
    train_idx: dict[str, list[int]] = {k: [] for k in weights}
    eval_idx: list[int] = []
    for i, s in enumerate(spooled):
        if weights[s.source] == 0:
            continue
        if _unit("camelid-split", settings.seed, s.group) < settings.eval_fraction:
            eval_idx.append(i)
        else:
            train_idx[s.source].append(i)
    random.Random(f"camelid-eval:{settings.seed}").shuffle(eval_idx)
    return mixture(train_idx, weights, settings.seed), eval_idx


def _write_split(spooler: _Spooler, path: Path, picks: list[tuple[int, int]], split_name: str) -> None:
    """The picked conversations read back from the spool, a repeated one with its copy number in its id."""
    from tqdm import tqdm
    spool = spooler.spool
    with open(path, "w", encoding="utf-8") as f:
        for i, copy in tqdm(picks, desc=f"write {path.name}", disable=spooler.disable, leave=False, file=sys.stderr):
            spool.seek(spooler.spooled[i].offset)
            record = json.loads(spool.readline())
            if copy:
                record["id"] = f"{record['id']}#{copy + 1}"
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            st = spooler.stats[record["source"]]
            setattr(st, split_name, getattr(st, split_name) + 1)


def _manifest(settings: Settings, weights: dict[str, float], stats: dict[str, SourceStats],
              malformed_examples: list[str]) -> dict:
    s = settings
    return {
        "format": "camelid-conversations",
        "version": MANIFEST_VERSION,
        "record": RECORD_SCHEMA,
        "files": {"train": "train.jsonl", "eval": "eval.jsonl"},
        "settings": {"seed": s.seed, "eval_fraction": s.eval_fraction, "mix": weights, "hindsight": s.hindsight,
                     "hindsight_marker": "An Unhelpful Answer:" if s.hindsight else None,
                     "min_chars": s.min_chars, "max_chars": s.max_chars, "language": s.language,
                     "teacher_filter": s.teacher_filter, "dedup": s.dedup,
                     "near_dup": s.near_dup, "skip_bad": s.skip_bad},
        "sources": {k: vars(v) for k, v in stats.items()},
        "filters": {name: sum(st.dropped[name] for st in stats.values()) for name in FILTER_NAMES},
        "totals": {key: sum(getattr(st, key) for st in stats.values())
                   for key in ("records", "malformed", "conversations", "kept", "train", "eval")},
        "malformed_examples": malformed_examples,
    }


def prepare(sources: list[tuple[str, Path]], out: Path, *, mix: str | None = None, force: bool = False,
            progress: bool | None = None, **settings: Any) -> dict:
    """Run the whole pipeline (`settings`: the fields of Settings); returns the manifest it wrote to
    out/manifest.json."""
    from ..formats.atomic import atomic_output  # (formats/ imports torch: only when running, not for --help)
    chosen = Settings(**settings)
    chosen.check()
    kinds = list(dict.fromkeys(kind for kind, _ in sources))
    weights = parse_mix(mix, kinds)
    files = [(kind, f) for kind, path in sources for f in source_files(path)]
    stats = {kind: SourceStats(weight=weights[kind]) for kind in kinds}
    with atomic_output(out, force=force) as tmp:
        spool_path = tmp / ".spool.jsonl"
        with open(spool_path, "w+b") as spool:
            spooler = _Spooler(chosen, stats, spool, progress)
            for kind, path in files:
                spooler.read(kind, path)
            train_picks, eval_idx = split(spooler.spooled, weights, chosen)
            _write_split(spooler, tmp / "train.jsonl", train_picks, "train")
            _write_split(spooler, tmp / "eval.jsonl", [(i, 0) for i in eval_idx], "eval")
        spool_path.unlink()
        manifest = _manifest(chosen, weights, stats, spooler.malformed_examples)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest
