"""`camelid data prepare` (conversations for fine-tuning) and `camelid data tokenize` (raw text for pre-training)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..data.sources import READERS
from .options import add_quiet


def _add_prepare(p: argparse.ArgumentParser) -> argparse._SubParsersAction:
    """The `prepare` action under `camelid data`; returns the actions' subparsers for the others."""
    sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    q = sub.add_parser("prepare", help=cmd_prepare.__doc__, description=cmd_prepare.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG)
    q.add_argument("--source", action="append", required=True, metavar="KIND:PATH",
                   help=f"a source file or folder (repeatable); KIND is one of {', '.join(READERS)}")
    q.add_argument("--out", required=True, help="output folder (train.jsonl, eval.jsonl, manifest.json)")
    q.add_argument("--mix", help="sampling weights per kind, e.g. sharegpt=1.0,alpaca=0.5 (default 1.0 each)")
    q.add_argument("--seed", type=int, default=0, help="seed of the split and the mixture (default 0)")
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
    from ..data.prepare import parse_sources, prepare
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


def cmd_tokenize(args: argparse.Namespace) -> None:
    """Tokenize raw text (JSONL with a text field, plain text; .gz / .zst) into one memory-mapped token
    array for `camelid train --text-data`: documents joined with EOS, an index of document starts, a manifest."""
    from ..data.tokenize import tokenize_corpus
    m = tokenize_corpus(args.source, args.out, model=args.model, field=args.field, unit=args.text_unit,
                        workers=args.workers, skip_bad=args.skip_bad, force=args.force, cache_dir=args.cache_dir,
                        quiet=args.quiet)
    skipped = f", {m['bad_records']} bad record(s) skipped" if m["bad_records"] else ""
    print(f"tokenized {m['documents']} documents from {len(m['sources'])} file(s): {m['tokens']} tokens "
          f"({m['dtype']}){skipped}; wrote {args.out}", file=sys.stderr)


def _add_tokenize(actions: argparse._SubParsersAction) -> None:
    q = actions.add_parser("tokenize", help=cmd_tokenize.__doc__, description=cmd_tokenize.__doc__)
    q.add_argument("--source", nargs="+", required=True, metavar="FILE",
                   help="JSONL (.jsonl) or plain text (.txt) files, optionally .gz / .zst, or folders of them")
    q.add_argument("--out", required=True, help="output folder (tokens.bin, index.bin, manifest.json)")
    q.add_argument("--model", help="whose tokenizer: GGUF file or model folder (default: the built-in model)")
    q.add_argument("--field", default="text", help="the JSONL field holding the text (default: text)")
    q.add_argument("--text-unit", choices=("document", "paragraph", "line"), default="paragraph",
                   help="what one document of a plain-text file is: the whole file, a blank-line separated "
                        "paragraph (default) or a line")
    q.add_argument("--workers", type=int, default=1, help="processes reading and tokenizing (default 1)")
    q.add_argument("--skip-bad", action="store_true", help="leave out bad records and count them in the manifest")
    q.add_argument("--cache-dir", help="the `datasets` Arrow cache (default: $HF_DATASETS_CACHE)")
    q.add_argument("--force", action="store_true", help="replace an existing --out folder")
    add_quiet(q)
    q.set_defaults(func=cmd_tokenize)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="Training data: `camelid data prepare` (conversations), "
                                    "`camelid data tokenize` (raw text)",
                       description="Fine-tuning data the Koala way (sources, filters, mixtures, train/eval split) "
                                   "and raw text tokenized for pre-training.")
    _add_tokenize(_add_prepare(p))
