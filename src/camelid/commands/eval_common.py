"""What the `camelid eval` commands share: model options, loading through the one loader, JSON output."""
from __future__ import annotations

import argparse
import json

from ..errors import CamelidError
from . import options as o


def add_model_arguments(p: argparse.ArgumentParser, flag: str = "--model") -> None:
    p.add_argument(flag, dest=flag.lstrip("-").replace("-", "_"),
                   help="GGUF file or model folder (default: the built-in SmolLM2-135M-Instruct)")
    o.add_run(p, quant_help="weight-only quantization on load (perplexity: a quantized GGUF runs on its own blocks "
                            "unless --quant none or a --dtype is given; others: float unless asked)")


def read_tokenizer(path: str | None):
    """The model's tokenizer alone (metadata only, no weights): input is checked before the slow load."""
    from ..engine import open_weights, resolve_model_path
    source = resolve_model_path(path)
    _, reader, tok = open_weights(path)
    reader.close()
    if tok is None:
        raise CamelidError(f"{source}: no tokenizer found beside the weights (tokenizer.json or tokenizer.model)")
    return tok


def load(args: argparse.Namespace, path: str | None):
    """The model and its tokenizer, loaded through the one loader (engine.load_model)."""
    return o.load(args, path, progress=False)


def write_json(data: object, output: str | None) -> None:
    """JSON on stdout, or atomically into --output."""
    text = json.dumps(data, indent=2)
    if output is None:
        print(text)
        return
    from ..formats.atomic import atomic_output
    with atomic_output(output, force=True, is_dir=False) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")
