"""What the `camelid eval` commands share: model options, loading through the one loader, JSON output."""
from __future__ import annotations

import argparse
import json

from ..errors import CamelidError

DTYPES = ("float32", "bfloat16", "float16", "auto")


def add_model_arguments(p: argparse.ArgumentParser, flag: str = "--model") -> None:
    p.add_argument(flag, dest=flag.lstrip("-").replace("-", "_"),
                   help="GGUF file or model folder (default: the built-in SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", choices=DTYPES, help="compute dtype (default float32 on the CPU, bfloat16 on CUDA)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--quant", choices=("none", "int8", "int4", "native"),
                   help="weight-only quantization on load (perplexity: a quantized GGUF runs on its own blocks "
                        "unless --quant none or a --dtype is given)")
    p.add_argument("--group", type=int, choices=(32, 64, 128), help="int4 group size (default 32)")


def read_tokenizer(path: str | None):
    """The model's tokenizer alone (metadata only, no weights): input is checked before the slow load."""
    from ..engine import open_weights, resolve_model_path
    source = resolve_model_path(path)
    _, reader, tok = open_weights(source)
    reader.close()
    if tok is None:
        raise CamelidError(f"{source}: no tokenizer found beside the weights (tokenizer.json or tokenizer.model)")
    return tok


def load(args: argparse.Namespace, path: str | None):
    """The model and its tokenizer, loaded through the one loader (engine.load_model)."""
    from ..device import default_dtype, resolve_device, set_threads
    from ..engine import load_model
    set_threads(args.threads)
    device = resolve_device(args.device)
    loaded = load_model(path, dtype=default_dtype(device, args.dtype), device=device, quant=args.quant,
                        group=args.group, fuse=True)
    if loaded.tokenizer is None:
        raise CamelidError(f"{loaded.source}: no tokenizer found beside the weights (tokenizer.json or tokenizer.model)")
    return loaded


def write_json(data: object, output: str | None) -> None:
    """JSON on stdout, or atomically into --output."""
    text = json.dumps(data, indent=2)
    if output is None:
        print(text)
        return
    from ..formats.atomic import atomic_output
    with atomic_output(output, force=True, is_dir=False) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")
