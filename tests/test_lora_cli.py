"""LoRA adapters from the command line: an adapter trained by `camelid train` names its base so peft's
AutoPeftModelForCausalLM loads it; `info` and `generate` say what an adapter folder is; `--lora` runs base + adapter
unmerged with the logits of the merged model and of peft; a full disk during `lora merge` or a checkpoint is one line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from camelid.engine import load_model
from .helpers import one_line_error
from .builders import llama2_sized_folder, write_data
from .helpers import LIMIT, run_camelid as camelid

TOKENS = torch.tensor([[1, 450, 6635, 3290, 373, 278, 1775, 29889]])


def error_once_loaded(proc, *words: str) -> str:
    """A failure met once the work began: progress lines (`loading ...`, train's summary), then the one error line."""
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and lines and all(line.startswith(("loading ", "camelid train: "))
                                                            for line in lines[:-1]), proc.stderr
    return one_line_error(type(proc)(proc.args, proc.returncode, proc.stdout, lines[-1]), *words)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, llama2_tokenizer_dir, camelid_bin) -> tuple[Path, Path]:
    """(base HF folder, LoRA adapter folder), the adapter trained through the CLI with a relative --model path."""
    root = tmp_path_factory.mktemp("lora-cli")
    llama2_sized_folder(root / "base", llama2_tokenizer_dir)
    write_data(root / "data")
    proc = camelid(camelid_bin, "train", "--model", "base", "--data", "data", "--out", "run", "--lora-rank", "4",
                   "--lora-alpha", "8", "--lora-targets", "q_proj,v_proj,down_proj", "--max-steps", "3", "--lr", "2e-2",
                   "--seq-len", "64", "--batch-size", "4", "--template", "koala_v1", "--quiet", cwd=root)
    assert proc.returncode == 0, proc.stderr
    return root / "base", root / "run"


def test_adapter_names_its_base_so_peft_loads_it(trained, tmp_path, camelid_bin, monkeypatch) -> None:
    from peft import AutoPeftModelForCausalLM
    base, adapter = trained
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base.resolve())  # not "base", relative to the training's cwd
    monkeypatch.chdir(tmp_path)  # elsewhere, as a user of the adapter would be
    with torch.no_grad():
        theirs = AutoPeftModelForCausalLM.from_pretrained(adapter).eval()(TOKENS).logits
        ours = load_model(base, lora=adapter).model(TOKENS)
        plain = load_model(base).model(TOKENS)
    assert (ours - theirs).abs().max().item() < 1e-5
    assert (ours - plain).abs().max().item() > 1e-4  # the adapter changes the model
    assert camelid(camelid_bin, "lora", "merge", adapter, tmp_path / "merged").returncode == 0
    with torch.no_grad():
        merged = load_model(tmp_path / "merged").model(TOKENS)
        fused = load_model(base, lora=adapter, fuse=True).model(TOKENS)  # as generate/chat/serve load it
    assert (merged - ours).abs().max().item() < 1e-5
    assert (fused - ours).abs().max().item() < 1e-5


def test_generate_with_lora_matches_the_merged_model(trained, tmp_path, camelid_bin) -> None:
    base, adapter = trained
    merged = tmp_path / "merged"
    proc = camelid(camelid_bin, "lora", "merge", adapter, merged)
    assert proc.returncode == 0, proc.stderr
    assert "loading base" in proc.stderr  # the start line while the base loads
    common = ["generate", "--max-new-tokens", "10", "--ignore-eos", "The cat sat"]
    with_lora = camelid(camelid_bin, *common, "--model", base, "--lora", adapter)
    from_merged = camelid(camelid_bin, *common, "--model", merged)
    assert with_lora.returncode == from_merged.returncode == 0, with_lora.stderr + from_merged.stderr
    assert with_lora.stdout == from_merged.stdout
    # serve --lora: the same greedy continuation over the OpenAI API
    import openai
    from camelid.serve.launch import start_server
    server = start_server(["--model", str(base), "--lora", str(adapter), "--context", "64", "--max-batch", "1"],
                          tmp_path / "serve.log")
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=60)
        served = client.completions.create(model="base", prompt="The cat sat", max_tokens=10, temperature=0)
    finally:
        server.stop()
    assert served.choices[0].text + "\n" == with_lora.stdout
    one_line_error(camelid(camelid_bin, *common, "--model", base, "--lora", adapter, "--quant", "int8"), "--lora")
    one_line_error(camelid(camelid_bin, *common, "--model", base, "--lora", base), "not a LoRA adapter")


def test_info_and_generate_say_an_adapter_is_one(trained, camelid_bin) -> None:
    base, adapter = trained
    text = camelid(camelid_bin, "info", adapter)
    assert text.returncode == 0, text.stderr
    assert "LoRA adapter" in text.stdout and str(base.resolve()) in text.stdout
    info = json.loads(camelid(camelid_bin, "info", adapter, "--json").stdout)
    assert info["kind"] == "lora-adapter" and info["r"] == 4
    assert info["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    for command in (["generate", "--model", adapter, "hi"], ["chat", "--model", adapter]):
        one_line_error(camelid(camelid_bin, *command, stdin=""), "LoRA adapter", str(base.resolve()), "--lora")


def test_disk_full_in_lora_merge_and_train_checkpoints(trained, tmp_path, camelid_bin) -> None:
    base, adapter = trained
    proc = camelid(camelid_bin, "lora", "merge", adapter, tmp_path / "merged", fsize=LIMIT)
    error_once_loaded(proc, "merged", "disk is full")
    assert list(tmp_path.iterdir()) == []
    proc = camelid(camelid_bin, "train", "--model", base, "--data", adapter.parent / "data", "--out",
                   tmp_path / "full", "--max-steps", "1", "--seq-len", "64", "--template", "koala_v1", "--quiet",
                   fsize=LIMIT)
    error_once_loaded(proc, "disk is full")
    assert not any(p.name.startswith(".") for p in (tmp_path / "full").rglob("*"))  # no temporary checkpoint left


@pytest.mark.slow
def test_adapter_of_a_gguf_base_in_peft_through_transformers_gguf_loader(smollm2_gguf, tmp_path, camelid_bin) -> None:
    # peft's AutoPeftModelForCausalLM cannot take a .gguf base; PeftModel over transformers' own GGUF loader can,
    # and gives camelid's --lora logits.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    write_data(tmp_path / "data", n_train=8, n_eval=2)
    proc = camelid(camelid_bin, "train", "--model", smollm2_gguf, "--data", tmp_path / "data", "--out", tmp_path / "run",
                   "--lora-rank", "4", "--lora-alpha", "8", "--max-steps", "2", "--lr", "1e-2", "--seq-len", "64",
                   "--batch-size", "2", "--quiet")
    assert proc.returncode == 0, proc.stderr
    adapter = tmp_path / "run"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(smollm2_gguf.resolve())
    tokens = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name,
                                                    dtype=torch.float32)
        theirs = PeftModel.from_pretrained(base, adapter).eval()(tokens).logits
        ours = load_model(smollm2_gguf, lora=adapter).model(tokens)
        plain = load_model(smollm2_gguf).model(tokens)
    assert (ours - theirs).abs().max().item() < 1e-4
    assert (ours - plain).abs().max().item() > 1e-2
