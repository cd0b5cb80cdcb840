"""`camelid data prepare` (conversations for fine-tuning) and `camelid data tokenize` (raw text for pre-training)."""
from __future__ import annotations

import argparse
import sys


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
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(func=cmd_tokenize)


def register(sub: argparse._SubParsersAction) -> None:
    from ..data.prepare import add_arguments as add_prepare
    p = sub.add_parser("data", help="Training data: `camelid data prepare` (conversations), "
                                    "`camelid data tokenize` (raw text)",
                       description="Fine-tuning data the Koala way (sources, filters, mixtures, train/eval split) "
                                   "and raw text tokenized for pre-training.")
    _add_tokenize(add_prepare(p))
