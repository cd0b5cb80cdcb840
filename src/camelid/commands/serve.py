"""`camelid serve`: load the models, build the app, run uvicorn.

Only argparse at import time, so `camelid --help` never imports FastAPI or torch.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from . import argtypes as t
from ..errors import CamelidError
from . import options as o

DEFAULT_CONTEXT = 2048  # a static KV cache of max_batch x context: 8 x 2048 is ~0.6 GB for SmolLM2-135M


def add_arguments(p: argparse.ArgumentParser) -> None:
    o.add_inference(p, repeat=True,
                    quant_help="weight-only quantization on load (default: a quantized GGUF runs on its own "
                               "Q4_0/Q4_1/Q8_0 blocks (native), as generate does, unless --dtype or --lora is given; "
                               "none: float)",
                    tp_help="tensor-parallel over N processes (one model): run under `torchrun --nproc-per-node N "
                            "-m camelid.cli serve`; rank 0 serves HTTP, each process holds 1/N of the weights")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 127.0.0.1 is this machine only")
    p.add_argument("--port", type=t.port, default=5009, help="TCP port to listen on")
    p.add_argument("--api-key", default=os.environ.get("CAMELID_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $CAMELID_API_KEY, else no key)")
    p.add_argument("--max-batch", type=t.positive_int, default=8, help="requests decoded together")
    p.add_argument("--max-queue", type=t.non_negative_int, default=64, help="waiting requests before answering 503")
    p.add_argument("--context", type=t.positive_int,
                   help=f"tokens per request, prompt + reply (default: the model's, at most {DEFAULT_CONTEXT})")
    p.add_argument("--template", help="conversation template name (default: each model's own)")
    p.add_argument("--max-body", type=t.positive_int, default=1 << 20, help="request body limit in bytes (1 MiB)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="let web pages from ORIGIN (e.g. http://localhost:3000, or *) call the API; repeatable "
                        "(default: none, CORS off)")
    p.add_argument("--votes", metavar="PATH",
                   help="arena votes database, with two or more models (default: ~/.local/share/camelid/votes.db)")
    p.add_argument("--no-prefix-cache", action="store_true", help="always prefill whole prompts")
    p.add_argument("--default-temperature", type=t.non_negative_float, default=1.0,
                   help="LMServer /generate and /chat temperature")
    p.add_argument("--lm-max-tokens", type=t.positive_int, default=256, help="new tokens of LMServer /generate and /chat")
    for name in ("prepend-text", "user-prefix", "user-suffix", "lm-prefix", "lm-suffix"):
        p.add_argument(f"--chat-{name}", help="LMServer /chat affix (default: taken from the model's template)")


def _model_specs(values: list[str] | None) -> list[tuple[str | None, str | None]]:
    if not values:
        return [(None, None)]
    specs = []
    for v in values:
        name, sep, path = v.partition("=")
        # "NAME=" alone names the built-in model.
        specs.append((name, path or None) if sep and name and not Path(v).exists() else (None, v))
    return specs


def _model_id(name: str | None, loaded) -> str:
    if name:
        return name
    from ..engine import BUILTIN_FILE
    if loaded.source.name == BUILTIN_FILE:
        return "SmolLM2-135M-Instruct"
    return loaded.source.stem if loaded.source.is_file() else loaded.source.name


def lmserver_affixes(template, tokenizer):
    """EasyLM chat affixes read off the template by rendering marker conversations (empty if that fails)."""
    from ..serve.runtime import LMServerChat
    u1, a1, u2 = "\x01U1\x01", "\x01A1\x01", "\x01U2\x01"

    def render(msgs, gen):
        return template.render_text([{"role": r, "content": c} for r, c in msgs], add_generation_prompt=gen)

    try:
        one = render([("user", u1)], True)
        two = render([("user", u1), ("assistant", a1), ("user", u2)], True)
        closed = render([("user", u1)], False)
        before, after = one.split(u1)
        user_suffix = closed.split(u1)[1]
        between = two.split(a1)[1].split(u2)[0]
        lm_suffix = render([("user", u1), ("assistant", a1)], False).split(a1)[1]
        if not (after.startswith(user_suffix) and between.startswith(lm_suffix)):
            return LMServerChat()
        user_prefix = between[len(lm_suffix):]
        if not before.endswith(user_prefix):
            return LMServerChat()
        return LMServerChat(before[:len(before) - len(user_prefix)], user_prefix, user_suffix,
                            after[len(user_suffix):], lm_suffix)
    except Exception:  # a template that rejects these conversations: EasyLM's empty affixes
        return LMServerChat()


def build_models(args: argparse.Namespace) -> list:
    from ..scheduler import Scheduler
    from ..serve.runtime import LMServerChat, ServedModel
    served, seen = [], set()
    specs = _model_specs(args.model)
    if getattr(args, "tp", None) and len(specs) != 1:
        raise CamelidError(f"--tp serves one model; {len(specs)} --model options were given")
    for name, path in specs:
        loaded = o.load(args, path, quant=o.auto_quant(args), label=name or "camelid serve")
        model_id = _model_id(name, loaded)
        if model_id in seen:
            raise CamelidError(f"two models are named {model_id!r}: name them with --model NAME=PATH")
        seen.add(model_id)
        try:
            template, notice = loaded.template(args.template)
        except CamelidError as e:
            if args.template:
                raise
            # Completions and LMServer scoring need no template: serve the model, refuse only chat requests.
            template, notice = None, f"{e}; /v1/chat/completions is off for it (give --template)"
        if notice:
            print(f"{model_id}: {notice}", file=sys.stderr)
        limit = loaded.config.max_position_embeddings
        context = min(args.context or min(DEFAULT_CONTEXT, limit), limit)
        if context < 16:
            raise CamelidError(f"--context {args.context} is too small (at least 16)")
        if args.max_batch < 1 or args.max_queue < 0:
            raise CamelidError("--max-batch must be >= 1 and --max-queue >= 0")
        scheduler = Scheduler(loaded, max_batch=args.max_batch, context=context, max_queue=args.max_queue,
                              prefix_cache=not args.no_prefix_cache)
        affixes = lmserver_affixes(template, loaded.tokenizer) if template else LMServerChat()
        given = {f: getattr(args, f"chat_{f}") for f in ("prepend_text", "user_prefix", "user_suffix", "lm_prefix",
                                                         "lm_suffix")}
        if any(v is not None for v in given.values()):
            affixes = LMServerChat(**{k: v or "" for k, v in given.items()})  # all from the flags, as in EasyLM
        stop_ids = (template.stop_token_ids(loaded.tokenizer) if template else set()) | loaded.tokenizer.stop_ids
        served.append(ServedModel(model_id, loaded, template, scheduler, context, stop_ids, affixes))
        print(f"camelid serve: {model_id} ({template.name if template else 'no'} template, context {context}, batch {args.max_batch}) "
              f"loaded in {loaded.load_seconds:.1f}s", file=sys.stderr)
    return served


def check_port(host: str, port: int) -> None:
    """Bind the address once, as uvicorn will, so a taken port or a bad host is one line before any model loads."""
    import socket
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise CamelidError(f"--host {host}: not an address this machine can listen on ({e})") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn sets it
        try:
            s.bind(address)
        except OSError as e:
            raise CamelidError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror}); another server may "
                               "be using it: pick another --port") from None


def check_arguments(args: argparse.Namespace) -> None:
    """Everything about the options that can be known before a model loads."""
    specs = _model_specs(args.model)
    if args.lora and len(specs) > 1:
        raise CamelidError("--lora applies to one model: serve one --model with it")
    for _, path in specs:
        o.check_model(path, args)
    o.check_template(args.template)
    check_port(args.host, args.port)


def cmd_serve(args: argparse.Namespace) -> None:
    """Serve models over HTTP: a chat page at /, the OpenAI API under /v1, EasyLM's LMServer API."""
    try:
        import uvicorn

        from ..serve.app import ServeSettings, create_app
    except ImportError as e:
        raise CamelidError(f"serving needs FastAPI and uvicorn ({e}); run `pip install fastapi uvicorn`") from None
    check_arguments(args)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"camelid serve: warning: listening on {args.host} without --api-key; anyone who can reach it can use it",
              file=sys.stderr)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    models = build_models(args)
    settings = ServeSettings(api_key=args.api_key or None, max_body_bytes=args.max_body,
                             default_temperature=args.default_temperature, lm_max_tokens=args.lm_max_tokens,
                             cors_origins=tuple(args.cors_origin), votes_path=args.votes)
    app = create_app(models, settings)
    print(f"camelid serve: http://{args.host}:{args.port}/ (chat page), /v1 (OpenAI API), /generate /chat ... (LMServer)",
          file=sys.stderr)
    # uvicorn.Server, not uvicorn.run: run() swallows the KeyboardInterrupt that SIGTERM becomes once uvicorn has
    # shut down and re-raised it, so `camelid serve` would exit 0 instead of 143.
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                           access_log=False, timeout_graceful_shutdown=3))
    server.run()
    if not server.started:
        raise CamelidError(f"could not listen on {args.host}:{args.port} (see the log above)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help=cmd_serve.__doc__, description=cmd_serve.__doc__)
    add_arguments(p)
    p.set_defaults(func=cmd_serve)
