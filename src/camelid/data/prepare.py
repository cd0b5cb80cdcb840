"""`camelid data prepare`: read the sources, filter, mix, split, write train.jsonl / eval.jsonl / manifest.json.

Kept conversations are spooled to disk as they stream in (memory holds offsets and hashes only), then drawn
from the spool for the mixture. Everything that is random is seeded and keyed by the record, so the same
inputs and seed give byte-identical outputs.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

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


def prepare(sources: list[tuple[str, Path]], out: Path, *, mix: str | None = None, seed: int = 0,
            eval_fraction: float = 0.05, hindsight: bool = False, min_chars: int = 16,
            max_chars: int | None = None, language: str = "en", teacher_filter: bool = True,
            dedup: str = "source", near_dup: float | None = None, skip_bad: bool = False, force: bool = False,
            progress: bool | None = None) -> dict:
    """Run the whole pipeline; returns the manifest it wrote to out/manifest.json."""
    from tqdm import tqdm

    from ..formats.atomic import atomic_output  # (formats/ imports torch: only when running, not for --help)

    if not 0.0 <= eval_fraction < 1.0:
        raise CamelidError(f"--eval-fraction {eval_fraction}: expected a fraction in [0, 1)")
    if min_chars < 0 or (max_chars is not None and max_chars < min_chars):
        raise CamelidError("--min-chars/--max-chars: expected 0 <= min <= max")
    if dedup not in ("source", "global", "none"):
        raise CamelidError(f"--dedup {dedup!r}: expected source, global or none")
    if near_dup is not None and not 0.0 < near_dup <= 1.0:
        raise CamelidError(f"--near-dup {near_dup}: expected a Jaccard similarity threshold in (0, 1], e.g. 0.8")
    if near_dup is not None and dedup == "none":
        raise CamelidError("--near-dup works within the --dedup scope: use it with --dedup source or global")
    kinds = list(dict.fromkeys(kind for kind, _ in sources))
    weights = parse_mix(mix, kinds)
    files = [(kind, f) for kind, path in sources for f in source_files(path)]
    stats = {kind: SourceStats(weight=weights[kind]) for kind in kinds}
    lang_filter = LanguageFilter(language) if language != "any" else None
    deduper = Deduplicator()
    near_deduper = NearDuplicateFilter(near_dup) if near_dup is not None else None
    malformed_examples: list[str] = []
    disable = None if progress is None else not progress

    with atomic_output(out, force=force) as tmp:
        spool_path = tmp / ".spool.jsonl"
        spooled: list[_Spooled] = []
        ids_seen: set[str] = set()
        with open(spool_path, "w+b") as spool:
            for kind, path in files:
                st = stats[kind]
                st.files.append(str(path))
                reader = READERS[kind]
                size = path.stat().st_size
                with tqdm(total=size, unit="B", unit_scale=True, desc=f"{kind} {path.name}", disable=disable,
                          leave=False, file=sys.stderr) as bar:
                    def on_progress(pos: int, bar=bar) -> None:
                        bar.update(max(pos - bar.n, 0))

                    for rec in iter_records(path, on_progress):
                        st.records += 1
                        try:
                            if rec.error:
                                raise BadRecord(rec.error)
                            uid = rec.uid
                            convs = reader(rec.value, uid)
                        except Skip as s:
                            st.skipped[str(s)] = st.skipped.get(str(s), 0) + 1
                            continue
                        except (BadRecord, KeyError, TypeError, AttributeError, ValueError) as e:
                            msg = f"{rec.where}: malformed {kind} record: {e}"
                            if not skip_bad:
                                raise CamelidError(f"{msg}; fix it or pass --skip-bad to skip and count such "
                                                   "records") from None
                            st.malformed += 1
                            if len(malformed_examples) < 20:
                                malformed_examples.append(msg)
                            continue
                        for conv in convs:
                            if not conv.preferred and not hindsight:
                                continue
                            st.conversations += 1
                            messages, reason = shape(conv.messages)
                            reason = (reason or length_check(messages, min_chars, max_chars)
                                      or error_reply(messages)
                                      or (teacher_filter and teacher_mention(messages) or None)
                                      or (lang_filter(messages) if lang_filter else None))
                            if reason is None and dedup != "none":
                                scope = kind if dedup == "source" else ""
                                reason = deduper(messages, f"{kind}:{conv.group}", scope=scope)
                                if reason is None and near_deduper is not None:
                                    reason = near_deduper(messages, f"{kind}:{conv.group}", scope=scope)
                            if reason:
                                st.dropped[reason] += 1
                                continue
                            cid = f"{kind}:{conv.id}"
                            n = 2
                            while cid in ids_seen:  # e.g. one ShareGPT id shared by different conversations
                                cid, n = f"{kind}:{conv.id}~{n}", n + 1
                            ids_seen.add(cid)
                            spooled.append(_Spooled(spool.tell(), kind, f"{kind}:{conv.group}"))
                            record = {"id": cid, "source": kind, "messages": messages, "preferred": conv.preferred}
                            spool.write(json.dumps(record, ensure_ascii=False).encode() + b"\n")
                            st.kept += 1
                            st.kept_rejected += not conv.preferred

            # Split by conversation group (a comparison's two sides, a question's answers stay together).
            train_idx: dict[str, list[int]] = {k: [] for k in kinds}
            eval_idx: list[int] = []
            for i, s in enumerate(spooled):
                if weights[s.source] == 0:
                    continue
                if _unit("camelid-split", seed, s.group) < eval_fraction:
                    eval_idx.append(i)
                else:
                    train_idx[s.source].append(i)
            train_picks = mixture(train_idx, weights, seed)
            random.Random(f"camelid-eval:{seed}").shuffle(eval_idx)

            def write(name: str, picks: list[tuple[int, int]], split: str) -> None:
                with open(tmp / name, "w", encoding="utf-8") as f:
                    for i, copy in tqdm(picks, desc=f"write {name}", disable=disable, leave=False, file=sys.stderr):
                        spool.seek(spooled[i].offset)
                        record = json.loads(spool.readline())
                        if copy:
                            record["id"] = f"{record['id']}#{copy + 1}"
                        f.write(json.dumps(record, ensure_ascii=False) + "\n")
                        st = stats[record["source"]]
                        setattr(st, split, getattr(st, split) + 1)

            write("train.jsonl", train_picks, "train")
            write("eval.jsonl", [(i, 0) for i in eval_idx], "eval")
        spool_path.unlink()

        manifest = {
            "format": "camelid-conversations",
            "version": MANIFEST_VERSION,
            "record": RECORD_SCHEMA,
            "files": {"train": "train.jsonl", "eval": "eval.jsonl"},
            "settings": {"seed": seed, "eval_fraction": eval_fraction, "mix": weights, "hindsight": hindsight,
                         "hindsight_marker": "An Unhelpful Answer:" if hindsight else None,
                         "min_chars": min_chars, "max_chars": max_chars, "language": language,
                         "teacher_filter": teacher_filter, "dedup": dedup,
                         "near_dup": near_dup, "skip_bad": skip_bad},
            "sources": {k: vars(v) for k, v in stats.items()},
            "filters": {name: sum(s.dropped[name] for s in stats.values()) for name in FILTER_NAMES},
            "totals": {key: sum(getattr(s, key) for s in stats.values())
                       for key in ("records", "malformed", "conversations", "kept", "train", "eval")},
            "malformed_examples": malformed_examples,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return manifest


# --- CLI --------------------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> argparse._SubParsersAction:
    """The `prepare` action under `camelid data`; returns the actions' subparsers for the others."""
    sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    q = sub.add_parser("prepare", help=cmd_prepare.__doc__, description=cmd_prepare.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG)
    q.add_argument("--source", action="append", required=True, metavar="KIND:PATH",
                   help=f"a source file or folder (repeatable); KIND is one of {', '.join(READERS)}")
    q.add_argument("--out", required=True, help="output folder (train.jsonl, eval.jsonl, manifest.json)")
    q.add_argument("--mix", help="sampling weights per kind, e.g. sharegpt=1.0,alpaca=0.5 (default 1.0 each)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--eval-fraction", type=float, default=0.05, help="share of conversations held out (default 0.05)")
    q.add_argument("--hindsight", action="store_true",
                   help="also write the rejected side of comparisons, marked 'An Unhelpful Answer:' (preferred: false)")
    q.add_argument("--min-chars", type=int, default=16, help="drop conversations shorter than this (default 16)")
    q.add_argument("--max-chars", type=int, help="drop conversations longer than this")
    q.add_argument("--language", default="en", help="keep this language (ISO 639-1; 'any' keeps all; default en)")
    q.add_argument("--no-teacher-filter", dest="teacher_filter", action="store_false",
                   help="keep conversations that mention OpenAI/ChatGPT")
    q.add_argument("--dedup", choices=("source", "global", "none"), default="source",
                   help="user-query dedup within each source (default), across all sources, or not at all")
    q.add_argument("--near-dup", type=float, metavar="THRESHOLD",
                   help="also drop near-duplicate user queries: Jaccard similarity >= THRESHOLD on word 5-grams "
                        "(MinHash LSH, confirmed exactly) with an earlier kept conversation, in the --dedup scope")
    q.add_argument("--skip-bad", action="store_true", help="skip malformed records and count them in the manifest")
    q.add_argument("--force", action="store_true", help="replace an existing --out folder")
    q.set_defaults(func=cmd_prepare)
    return sub


_EPILOG = """\
kinds and the files they read:
  sharegpt   JSON list (or JSONL) of {id, conversations: [{from: human|gpt, value}]}; HTML dumps converted
  hc3        JSONL {id, question, human_answers, chatgpt_answers, source}; one conversation per answer
  oig        JSONL {text: "<human>: ...\\n<bot>: ..."}; a folder reads every *.jsonl in it
  alpaca     JSON list of {instruction, input, output}
  hh         JSONL(.gz) {chosen, rejected} ("\\n\\nHuman: ..." / "\\n\\nAssistant: ...")
  webgpt     JSON(L) {question: {full_text}, answer_0/1, score_0/1, quotes_0/1}; ties skipped
  summarize  JSONL {info: {post, title}, summaries: [{text}, {text}], choice}
--mix weights multiply each kind's kept training conversations: 0.5 samples half, 1 keeps all,
2.5 repeats every one twice plus a seeded half a third time; 0 leaves the kind out. The eval split is
never resampled. The split is by conversation group and fixed by --seed.
"""


def cmd_prepare(args: argparse.Namespace) -> None:
    """Build a fine-tuning set from Koala's sources: filter, dedup, mix, split into train/eval JSONL."""
    manifest = prepare(parse_sources(args.source), Path(args.out), mix=args.mix, seed=args.seed,
                       eval_fraction=args.eval_fraction, hindsight=args.hindsight, min_chars=args.min_chars,
                       max_chars=args.max_chars, language=args.language, teacher_filter=args.teacher_filter,
                       dedup=args.dedup, near_dup=args.near_dup, skip_bad=args.skip_bad, force=args.force)
    print(f"{'source':<10} {'records':>8} {'bad':>5} {'kept':>8} {'train':>8} {'eval':>6}  dropped")
    for name, s in manifest["sources"].items():
        dropped = ", ".join(f"{k} {v}" for k, v in s["dropped"].items() if v) or "-"
        print(f"{name:<10} {s['records']:>8} {s['malformed']:>5} {s['kept']:>8} {s['train']:>8} {s['eval']:>6}  {dropped}")
    t = manifest["totals"]
    print(f"wrote {args.out}/train.jsonl ({t['train']}), eval.jsonl ({t['eval']}), manifest.json")
