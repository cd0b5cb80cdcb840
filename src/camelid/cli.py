"""The `camelid` command: thin subcommands over the library functions."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from . import argtypes as t
from .errors import CamelidError, Terminated, is_disk_full

DTYPES = ("float32", "bfloat16", "float16")


def _dtype(name: str):
    import torch
    return getattr(torch, name)


def _check_model_args(args: argparse.Namespace) -> None:
    """What can be checked without loading the model, checked before it loads (a bad option costs no wait)."""
    from .engine import check_loadable
    if args.model is not None and not Path(args.model).expanduser().exists():
        raise CamelidError(f"--model {args.model}: no such file or folder")
    check_loadable(args.model, quant=args.quant, lora=args.lora)
    template = getattr(args, "template", None)
    if template and template.lower() not in ("embedded", "hf"):
        from .chat import get_template
        try:
            get_template(template)
        except CamelidError as e:
            raise CamelidError(f"--template: {e}") from None


def _load(args: argparse.Namespace):
    from .device import default_dtype, resolve_device, set_threads
    from .engine import load_model, quant_notice
    set_threads(getattr(args, "threads", None))
    if getattr(args, "tp", None):
        if getattr(args, "lora", None):
            raise CamelidError("--tp with --lora is not supported; merge the adapter first (`camelid lora merge`)")
        from .tp import load_for_command  # ranks > 0 follow rank 0's model calls and exit inside
        loaded = load_for_command(args.model, args.tp,
                                  dtype=default_dtype(resolve_device(getattr(args, "device", None)), args.dtype),
                                  quant=getattr(args, "quant", None), compile=getattr(args, "compile", False))
    else:
        device = resolve_device(getattr(args, "device", None))
        # A quantized GGUF runs on its own blocks unless float is asked for (--quant none, or a --dtype), or an
        # adapter is applied (LoRA needs float weights).
        quant = getattr(args, "quant", None) or ("none" if args.dtype or args.lora else "auto")
        loaded = load_model(args.model, dtype=default_dtype(device, args.dtype), device=device,
                            quant=quant, group=getattr(args, "group", None), fuse=True,
                            lora=args.lora, progress=True)
    if loaded.tokenizer is None:
        raise CamelidError(f"{loaded.source}: no tokenizer found beside the weights (tokenizer.json or tokenizer.model)")
    notice = quant_notice(loaded, args.quant)
    if notice:
        print(f"camelid: {notice}", file=sys.stderr)
    return loaded


def _sampling(args: argparse.Namespace, seed: int | None = None):
    from .generate import SamplingParams
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=seed)


def cmd_generate(args: argparse.Namespace) -> None:
    """Continue a raw text prompt (no chat template); prints only the completion."""
    from .generate import generate_text
    if args.prompt == "-":  # one final newline dropped, as $(...) does: `echo TEXT | camelid generate -` is TEXT
        args.prompt = sys.stdin.read().removesuffix("\n")
    _check_model_args(args)
    if args.draft and args.lora:
        raise CamelidError("--draft and --lora cannot be combined yet; merge the adapter first (camelid lora merge)")
    loaded = _load(args)
    tok = loaded.tokenizer
    ids = tok.encode(args.prompt, bos=tok.add_bos and tok.bos_id is not None)
    stop_ids = set() if args.ignore_eos else tok.stop_ids
    if args.draft:
        _generate_speculative(args, loaded, ids, stop_ids)
        return
    for chunk in generate_text(loaded.model, tok, ids, _sampling(args, args.seed), stop_ids=stop_ids,
                               stop_strings=args.stop or (), context=args.context, compile=args.compile):
        sys.stdout.write(chunk)
        sys.stdout.flush()
    sys.stdout.write("\n")


def _generate_speculative(args: argparse.Namespace, loaded, ids: list[int], stop_ids: set[int]) -> None:
    from .device import default_dtype
    from .engine import load_model
    from .generate import stream_text
    from .speculative import SpeculativeGeneration
    device = loaded.model.model.embed_tokens.weight.device
    draft = load_model(args.draft, dtype=default_dtype(device, args.draft_dtype or args.dtype), device=device,
                       fuse=True)
    if draft.tokenizer is not None and draft.tokenizer.vocab_size != loaded.tokenizer.vocab_size:
        raise CamelidError(f"--draft {draft.source}: its tokenizer has {draft.tokenizer.vocab_size} tokens, "
                           f"the model's {loaded.tokenizer.vocab_size}; a draft must share the model's tokenizer")
    gen = SpeculativeGeneration(loaded.model, draft.model, ids, _sampling(args, args.seed), stop_ids, args.context,
                                k=args.draft_tokens)
    for chunk in stream_text(gen, loaded.tokenizer, args.stop or ()):
        sys.stdout.write(chunk)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(f"[speculative: {gen.accepted}/{gen.proposed} draft tokens accepted ({100 * gen.acceptance_rate:.1f}%), "
          f"{gen.rounds} target steps]", file=sys.stderr)


def cmd_chat(args: argparse.Namespace) -> None:
    """Chat in the terminal with the model's own chat template (/reset /system /save /load /regen /exit)."""
    if args.url:  # talk to a running `camelid serve` (or any OpenAI-compatible server) instead
        from .serve.client import remote_reply
        from .terminal import ChatSession
        ChatSession(remote_reply(args.url, model=args.model, api_key=args.api_key, temperature=args.temperature,
                                 top_p=args.top_p, max_tokens=args.max_new_tokens, seed=args.seed),
                    system=args.system).run()
        return
    import torch
    from .chat import resolve_template
    from .generate import generate_text
    from .terminal import ChatSession
    _check_model_args(args)
    loaded = _load(args)
    tok = loaded.tokenizer
    model_dir = loaded.source if loaded.source.is_dir() else None
    template, notice = resolve_template(explicit=args.template, model_dir=model_dir, embedded=loaded.chat_template,
                                        model_name=loaded.name, tokenizer=tok)
    if notice:
        print(notice, file=sys.stderr)
    print(f"camelid chat: {loaded.name} ({template.name} template)", file=sys.stderr)
    stop_ids = template.stop_token_ids(tok) | tok.stop_ids
    if args.seed is not None:  # seeded once per session: /regen and later turns continue the same stream
        torch.manual_seed(args.seed)

    def reply(messages: list[dict]):
        ids, _ = template.render_ids(messages, tok, add_generation_prompt=True)
        if args.show_prompt:
            print(f"[prompt: {len(ids)} tokens]\n{tok.decode(ids)}", file=sys.stderr)
        # The model keeps the previous turn's cache: each turn computes only the tokens after the shared prefix.
        return generate_text(loaded.model, tok, ids, _sampling(args), stop_ids=stop_ids,
                             stop_strings=template.stop_strings, context=args.context, reuse_prefix=True,
                             compile=args.compile)

    ChatSession(reply, system=args.system).run()


def cmd_info(args: argparse.Namespace) -> None:
    """Print a model's config, tensor count, stored types, size and chat template."""
    from .engine import open_weights, resolve_model_path
    from .lora import describe_adapter
    path = resolve_model_path(args.model)
    adapter = describe_adapter(path)
    if adapter is not None:
        _print_adapter(adapter, args.json)
        return
    config, reader, tokenizer = open_weights(path)
    infos = reader.tensors()
    types: dict[str, int] = {}
    for info in infos.values():
        types[info.dtype] = types.get(info.dtype, 0) + 1
    size = sum(f.stat().st_size for f in ([path] if path.is_file() else path.iterdir()) if f.is_file())
    report = {
        "path": str(path),
        "config": {k: v for k, v in vars(config).items()},
        "parameters": config.num_params,
        "tensors": len(infos),
        "tensor_types": types,
        "size_bytes": size,
        "tokenizer": None if tokenizer is None else {"vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id,
                                                     "eos_id": tokenizer.eos_id},
        "chat_template": None if tokenizer is None else tokenizer.chat_template,
    }
    reader.close()
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"path:        {report['path']}")
    print(f"size:        {size / 2**20:.1f} MiB, {config.num_params / 1e6:.1f}M parameters")
    print(f"tensors:     {len(infos)} ({', '.join(f'{n} {t}' for t, n in sorted(types.items()))})")
    print("config:")
    for k, v in report["config"].items():
        print(f"  {k}: {v}")
    if report["tokenizer"]:
        print(f"tokenizer:   vocab {tokenizer.vocab_size}, bos {tokenizer.bos_id}, eos {tokenizer.eos_id}")
    print("chat template:", "none" if not report["chat_template"] else "\n" + report["chat_template"])


def _print_adapter(report: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=2))
        return
    print(f"path:        {report['path']}")
    print("kind:        LoRA adapter (PEFT layout), not a whole model")
    print(f"base model:  {report['base_model'] or 'not named (pass --base / --model)'}")
    print(f"size:        {report['size_bytes'] / 2**20:.1f} MiB, {report['tensors']} tensors")
    print(f"lora:        rank {report['r']}, alpha {report['lora_alpha']}, on {', '.join(report['target_modules'])}")
    print(f"run it:      camelid generate --model {report['base_model'] or 'BASE'} --lora {report['path']} ... "
          "(or merge it: camelid lora merge)")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    # No existing_path type: with `chat --url` the name is the server's model id, not a path.
    p.add_argument("--model", help="GGUF file or model folder (default: the built-in SmolLM2-135M-Instruct)")
    p.add_argument("--lora", metavar="ADAPTER", type=t.existing_path,
                   help="apply this LoRA adapter folder (PEFT layout) on load, without merging it")
    p.add_argument("--dtype", choices=DTYPES + ("auto",),
                   help="compute dtype (default float32 on the CPU, bfloat16 on CUDA; "
                        "auto: bfloat16 where the CPU has it)")
    p.add_argument("--context", type=t.positive_int, help="context length (default: the model's)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when a GPU is present)")
    p.add_argument("--threads", type=t.positive_int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (slower start: tens of seconds, once per process)")
    p.add_argument("--quant", choices=("none", "int8", "int4", "native"),
                   help="weight-only quantization on load (default: a quantized GGUF runs on its own Q4_0/Q4_1/Q8_0 "
                        "blocks (native) unless --dtype is given; none: float)")
    p.add_argument("--group", type=int, choices=(32, 64, 128),
                   help="int4 group size (default 32); with int8: per group instead of per output channel")
    add_tp_argument(p)


def add_tp_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=t.positive_int, metavar="N",
                   help="tensor-parallel over N processes: run under `torchrun --nproc-per-node N -m camelid.cli`; "
                        "each process holds 1/N of the weights, rank 0 talks to you")


def _add_sampling_args(p: argparse.ArgumentParser, temperature: float) -> None:
    p.add_argument("--max-new-tokens", type=t.non_negative_int, default=256)
    p.add_argument("--temperature", type=t.non_negative_float, default=temperature, help="0 = greedy")
    p.add_argument("--top-k", type=t.positive_int)
    p.add_argument("--top-p", type=t.probability)
    p.add_argument("--repetition-penalty", type=t.positive_float, default=1.0)
    p.add_argument("--seed", type=int, help="sampling seed (chat: once per session)")


def _command(sub, name: str, func, add_arguments=None) -> argparse.ArgumentParser:
    """A subcommand whose help is its function's docstring, with the options `add_arguments` declares."""
    p = sub.add_parser(name, help=func.__doc__, description=func.__doc__)
    if add_arguments is not None:
        add_arguments(p)
    p.set_defaults(func=func)
    return p


class _Parser(argparse.ArgumentParser):
    """argparse with the project's one-line errors (`camelid: error: ...`, exit code 2) instead of usage + error."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"camelid: error: {message} (see `{self.prog} --help`)\n")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("camelid")
    except PackageNotFoundError:  # run from a source tree that was never installed
        from . import __version__
        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="camelid", description="Toolkit for LLaMA-family chat models.")
    parser.add_argument("--version", action="version", version=f"camelid {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("generate", help=cmd_generate.__doc__, description=cmd_generate.__doc__)
    _add_model_args(p)
    _add_sampling_args(p, temperature=0.0)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    p.add_argument("--draft", metavar="PATH", type=t.existing_path,
                   help="speculative decoding with this draft model (same tokenizer)")
    p.add_argument("--draft-tokens", type=t.positive_int, default=4, help="draft tokens proposed per target step (default 4)")
    p.add_argument("--draft-dtype", choices=DTYPES + ("auto",), help="the draft's dtype (default: --dtype)")
    p.add_argument("prompt", help="the text to continue; - reads it from standard input (less one final newline)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help=cmd_chat.__doc__, description=cmd_chat.__doc__)
    _add_model_args(p)
    _add_sampling_args(p, temperature=0.7)
    p.add_argument("--system", help="system message")
    p.add_argument("--template", help="conversation template name (default: the model's own)")
    p.add_argument("--show-prompt", action="store_true", help="print the rendered prompt of each turn to stderr")
    p.add_argument("--url", help="chat with a running server (e.g. http://127.0.0.1:5009); --model names its model")
    p.add_argument("--api-key", default=os.environ.get("CAMELID_API_KEY"), help="the server's API key (--url)")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("info", help=cmd_info.__doc__, description=cmd_info.__doc__)
    p.add_argument("model", nargs="?", help="GGUF file or model folder (default: the built-in model)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    from .serve.command import add_arguments as _serve_arguments, cmd_serve
    _command(sub, "serve", cmd_serve, _serve_arguments)

    from .convert import add_arguments as _convert_arguments, cmd_convert
    _command(sub, "convert", cmd_convert, _convert_arguments)

    from .commands import templates as _template_commands
    _template_commands.register(sub)

    from .delta import add_delta_arguments, add_diff_arguments, cmd_delta, cmd_diff
    _command(sub, "diff", cmd_diff, add_diff_arguments)
    _command(sub, "delta", cmd_delta, add_delta_arguments)

    from .train import add_arguments as _train_arguments, cmd_train
    _command(sub, "train", cmd_train, _train_arguments)
    from .lora import add_merge_arguments, cmd_lora_merge
    p = sub.add_parser("lora", help="LoRA adapters: `camelid lora merge ADAPTER_DIR OUT`")
    lora_sub = p.add_subparsers(dest="lora_command", required=True, metavar="ACTION")
    _command(lora_sub, "merge", cmd_lora_merge, add_merge_arguments)

    from .commands import data as _data_commands
    _data_commands.register(sub)

    from .quantize_cmd import add_arguments as _quantize_arguments, cmd_quantize
    _command(sub, "quantize", cmd_quantize, _quantize_arguments)
    from .bench import add_arguments as _bench_arguments, cmd_bench
    _command(sub, "bench", cmd_bench, _bench_arguments)

    from .commands import eval as _eval_commands
    _eval_commands.register(sub)

    # --- more subcommands ---
    return parser


def _on_sigterm(signum, frame) -> None:  # noqa: ARG001
    raise Terminated("terminated")


def _install_signal_handlers() -> dict:
    """SIGTERM becomes an exception (cleanup runs, exit 143); a write over `ulimit -f` raises EFBIG instead of
    killing the process with SIGXFSZ (which torch's C++ writer turned into an abort). Returns the previous handlers."""
    import threading
    if threading.current_thread() is not threading.main_thread():
        return {}  # only the main thread may set handlers (main() called from a library's thread)
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _on_sigterm)}
    if hasattr(signal, "SIGXFSZ"):
        previous[signal.SIGXFSZ] = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    return previous


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush of what is left cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


class _NamedStdout:
    """sys.stdout, whose write errors name it: a full disk under `> file` or `> /dev/full` is then reported as
    standard output rather than as an anonymous write."""

    def __init__(self, stream):
        self._stream = stream

    def _named(self, method: str, *args):
        try:
            return getattr(self._stream, method)(*args)
        except OSError as e:
            if e.filename is None:
                e.filename = "standard output"
            raise

    def write(self, text: str) -> int:
        return self._named("write", text)

    def flush(self) -> None:
        self._named("flush")

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def main(argv: list[str] | None = None) -> int:
    previous = _install_signal_handlers()
    stdout = sys.stdout
    sys.stdout = _NamedStdout(stdout)
    try:
        return _run(argv)
    finally:  # as they were, for callers of main() inside a larger program (the tests)
        sys.stdout = stdout
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(argv: list[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
        args.func(args)
        sys.stdout.flush()  # inside the try: a full stdout (> /dev/full) is reported here, not at exit
    except CamelidError as e:
        print(f"camelid: error: {e}", file=sys.stderr)
        return 2
    except Terminated:
        print("camelid: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        _silence_stdout()
        return 0
    except OSError as e:
        if not is_disk_full(e):
            raise
        where = e.filename or "a write"
        print(f"camelid: error: {where}: {os.strerror(e.errno) if e.errno else e} (the disk or the file-size limit "
              "is full); free some space and run again", file=sys.stderr)
        _silence_stdout()
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
