"""`camelid eval ...`: perplexity, lm-evaluation-harness, answers, judge, leaderboard."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import CamelidError
from . import options as o
from .eval_common import add_model_arguments, load, read_tokenizer, write_json


def _read_texts(paths: list[str]) -> list[tuple[str, str]]:
    out = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise CamelidError(f"--text {p}: no such file")
        try:
            out.append((p, path.read_text(encoding="utf-8")))
        except UnicodeDecodeError:
            raise CamelidError(f"--text {p}: not UTF-8 text") from None
    return out


def cmd_perplexity(args: argparse.Namespace) -> None:
    """Perplexity of a model on text files (llama.cpp's windows with +/- error, or HF's sliding window)."""
    from tqdm import tqdm

    from ..eval.perplexity import Perplexity, check_settings, count_windows, perplexity
    check_settings(args.method, args.context, args.stride, args.batch)
    texts = _read_texts(args.text)
    tok = read_tokenizer(args.model)  # the text is tokenized and checked before the weights load
    add_bos = bool(tok.add_bos and tok.bos_id is not None)
    encoded = [(name, tok.encode(text, bos=add_bos)) for name, text in texts]
    for name, ids in encoded:
        if count_windows(len(ids), args.method, args.context, args.stride) == 0 or len(ids) < 2:
            raise CamelidError(f"{name}: {len(ids)} tokens, fewer than one window of --context {args.context}; "
                               "give more text or a smaller --context")
    total = sum(count_windows(len(ids), args.method, args.context, args.stride) for _, ids in encoded)
    if args.quant is None and args.dtype is None:
        # As generate does: a quantized GGUF is scored on its own blocks (int8 activations, as llama-perplexity
        # computes), float only when asked (--quant none or a --dtype).
        args.quant = "auto"
    loaded = load(args, args.model)
    overall = Perplexity(args.method, args.context, args.stride)
    files = {}
    with tqdm(total=total, unit="window", desc="perplexity", disable=args.quiet, file=sys.stderr) as bar:
        for name, ids in encoded:
            one = perplexity(loaded.model, ids, method=args.method, context=args.context, stride=args.stride,
                             batch=args.batch, bos_id=tok.bos_id if add_bos else None, progress=bar.update)
            files[name] = one.to_dict()
            for key in ("tokens", "scored", "nll", "nll2", "seconds", "windows", "scanned"):
                setattr(overall, key, getattr(overall, key) + getattr(one, key))
            bar.set_postfix(ppl=f"{one.ppl:.4f}")
    result = overall.to_dict()
    result.pop("per_window")
    result.update(model=str(loaded.source), dtype=str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
                  quant=args.quant, files=files if len(files) > 1 else None)
    print(f"Final estimate: PPL = {result['ppl']:.4f} +/- {result['ppl_stderr']:.5f} "
          f"({result['scored']} tokens scored, {result['tokens_per_second']:.0f} tokens/s)", file=sys.stderr)
    write_json(result, args.output)


def _perplexity_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--text", nargs="+", required=True, metavar="FILE", help="UTF-8 text file(s)")
    p.add_argument("--context", type=int, default=512, help="window length in tokens (default 512)")
    p.add_argument("--method", default="llama.cpp", choices=("llama.cpp", "sliding"),
                   help="llama.cpp: non-overlapping windows scored on their second half (default); "
                        "sliding: Hugging Face's strided window")
    p.add_argument("--stride", type=int, help="sliding: tokens the window advances by")
    p.add_argument("--batch", type=int, default=1, help="windows per forward pass (default 1)")
    p.add_argument("--output", help="write the JSON result here (default: stdout)")
    o.add_quiet(p)


def cmd_lm_eval(args: argparse.Namespace) -> None:
    """Run lm-evaluation-harness tasks on camelid's engine (shared contexts, batched scoring)."""
    import os
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local task files only: nothing is downloaded
    if args.include_path and not Path(args.include_path).is_dir():
        raise CamelidError(f"--include-path {args.include_path}: no such folder")
    if args.limit is not None and args.limit <= 0:
        raise CamelidError(f"--limit {args.limit}: use a positive number")
    if args.batch < 1:
        raise CamelidError(f"--batch {args.batch}: use at least 1")
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise CamelidError("lm-evaluation-harness is not installed: pip install 'lm-eval[api]==0.4.13'") from None
    tasks = [t for t in args.tasks.split(",") if t]
    manager = TaskManager(include_path=args.include_path)
    unknown = [t for t in tasks if t not in manager.all_subtasks and t not in manager.all_groups
               and t not in manager.all_tags]
    if unknown:
        raise CamelidError(f"--tasks: unknown task {unknown[0]!r} (see `lm-eval ls tasks`, or --include-path DIR "
                           "for your own task YAMLs)")
    read_tokenizer(args.model)
    from ..eval.lm_eval_backend import CamelidLM
    loaded = load(args, args.model)
    template = None
    if args.apply_chat_template:
        template, notice = loaded.template(args.template)
        if notice:
            print(notice, file=sys.stderr)
    lm = CamelidLM(loaded, batch_size=args.batch, max_length=args.context, template=template)
    result = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=args.limit,
                                     num_fewshot=args.num_fewshot, apply_chat_template=args.apply_chat_template,
                                     log_samples=args.log_samples, random_seed=0, numpy_random_seed=0,
                                     torch_random_seed=0, fewshot_random_seed=0)
    from lm_eval.utils import make_table
    print(make_table(result), file=sys.stderr)
    keep = {k: result[k] for k in ("results", "groups", "n-samples", "versions", "higher_is_better", "samples")
            if k in result}
    keep["model"] = {"path": str(loaded.source), "dtype": str(next(loaded.model.parameters()).dtype),
                     "chat_template": template.name if template else None}
    text = json.loads(json.dumps(keep, default=str))
    write_json(text, args.output)


def _lm_eval_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task, group or tag names")
    p.add_argument("--include-path", metavar="DIR", help="folder of extra task YAMLs (your own tasks)")
    p.add_argument("--limit", type=int, help="documents per task (a quick check)")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each task's)")
    p.add_argument("--apply-chat-template", action="store_true", help="prompts through the model's chat template")
    p.add_argument("--template", help="with --apply-chat-template: this camelid template instead of the model's")
    p.add_argument("--context", type=int, help="longest input in tokens (default: the model's)")
    p.add_argument("--batch", type=int, default=32, help="continuations scored per forward pass (default 32)")
    p.add_argument("--log-samples", action="store_true", help="keep every request and response in the JSON")
    p.add_argument("--output", help="write the JSON results here (default: stdout)")


def cmd_leaderboard(args: argparse.Namespace) -> None:
    """Arena leaderboard from a votes database: Bradley-Terry ratings (Elo scale) with bootstrap 95-percent intervals."""
    import sqlite3

    from ..eval.ratings import leaderboard, plot
    from ..serve.votes import read_battles
    if not Path(args.votes).is_file():
        raise CamelidError(f"{args.votes}: no such votes database (`camelid serve --votes PATH` writes one)")
    try:
        battles = read_battles(args.votes)
    except sqlite3.Error as e:
        raise CamelidError(f"{args.votes}: not a camelid votes database ({e})") from None
    rows = leaderboard(battles, rounds=args.rounds)
    if args.chart and rows:
        plot(rows, Path(args.chart))
    for r in rows:
        print(f"{r['model']:<32} {r['rating']:7.1f}  [{r['ci_low']:.1f}, {r['ci_high']:.1f}]  {r['votes']} votes",
              file=sys.stderr)
    write_json({"votes": len(battles), "leaderboard": rows}, args.output)


def _leaderboard_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("votes", metavar="VOTES.db", help="the votes database of `camelid serve --votes`")
    p.add_argument("--chart", help="PNG chart of the ratings and their intervals")
    p.add_argument("--rounds", type=int, default=200, help="bootstrap resamplings (default 200)")
    p.add_argument("--output", help="write the JSON here (default: stdout)")


def _command(sub, name: str, func, add_arguments) -> None:
    p = sub.add_parser(name, help=func.__doc__, description=func.__doc__)
    add_arguments(p)
    p.set_defaults(func=func)


def register(sub) -> None:
    """`camelid eval ACTION`."""
    p = sub.add_parser("eval", help="Evaluate models: perplexity, lm-eval tasks, answers and a judge, leaderboard",
                       description="Evaluate models on camelid's own engine.")
    actions = p.add_subparsers(dest="eval_command", required=True, metavar="ACTION")
    _command(actions, "perplexity", cmd_perplexity, _perplexity_arguments)
    _command(actions, "lm-eval", cmd_lm_eval, _lm_eval_arguments)
    _command(actions, "leaderboard", cmd_leaderboard, _leaderboard_arguments)
    from . import eval_judge
    eval_judge.register(actions, _command)
