"""`camelid convert`, `camelid diff make|recover` and `camelid delta make|apply`: checkpoints in, one checkpoint out.

All three take their paths the same way, in order (inputs, then OUT), as `quantize` and `lora merge` do.
`delta` used to take `--base/--target/--delta/--out`: that spelling still works, with a one-line notice.
"""
from __future__ import annotations

import argparse
import re
import sys

from ..errors import CamelidError
from . import options as o

SOURCE = "HF or Meta folder, .gguf/.flm file, or an EasyLM spec like params::PATH"


def _report(result, what: str) -> None:
    from ..convert import disk_size
    mb = disk_size(result.out) / 1e6  # what the output takes on disk (quantized, with its tokenizer)
    print(f"wrote {result.out} ({what}): {result.tensors} tensors, {mb:.1f} MB in {result.seconds:.1f} s "
          f"({mb / max(result.seconds, 1e-9):.0f} MB/s)")


def parse_size(text: str) -> int:
    """'2GB', '500MB', '1.5GiB', '123' -> bytes."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise CamelidError(f"--shard-size {text!r}: expected a size like 2GB, 500MB or 1.5GiB")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2).upper() or " "))


def cmd_convert(args: argparse.Namespace) -> None:
    """Convert a checkpoint (HF folder, Meta folder, .gguf, params::EASYLM ...) to another format."""
    from ..convert import convert
    shard_size = parse_size(args.shard_size) if args.shard_size else None
    result = convert(args.src, args.out, args.to, dtype=args.dtype, quant=args.quant, shards=args.shards,
                     shard_size=shard_size, config=args.config, tokenizer=args.tokenizer, force=args.force,
                     progress=not args.quiet, group=args.group)
    _report(result, args.to)


def cmd_diff(args: argparse.Namespace) -> None:
    """Weight diffs: `make` a diff of TARGET against BASE, or `recover` TARGET from BASE and a diff."""
    from ..delta import make_diff, recover
    if args.action == "make":
        result = make_diff(args.base, args.target, args.out, fmt=args.format, dtype=args.dtype, config=args.config,
                           force=args.force, progress=not args.quiet)
        _report(result, "exact camelid diff" if args.format == "camelid" else f"{args.format} diff")
    else:
        result = recover(args.base, args.diff, args.out, fmt=args.format, dtype=args.dtype, config=args.config,
                         tokenizer=args.tokenizer, force=args.force, progress=not args.quiet)
        _report(result, args.format)


def cmd_delta(args: argparse.Namespace) -> None:
    """FastChat (Vicuna) deltas: `make` one from BASE and TARGET, or `apply` one to BASE."""
    second = "target" if args.action == "make" else "delta"
    _old_spelling(args, ("base", second, "out"))
    from ..delta import apply_delta, make_delta
    if args.action == "make":
        result = make_delta(args.base, args.target, args.out, fmt=args.format, config=args.config, force=args.force,
                            progress=not args.quiet)
        _report(result, f"{args.format} float16 delta")
    else:
        result = apply_delta(args.base, args.delta, args.out, fmt=args.format, config=args.config,
                             tokenizer=args.tokenizer, force=args.force, progress=not args.quiet)
        _report(result, args.format)


def _old_spelling(args: argparse.Namespace, names: tuple[str, ...]) -> None:
    """`delta make|apply --base B --target T --out O` (the old spelling) -> the positional paths, with a notice."""
    old = {n: getattr(args, f"old_{n}") for n in names}
    given = [n for n in names if getattr(args, n) is not None]
    if any(v is not None for v in old.values()):
        if given:
            raise CamelidError(f"give the paths either in order ({' '.join(n.upper() for n in names)}) or with "
                               f"{'/'.join('--' + n for n in names)}, not both")
        for n, v in old.items():
            setattr(args, n, v)
        print(f"camelid: notice: {'/'.join('--' + n for n in names)} is the old spelling; give the paths in order: "
              f"camelid delta {args.action} {' '.join(n.upper() for n in names)}", file=sys.stderr)
    missing = [n.upper() for n in names if getattr(args, n) is None]
    if missing:
        raise CamelidError(f"delta {args.action}: missing {' '.join(missing)} (usage: camelid delta {args.action} "
                           f"{' '.join(n.upper() for n in names)})")


# ---- options ---------------------------------------------------------------------------------------------------
def _convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help=SOURCE)
    p.add_argument("out", help="output folder (hf, meta) or file (gguf, flm); easylm: a file if OUT has an extension "
                               "or is named streaming_*, else a folder with streaming_params, config and tokenizer")
    p.add_argument("--to", required=True, choices=o.FORMATS, help="output format")
    o.add_dtype(p, runs=False)
    p.add_argument("--quant", help="quantize: q8_0|q4_0|q4_1|q4_k_m|q5_k_m|q6_k (gguf; the K mixes as llama.cpp's "
                                   "quantizer picks them), int8|int4|int4g (flm)")
    o.add_group(p, choices=None, help="quantization group: columns sharing one scale (flm int4g; default 128)")
    p.add_argument("--shards", type=int, help="number of model-parallel shards (meta)")
    p.add_argument("--shard-size", help="largest safetensors shard, e.g. 2GB (hf; default 5GB)")
    o.add_config(p)
    p.add_argument("--tokenizer", help="tokenizer file or folder when SRC lacks one")
    o.add_force(p)
    o.add_quiet(p)


def _common(p: argparse.ArgumentParser) -> None:
    o.add_config(p)
    o.add_force(p)
    o.add_quiet(p)


def _positionals(p: argparse.ArgumentParser, *names: tuple[str, str]) -> None:
    for name, help in names:
        p.add_argument(name, help=help)


def _diff_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    m = sub.add_parser("make", help="diff TARGET against BASE",
                       description="Diff TARGET against BASE. --format camelid (default): the exact XOR diff with "
                                   "sha256 checks, a folder; any other format (easylm ...): EasyLM's target - base, "
                                   "stored in --dtype (default bfloat16, as EasyLM).")
    _positionals(m, ("base", f"base checkpoint ({SOURCE})"), ("target", "the fine-tuned checkpoint"),
                 ("out", "output: a folder (camelid) or a file/folder of --format"))
    m.add_argument("--format", default="camelid", choices=["camelid", *o.FORMATS],
                   help="camelid: exact XOR diff with sha256; easylm: EasyLM/Koala-style float diff")
    o.add_dtype(m, runs=False, help="float type the diff is stored in (default bfloat16, like EasyLM)")
    _common(m)
    r = sub.add_parser("recover", help="recover the target from BASE and DIFF",
                       description="BASE + DIFF -> OUT. A camelid diff gives the target bit for bit, each tensor "
                                   "checked against its sha256; any other diff (Koala's EasyLM file) is added in "
                                   "float32 and stored in --dtype (default: the diff's type).")
    _positionals(r, ("base", f"base checkpoint ({SOURCE})"),
                 ("diff", "a camelid diff folder, or a float diff such as params::koala_diff.easylm"),
                 ("out", "output folder or file"))
    r.add_argument("--format", default="hf", choices=o.FORMATS, help="output format")
    o.add_dtype(r, runs=False, help="float type the output weights are stored in (default: the diff's)")
    r.add_argument("--tokenizer", help="tokenizer file or folder when neither side has one")
    _common(r)


def _delta_paths(p: argparse.ArgumentParser, second: str, help: str) -> None:
    """BASE SECOND OUT in order; the old --base/--SECOND/--out still parse (hidden) for _old_spelling."""
    p.add_argument("base", nargs="?", help=f"base checkpoint ({SOURCE})")
    p.add_argument(second, nargs="?", help=help)
    p.add_argument("out", nargs="?", help="output folder (or file of --format)")
    for name in ("base", second, "out"):
        p.add_argument(f"--{name}", dest=f"old_{name}", help=argparse.SUPPRESS)
    p.add_argument("--format", default="hf", choices=o.FORMATS, help="output format")


def _delta_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    m = sub.add_parser("make", help="delta = target - base (float16)", usage="%(prog)s BASE TARGET OUT [options]",
                       description="FastChat's make_delta: delta = target - base in float16; config and tokenizer "
                                   "from the target.")
    _delta_paths(m, "target", "the fine-tuned checkpoint")
    _common(m)
    a = sub.add_parser("apply", help="target = base + delta (float16)", usage="%(prog)s BASE DELTA OUT [options]",
                       description="FastChat's apply_delta: target = base + delta in float16; config and tokenizer "
                                   "from the delta. A delta with more vocabulary rows than the base (Vicuna v0) "
                                   "extends it with the delta's rows.")
    _delta_paths(a, "delta", "the delta (an HF folder as FastChat publishes them, or any format)")
    a.add_argument("--tokenizer", help="tokenizer file or folder when the delta has none")
    _common(a)


def register(sub: argparse._SubParsersAction) -> None:
    o.register_commands(sub, (("convert", cmd_convert, _convert_arguments), ("diff", cmd_diff, _diff_arguments),
                              ("delta", cmd_delta, _delta_arguments)))
