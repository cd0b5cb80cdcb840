"""camelid.json has one reader and writer (formats/manifest.py) and one error policy: every command that reads it,
given a truncated, non-JSON or wrong-kind file, answers one `camelid: error:` line naming the file, exit 2, and
writes nothing. Quantized folders are decoded by the schemes it records: missing or disagreeing ones are refused."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from transformers import LlamaForCausalLM

from camelid.cli import main
from camelid.convert import quantize_checkpoint
from camelid.engine import load_model
from camelid.errors import CamelidError
from camelid.formats import manifest

from .builders import transformers_folder, write_data
from .helpers import one_line_error

BAD = {
    "truncated": '{"format": "hf", "chat_template": "chat',
    "not-json": "\x00\x01 not JSON at all",
    "wrong-kind": '["format", "hf"]',  # JSON, but not an object
    "wrong-field": '{"format": "hf", "chat_template": 7}',  # an object whose field has the wrong type
}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A 2-layer random LLaMA as an HF folder (no tokenizer: every command here must stop before needing one)."""
    folder = transformers_folder(tmp_path_factory.mktemp("manifest") / "model", vocab_size=64)
    write_data(folder.parent / "data", n_train=4, n_eval=0)
    return folder


@pytest.fixture(scope="module")
def adapter(model: Path) -> Path:
    """A real PEFT LoRA adapter of the model (written by peft)."""
    from peft import LoraConfig, get_peft_model
    folder = model.parent / "adapter"
    peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(model), LoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.save_pretrained(folder)
    return folder


def damaged(src: Path, dst: Path, text: str) -> Path:
    shutil.copytree(src, dst)
    (dst / "camelid.json").write_text(text, encoding="utf-8")
    return dst


def run(argv: list[str], capsys) -> str:
    """The command's exit code must be 2 and stderr one `camelid: error:` line; returns that line."""
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("camelid: error: "), lines
    return lines[0]


COMMANDS = {
    "generate": lambda bad, good, out: ["generate", "--model", bad, "--max-new-tokens", "2", "Hi"],
    "info": lambda bad, good, out: ["info", bad],
    "train": lambda bad, good, out: ["train", "--model", bad, "--data", good.parent / "data", "--out", out,
                                     "--max-steps", "1"],
    "convert": lambda bad, good, out: ["convert", bad, out, "--to", "gguf", "--quiet"],
    "quantize": lambda bad, good, out: ["quantize", bad, out, "--quant", "int8", "--quiet"],
    "diff make": lambda bad, good, out: ["diff", "make", good, bad, out, "--quiet"],
    "diff recover": lambda bad, good, out: ["diff", "recover", good, bad, out, "--quiet"],
    "delta apply": lambda bad, good, out: ["delta", "apply", good, bad, out, "--quiet"],
}


@pytest.mark.parametrize("kind", sorted(BAD))
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_damaged_camelid_json_is_one_line(model: Path, tmp_path: Path, capsys, command: str, kind: str) -> None:
    bad = damaged(model, tmp_path / "bad", BAD[kind])
    out = tmp_path / "out"
    line = run(COMMANDS[command](bad, model, out), capsys)
    assert "camelid.json" in line
    assert not out.exists()


@pytest.mark.parametrize("kind", sorted(BAD))
def test_damaged_adapter_camelid_json_is_refused_before_loading(model: Path, adapter: Path, tmp_path: Path,
                                                                capsys, kind: str) -> None:
    bad = damaged(adapter, tmp_path / "adapter", BAD[kind])
    line = run(["lora", "merge", bad, tmp_path / "merged", "--base", model, "--quiet"], capsys)
    assert "camelid.json" in line and not (tmp_path / "merged").exists()


@pytest.mark.parametrize("kind", sorted(BAD))
def test_damaged_easylm_folder_camelid_json(model: Path, tmp_path: Path, capsys, kind: str) -> None:
    assert main(["convert", str(model), str(tmp_path / "e"), "--to", "easylm", "--quiet"]) == 0
    (tmp_path / "e" / "camelid.json").write_text(BAD[kind], encoding="utf-8")
    line = run(["convert", f"params::{tmp_path / 'e'}", tmp_path / "back", "--to", "hf", "--quiet"], capsys)
    assert "camelid.json" in line and not (tmp_path / "back").exists()


def test_command_line_prints_no_traceback(model: Path, tmp_path: Path, cli) -> None:
    bad = damaged(model, tmp_path / "bad", BAD["truncated"])
    proc = cli("generate", "--model", bad, "Hi")
    one_line_error(proc, str(bad / "camelid.json"), "not valid JSON")


@pytest.mark.parametrize("command", [["chat"], ["serve", "--port", str(random.randint(20000, 60000))]])
def test_chat_and_serve_refuse_before_starting(model: Path, tmp_path: Path, cli, command: list[str]) -> None:
    bad = damaged(model, tmp_path / "bad", BAD["wrong-kind"])
    proc = cli(*command, "--model", bad, stdin="", timeout=120)
    one_line_error(proc, str(bad / "camelid.json"), "not a JSON object")


def test_written_and_read_back(tmp_path: Path) -> None:
    info = {"format": "hf", "chat_template": {"pre_prompt": "", "user_role": "U:", "bot_role": "A:",
                                              "history_sep": "\n"}, "layers": {"lm_head": "int8"}}
    manifest.write(tmp_path, info)
    assert manifest.read(tmp_path) == info and json.loads((tmp_path / "camelid.json").read_text()) == info
    assert manifest.read(tmp_path / "nowhere") is None and manifest.field(tmp_path, "kind") is None
    manifest.write(tmp_path, {"kind": "fastchat-delta"})
    assert manifest.diff_kind(tmp_path) == "fastchat-delta"


# ---- quantized folders: decoded by the recorded schemes ---------------------------------------------------------
@pytest.fixture(scope="module")
def int4_folder(model: Path) -> Path:
    out = model.parent / "q4"
    quantize_checkpoint(model, out, "int4", group=32, embedding="int4", progress=False)
    return out


def edited(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    info = json.loads((dst / "camelid.json").read_text())
    edit(info)
    (dst / "camelid.json").write_text(json.dumps(info))
    return dst


def test_recorded_schemes_are_what_loads(int4_folder: Path) -> None:
    info = json.loads((int4_folder / "camelid.json").read_text())
    loaded = load_model(int4_folder)
    assert loaded.quant == {layer: scheme for layer, scheme in info["layers"].items()}
    assert info["embedding"] == "int4 g32" and info["layers"]["lm_head"] == "int8"


@pytest.mark.parametrize("case,edit,words", [
    ("missing", lambda i: i["layers"].pop("model.layers.0.mlp.up_proj"), ["up_proj.scales", "records no scheme"]),
    ("no-record", lambda i: i.pop("layers"), ["scales", "records no scheme"]),
    ("disagrees", lambda i: i["layers"].update({"model.layers.1.self_attn.q_proj": "int8 g32"}),
     ["q_proj", "int8 g32", "shape"]),
    ("embedding", lambda i: i.update({"embedding": "int8"}), ["embed_tokens", "int8", "shape"]),
    ("unknown", lambda i: i["layers"].update({"lm_head": "int3 g7"}), ["lm_head", "unknown scheme"]),
])
def test_missing_or_disagreeing_schemes_are_refused(int4_folder: Path, tmp_path: Path, capsys, case: str, edit,
                                                   words: list[str]) -> None:
    folder = edited(int4_folder, tmp_path / case, edit)
    with pytest.raises(CamelidError) as e:
        load_model(folder)
    for w in words:
        assert w in str(e.value), str(e.value)
    line = run(["convert", folder, tmp_path / "out", "--to", "hf", "--quiet"], capsys)
    assert all(w in line for w in words) and not (tmp_path / "out").exists()
