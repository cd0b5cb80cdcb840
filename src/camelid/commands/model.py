"""`camelid generate`, `camelid chat` and `camelid info`: run a model in the terminal, or describe one."""
from __future__ import annotations

import argparse
import json
import os
import sys

from . import argtypes as t
from ..errors import CamelidError
from . import options as o


def cmd_generate(args: argparse.Namespace) -> None:
    """Continue a raw text prompt (no chat template); prints only the completion."""
    if args.prompt == "-":  # one final newline dropped, as $(...) does: `echo TEXT | camelid generate -` is TEXT
        args.prompt = sys.stdin.read().removesuffix("\n")
    o.check_model(args.model, args)
    if args.draft and args.lora:
        raise CamelidError("--draft and --lora cannot be combined yet; merge the adapter first (camelid lora merge)")
    from ..generate import generate_text
    loaded = o.load(args, args.model, quant=o.auto_quant(args))
    tok = loaded.tokenizer
    ids = tok.encode_prompt(args.prompt)
    stop_ids = set() if args.ignore_eos else tok.stop_ids
    if args.draft:
        _generate_speculative(args, loaded, ids, stop_ids)
        return
    for chunk in generate_text(loaded.model, tok, ids, o.sampling(args, args.seed), stop_ids=stop_ids,
                               stop_strings=args.stop or (), context=args.context, compile=args.compile):
        sys.stdout.write(chunk)
        sys.stdout.flush()
    sys.stdout.write("\n")


def _generate_speculative(args: argparse.Namespace, loaded, ids: list[int], stop_ids: set[int]) -> None:
    from ..device import default_dtype
    from ..engine import load_model
    from ..generate import stream_text
    from ..speculative import SpeculativeGeneration
    device = loaded.model.model.embed_tokens.weight.device
    draft = load_model(args.draft, dtype=default_dtype(device, args.draft_dtype or args.dtype), device=device,
                       fuse=True)
    if draft.tokenizer is not None and draft.tokenizer.vocab_size != loaded.tokenizer.vocab_size:
        raise CamelidError(f"--draft {draft.source}: its tokenizer has {draft.tokenizer.vocab_size} tokens, "
                           f"the model's {loaded.tokenizer.vocab_size}; a draft must share the model's tokenizer")
    gen = SpeculativeGeneration(loaded.model, draft.model, ids, o.sampling(args, args.seed), stop_ids, args.context,
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
        from ..serve.client import remote_reply
        from ..terminal import ChatSession
        ChatSession(remote_reply(args.url, model=args.model, api_key=args.api_key, temperature=args.temperature,
                                 top_p=args.top_p, max_tokens=args.max_new_tokens, seed=args.seed),
                    system=args.system).run()
        return
    o.check_model(args.model, args)
    o.check_template(args.template)
    import torch

    from ..generate import generate_text
    from ..terminal import ChatSession
    loaded = o.load(args, args.model, quant=o.auto_quant(args))
    tok = loaded.tokenizer
    template, notice = loaded.template(args.template)
    if notice:
        print(notice, file=sys.stderr)
    print(f"camelid chat: {loaded.name} ({template.name} template)", file=sys.stderr)
    stop_ids = template.stop_token_ids(tok) | tok.stop_ids
    if args.seed is not None:  # seeded once per session: /regen and later turns continue the same stream
        torch.manual_seed(args.seed)

    def reply(messages: list[dict]):
        ids = template.prompt_ids(messages, tok, add_generation_prompt=True)
        if args.show_prompt:
            print(f"[prompt: {len(ids)} tokens]\n{tok.decode(ids)}", file=sys.stderr)
        # The model keeps the previous turn's cache: each turn computes only the tokens after the shared prefix.
        return generate_text(loaded.model, tok, ids, o.sampling(args), stop_ids=stop_ids,
                             stop_strings=template.stop_strings, context=args.context, reuse_prefix=True,
                             compile=args.compile)

    ChatSession(reply, system=args.system).run()


def cmd_info(args: argparse.Namespace) -> None:
    """Print a model's config, tensor count, stored types, size and chat template."""
    from ..engine import open_weights, resolve_model_path
    from ..lora import describe_adapter
    path = resolve_model_path(args.model)
    adapter = describe_adapter(path)
    if adapter is not None:
        _print_adapter(adapter, args.json)
        return
    config, reader, tokenizer = open_weights(args.model)
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
    _print_model(report)


def _print_model(report: dict) -> None:
    types, tok = report["tensor_types"], report["tokenizer"]
    print(f"path:        {report['path']}")
    print(f"size:        {report['size_bytes'] / 2**20:.1f} MiB, {report['parameters'] / 1e6:.1f}M parameters")
    print(f"tensors:     {report['tensors']} ({', '.join(f'{n} {t}' for t, n in sorted(types.items()))})")
    print("config:")
    for k, v in report["config"].items():
        print(f"  {k}: {v}")
    if tok:
        print(f"tokenizer:   vocab {tok['vocab_size']}, bos {tok['bos_id']}, eos {tok['eos_id']}")
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


def _add_terminal_options(p: argparse.ArgumentParser) -> None:
    """What generate and chat share besides the model and sampling options."""
    o.add_inference(p)
    p.add_argument("--context", type=t.positive_int, help="context length (default: the model's)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (slower start: tens of seconds, once per process)")


def _generate_arguments(p: argparse.ArgumentParser) -> None:
    _add_terminal_options(p)
    o.add_sampling(p, temperature=0.0)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    p.add_argument("--draft", metavar="PATH", type=t.existing_path,
                   help="speculative decoding with this draft model (same tokenizer)")
    p.add_argument("--draft-tokens", type=t.positive_int, default=4, help="draft tokens proposed per target step")
    p.add_argument("--draft-dtype", choices=o.FLOAT_DTYPES + ("auto",), help="the draft's dtype (default: --dtype)")
    p.add_argument("prompt", help="the text to continue; - reads it from standard input (less one final newline)")


def _chat_arguments(p: argparse.ArgumentParser) -> None:
    _add_terminal_options(p)
    o.add_sampling(p, temperature=0.7)
    p.add_argument("--system", help="system message")
    p.add_argument("--template", help="conversation template name (default: the model's own)")
    p.add_argument("--show-prompt", action="store_true", help="print the rendered prompt of each turn to stderr")
    p.add_argument("--url", help="chat with a running server (e.g. http://127.0.0.1:5009); --model names its model")
    p.add_argument("--api-key", default=os.environ.get("CAMELID_API_KEY"),
                   help="the server's API key with --url (default: $CAMELID_API_KEY)")


def _info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="GGUF file or model folder (default: the built-in model)")
    p.add_argument("--json", action="store_true", help="the report as JSON")


def register(sub: argparse._SubParsersAction) -> None:
    o.register_commands(sub, (("generate", cmd_generate, _generate_arguments), ("chat", cmd_chat, _chat_arguments),
                              ("info", cmd_info, _info_arguments)))
