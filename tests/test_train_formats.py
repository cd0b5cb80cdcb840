"""`camelid train --model` opens every format `camelid convert` reads, as chat and generate do: the same tiny model
as a Meta folder, a bare `params::` EasyLM file (with --config), a float32 GGUF and a .flm trains to the losses of
its HF copy (saved by transformers), and each run writes a model folder that transformers load."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from camelid.cli import main as cli_main

from .builders import write_data

FORMATS = ("meta", "easylm", "gguf", "flm")


def train_losses(model_args: list[str], data: Path, out: Path) -> list[float]:
    argv = ["train", "--model", *model_args, "--data", str(data), "--out", str(out), "--template", "koala_v1", "--seq-len", "64",
            "--batch-size", "2", "--max-steps", "2", "--lr", "1e-3", "--quiet", "--threads", "1", "--device", "cpu"]
    assert cli_main(argv) == 0
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


@pytest.fixture(scope="module")
def hf_run(tiny_formats, tmp_path_factory) -> tuple[Path, list[float]]:
    root = tmp_path_factory.mktemp("train-formats")
    data = write_data(root / "data", n_train=8, n_eval=0)
    return data, train_losses(tiny_formats["hf"], data, root / "hf")


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_trains_like_its_hf_copy(fmt: str, tiny_formats, hf_run, tmp_path: Path) -> None:
    data, reference = hf_run
    out = tmp_path / fmt
    assert train_losses(tiny_formats[fmt], data, out) == pytest.approx(reference, abs=1e-5)
    trained = AutoModelForCausalLM.from_pretrained(out)  # the final model: an HF folder, whatever the source
    assert all(torch.isfinite(p).all() for p in trained.parameters())
    text = "Hello there, how are you?"  # and its tokenizer files tokenize as the HF copy's do
    ours, theirs = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(tiny_formats["hf"][0])
    assert ours(text, add_special_tokens=False).input_ids == theirs(text, add_special_tokens=False).input_ids
    assert ours(text).input_ids == theirs(text).input_ids
