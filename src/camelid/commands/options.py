"""The option vocabulary every command shares: one name, one meaning, one help text (README's table).

Declaring an option here, rather than in each command, is what keeps `--dtype` or `--quiet` meaning the same
thing everywhere. Also the one place that turns the model options into a loaded model (generate, chat, serve
and eval all load through `load`). Only argparse at import time: `camelid X --help` must not import torch.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import argtypes as t
from ..errors import CamelidError

FLOAT_DTYPES = ("float32", "bfloat16", "float16")
# The formats `camelid convert --to` writes: formats.WRITERS' keys, spelled out so that --help imports no
# format code (tests/test_cli_help.py checks the two agree).
FORMATS = ("easylm", "flm", "gguf", "hf", "meta")
GROUPS = (32, 64, 128)


class HelpFormatter(argparse.HelpFormatter):
    """Help that shows each option's default, unless the help text already says it or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        unset = default is None or isinstance(default, bool) or default in (argparse.SUPPRESS, "", [])
        if unset or "default" in text or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def register_commands(sub: argparse._SubParsersAction, table) -> None:
    """Subcommands from (name, function, add-arguments) rows; each one's help is its function's docstring."""
    for name, func, arguments in table:
        p = sub.add_parser(name, help=func.__doc__, description=func.__doc__)
        arguments(p)
        p.set_defaults(func=func)


def add_model(p: argparse.ArgumentParser, *, repeat: bool = False) -> None:
    """--model: which weights (any format `camelid convert` reads)."""
    if repeat:  # serve: several models, each optionally named
        p.add_argument("--model", action="append", metavar="[NAME=]PATH",
                       help="HF or Meta folder, .gguf or .flm file, or params::FILE (EasyLM), repeatable; NAME is "
                            "the id clients ask for, "
                            "NAME= alone the built-in model (default: the built-in SmolLM2-135M-Instruct)")
    else:  # no existing_path type: with `chat --url` the name is the server's model id, not a path
        p.add_argument("--model", help="HF or Meta folder, .gguf or .flm file, or params::FILE (EasyLM) "
                                        "(default: the built-in SmolLM2-135M-Instruct)")


def add_dtype(p: argparse.ArgumentParser, *, runs: bool = True, choices: tuple[str, ...] = FLOAT_DTYPES,
              default: str | None = None, help: str | None = None) -> None:
    """--dtype: the float type of the model's weights: what they are computed in (commands that run a model,
    plus `auto`) or stored in (commands that write one)."""
    if runs:
        text = help or ("float type the weights are computed in (default: float32 on the CPU, bfloat16 on CUDA; "
                        "auto: bfloat16 where the CPU has it)")
        p.add_argument("--dtype", choices=choices + ("auto",), default=default, help=text)
    else:
        p.add_argument("--dtype", choices=choices, default=default,
                       help=help or "float type the output weights are stored in (default: the source's)")


def add_group(p: argparse.ArgumentParser, *, choices: tuple[int, ...] | None = GROUPS, help: str | None = None) -> None:
    """--group: quantization group size, the weights (columns of a row) that share one scale."""
    p.add_argument("--group", type=t.positive_int, choices=choices, metavar="N" if choices is None else None,
                   help=help or "quantization group: columns sharing one scale (int4: default 32; int8: per group "
                                "instead of per output channel)")


QUIET_HELP = "no progress bars or progress lines on stderr (results, warnings and errors still show)"


def add_quiet(p: argparse.ArgumentParser) -> None:
    """--quiet: no progress bars or progress lines (start, per-round) on stderr; results unchanged."""
    p.add_argument("--quiet", action="store_true", help=QUIET_HELP)


def add_force(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="replace an existing output")


def add_config(p: argparse.ArgumentParser) -> None:
    """--config: the MODEL config, for weights that carry none (a bare EasyLM file)."""
    p.add_argument("--config", help="model config when the weights carry none (a bare EasyLM file): a preset "
                                    "(7b, 13b, llama-2-7b ...) or a config.json / params.json path")


def add_run(p: argparse.ArgumentParser, *, quant_help: str | None = None) -> None:
    """What every command that runs a model shares: --dtype --device --threads --quant --group."""
    add_dtype(p)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto: cuda when a GPU is present")
    p.add_argument("--threads", type=t.positive_int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--quant", choices=("none", "int8", "int4", "native"),
                   help=quant_help or "weight-only quantization on load (default: a quantized GGUF runs on its own "
                                      "Q4_0/Q4_1/Q8_0 blocks (native) unless --dtype is given; none: float)")
    add_group(p)


def add_inference(p: argparse.ArgumentParser, *, repeat: bool = False, tp_help: str | None = None,
                  quant_help: str | None = None) -> None:
    """The model options of generate, chat and serve."""
    add_model(p, repeat=repeat)
    add_config(p)
    p.add_argument("--tokenizer", help="tokenizer.json / tokenizer.model, a folder, or a .gguf / .flm whose vocabulary "
                                       "to use when the weights carry none (default: the weights' own)")
    p.add_argument("--lora", metavar="ADAPTER", type=t.existing_path,
                   help="apply this LoRA adapter folder (PEFT layout) on load, without merging it"
                        + (" (one --model only)" if repeat else ""))
    add_run(p, quant_help=quant_help)
    p.add_argument("--tp", type=t.positive_int, metavar="N",
                   help=tp_help or "tensor-parallel over N processes: run under `torchrun --nproc-per-node N -m "
                                   "camelid.cli`; each process holds 1/N of the weights, rank 0 talks to you")


def add_sampling(p: argparse.ArgumentParser, *, temperature: float) -> None:
    p.add_argument("--max-new-tokens", type=t.non_negative_int, default=256, help="longest reply in tokens")
    p.add_argument("--temperature", type=t.non_negative_float, default=temperature, help="0 = greedy")
    p.add_argument("--top-k", type=t.positive_int, help="sample from the K likeliest tokens (default: all)")
    p.add_argument("--top-p", type=t.probability, help="nucleus sampling: the smallest set holding P (default 1)")
    p.add_argument("--repetition-penalty", type=t.positive_float, default=1.0, help="1 = none")
    p.add_argument("--seed", type=int, help="sampling seed (chat: once per session; default: random)")


def sampling(args: argparse.Namespace, seed: int | None = None):
    """The SamplingParams the sampling options describe."""
    from ..generate import SamplingParams
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=seed)


# ---- from options to a loaded model --------------------------------------------------------------------------
def check_template(name: str | None) -> None:
    """--template names a known template (or the model's own: embedded / hf)."""
    from ..chat import check_template_name
    check_template_name(name)


def check_model(path: str | None, args: argparse.Namespace) -> None:
    """What can be checked without loading the model, checked before it loads (a bad option costs no wait)."""
    from ..engine import check_loadable
    # An EasyLM spec (params::PATH) names its file after the prefix.
    if path is not None and not Path(path.split("::", 1)[-1]).expanduser().exists():
        raise CamelidError(f"--model {path}: no such file or folder")
    check_loadable(path, quant=getattr(args, "quant", None), lora=getattr(args, "lora", None),
                   config=getattr(args, "config", None), tokenizer=getattr(args, "tokenizer", None))


def load(args: argparse.Namespace, path: str | None, *, quant: str | None = None, label: str = "camelid",
         progress: bool | None = None):
    """The model the options name, through the one loader (engine.load_model, or tp's for --tp N); one line on
    stderr when --quant native found nothing to keep. `quant`: what to ask the loader for (default: --quant);
    `progress`: a loading bar (default: unless --quiet)."""
    from ..device import default_dtype, resolve_device, set_threads
    from ..engine import load_model, quant_notice
    set_threads(getattr(args, "threads", None))
    device = resolve_device(getattr(args, "device", None))
    dtype = default_dtype(device, args.dtype)
    quant = quant or getattr(args, "quant", None)
    if getattr(args, "tp", None):
        if getattr(args, "lora", None):
            raise CamelidError("--tp with --lora is not supported; merge the adapter first (`camelid lora merge`)")
        from ..tp import load_for_command  # ranks > 0 follow rank 0's model calls and exit inside
        loaded = load_for_command(path, args.tp, dtype=dtype, quant=getattr(args, "quant", None),
                                  compile=getattr(args, "compile", False))
    else:
        loaded = load_model(path, dtype=dtype, device=device, quant=quant, group=getattr(args, "group", None),
                            fuse=True, lora=getattr(args, "lora", None),
                            progress=not getattr(args, "quiet", False) if progress is None else progress,
                            config=getattr(args, "config", None), tokenizer=getattr(args, "tokenizer", None))
    if loaded.tokenizer is None:
        raise CamelidError(f"{loaded.source}: no tokenizer found beside the weights (tokenizer.json or tokenizer.model)")
    notice = quant_notice(loaded, getattr(args, "quant", None))
    if notice:
        print(f"{label}: {notice}", file=sys.stderr)
    return loaded


def auto_quant(args: argparse.Namespace) -> str:
    """generate/chat/eval: a quantized GGUF runs on its own blocks unless float is asked for (--quant none, or a
    --dtype), or an adapter is applied (LoRA needs float weights)."""
    return getattr(args, "quant", None) or ("none" if args.dtype or getattr(args, "lora", None) else "auto")
