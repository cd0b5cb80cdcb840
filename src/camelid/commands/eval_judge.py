"""`camelid eval answer` and `camelid eval judge` (MT-bench style, FastChat's file formats)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import argtypes as t
from ..errors import CamelidError
from .eval_common import add_model_arguments, load, read_tokenizer, write_json


def _template(args, loaded, explicit: str | None):
    template, notice = loaded.template(explicit)
    if notice:
        print(notice, file=sys.stderr)
    return template


def _check_out(path: str, flag: str) -> Path:
    out = Path(path)
    if not out.parent.is_dir():
        raise CamelidError(f"{flag} {out}: its folder does not exist")
    return out


def cmd_answer(args: argparse.Namespace) -> None:
    """Answer FastChat-format questions (multi-turn, the model's template, batched; resumes a partial --out)."""
    from tqdm import tqdm

    from ..eval.answer import answer_questions, answered_ids, read_questions
    from ..generate import SamplingParams
    questions = read_questions(args.questions)
    out = _check_out(args.out, "--out")
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    if args.batch < 1:
        raise CamelidError(f"--batch {args.batch}: use at least 1")
    done = answered_ids(out)
    todo = sum(q["question_id"] not in done for q in questions)
    if todo == 0:
        print(f"all {len(questions)} questions are already answered in {out}", file=sys.stderr)
        return
    read_tokenizer(args.model)
    loaded = load(args, args.model)
    template = _template(args, loaded, args.template)
    model_id = args.model_id or loaded.name
    with tqdm(total=todo, unit="question", desc=f"answers ({model_id})", file=sys.stderr) as bar:
        n = answer_questions(loaded, template, questions, out, model_id=model_id, params=params, batch=args.batch,
                             system=args.system, progress=bar.update)
    print(f"{n} answers written to {out} ({len(questions) - todo} were already there)", file=sys.stderr)


def _answer_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--questions", required=True, help="JSONL: question_id, category, turns")
    p.add_argument("--out", required=True, help="answers JSONL (appended; questions already in it are skipped)")
    p.add_argument("--model-id", help="model name written in the answers (default: the model's)")
    p.add_argument("--template", help="conversation template (default: the model's own)")
    p.add_argument("--system", help="system message before the first turn")
    p.add_argument("--max-new-tokens", type=t.non_negative_int, default=1024, help="longest answer in tokens")
    p.add_argument("--temperature", type=t.non_negative_float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, help="sampling seed (default: random)")
    p.add_argument("--batch", type=int, default=8, help="questions answered together (default 8)")


def _answers(path: str) -> dict:
    from ..eval.answer import read_jsonl
    out = {}
    for r in read_jsonl(path, "--answers"):
        try:
            r["choices"][0]["turns"], r["model_id"], r["question_id"]
        except (KeyError, IndexError, TypeError):
            raise CamelidError(f"--answers {path}: records need question_id, model_id and choices[0].turns") from None
        out[r["question_id"]] = r
    return out


def _judge(args: argparse.Namespace):
    from ..eval.judge import HTTPJudge, LocalJudge
    if args.judge_url:
        key = None
        if args.judge_api_key_env:
            key = os.environ.get(args.judge_api_key_env)
            if not key:
                raise CamelidError(f"--judge-api-key-env {args.judge_api_key_env}: that variable is not set")
        return HTTPJudge(args.judge_url, model=args.judge_model, api_key=key, max_new_tokens=args.max_new_tokens)
    read_tokenizer(args.judge)
    loaded = load(args, args.judge)
    return LocalJudge(loaded, _template(args, loaded, args.template), max_new_tokens=args.max_new_tokens,
                      batch=args.batch)


def cmd_judge(args: argparse.Namespace) -> None:
    """Judge answers with a model: single 1-10 grades or pairwise A/B/tie in both orders (resumable)."""
    from tqdm import tqdm

    from ..eval.answer import read_jsonl, read_questions
    from ..eval.judge import done_keys, judgment_key, plan_pairs, plan_single, run_judgments
    from ..eval.judge_report import plot, summarize_pairwise, summarize_single
    if args.judge and args.judge_url:
        raise CamelidError("give --judge MODEL or --judge-url URL, not both")
    want = 2 if args.mode == "pairwise" else 1
    if len(args.answers) != want:
        raise CamelidError(f"--mode {args.mode} takes {want} --answers file{'s' if want > 1 else ''}, got {len(args.answers)}")
    questions = {q["question_id"]: q for q in read_questions(args.questions)}
    answers = [_answers(p) for p in args.answers]
    references = _answers(args.reference) if args.reference else {}
    out = _check_out(args.out, "--out")
    jobs = plan_single(questions, answers[0], references) if want == 1 else \
        plan_pairs(questions, answers[0], answers[1], references)
    if not jobs:
        raise CamelidError("no question has an answer to judge (do the answers' question_ids match --questions?)")
    judge = _judge(args)
    done = done_keys(out)
    with tqdm(total=len(jobs), initial=sum(judgment_key(r) in done for r, _ in jobs), unit="judgment",
              desc="judging", file=sys.stderr) as bar:
        run_judgments(jobs, judge, out, chunk=args.batch * 2, progress=bar.update)
    records = read_jsonl(out, "--out")
    records = [r for r in records if r.get("mode") == args.mode]
    summary = summarize_single(records) if want == 1 else summarize_pairwise(records)
    summary["judge"] = judge.name
    if args.chart:
        plot(summary, Path(args.chart))
    write_json(summary, args.summary)


def _judge_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--answers", nargs="+", required=True, metavar="A.jsonl", help="one file (single) or two (pairwise)")
    p.add_argument("--questions", required=True, help="the questions JSONL the answers answer")
    p.add_argument("--mode", choices=("single", "pairwise"), default="single")
    p.add_argument("--reference", metavar="R.jsonl", help="reference answers (answer format) for the questions that have one")
    p.add_argument("--out", required=True, help="judgments JSONL (appended; judgments already in it are skipped)")
    p.add_argument("--summary", help="write the summary JSON here (default: stdout)")
    p.add_argument("--chart", help="PNG chart of the summary")
    add_model_arguments(p, "--judge")
    p.add_argument("--judge-url", help="an OpenAI-compatible server as the judge (its root or /v1 address)")
    p.add_argument("--judge-model", help="the model name to ask the --judge-url server for")
    p.add_argument("--judge-api-key-env", metavar="VAR", help="environment variable holding the server's API key")
    p.add_argument("--template", help="--judge: conversation template (default: the model's own)")
    p.add_argument("--max-new-tokens", type=t.non_negative_int, default=512, help="longest judgment in tokens")
    p.add_argument("--batch", type=int, default=8, help="judgments generated together (default 8)")


def register(actions, command) -> None:
    command(actions, "answer", cmd_answer, _answer_arguments)
    command(actions, "judge", cmd_judge, _judge_arguments)
