"""What travels with the weights (formats/source.py): the tokenizer and the chat template reach every output,
from every source, and transformers' AutoTokenizer reads the HF folders we write with the source's ids."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from camelid.formats.gguf import tokenizer_of
from camelid.config import ModelConfig
from camelid.convert import convert
from camelid.delta import make_diff, recover
from camelid.formats.flm import FLMReader
from camelid.formats.gguf import GGUFReader
from camelid.tokenizer import Tokenizer
from .builders import write_hf

TEXT = ("Hello, world! 12345 + 67 = 12412. Grüße aus München; ¿qué tal? 你好，世界。Привет, мир! "
        "こんにちは 🦙🚀 <|im_start|>user\n  tabs\tand   spaces")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]
JINJA = ("{% for m in messages %}<<{{ m['role'] }}>>{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
         "{% if add_generation_prompt %}<<assistant>>{% endif %}")


def hf_render(folder: Path) -> str:
    return AutoTokenizer.from_pretrained(folder).apply_chat_template(MESSAGES, tokenize=False,
                                                                     add_generation_prompt=True)


@pytest.fixture(scope="module")
def builtin_hf(tmp_path_factory, smollm2_gguf: Path) -> Path:
    out = tmp_path_factory.mktemp("carry") / "m-hf"
    convert(str(smollm2_gguf), out, "hf", progress=False)
    return out


def test_gguf_to_hf_carries_a_tokenizer_transformers_reads(builtin_hf: Path, smollm2_gguf: Path) -> None:
    source = tokenizer_of(smollm2_gguf)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (builtin_hf / f).is_file(), f
    hf = AutoTokenizer.from_pretrained(builtin_hf)
    assert hf.encode(TEXT) == source.encode(TEXT)
    assert hf.bos_token == "<|im_start|>" and hf.eos_token == "<|im_end|>"
    config = json.loads((builtin_hf / "tokenizer_config.json").read_text())
    assert config["chat_template"] == source.chat_template
    assert json.loads((builtin_hf / "camelid.json").read_text())["chat_template"] == "embedded"
    assert Tokenizer.from_folder(builtin_hf).encode(TEXT) == source.encode(TEXT)


def test_hf_from_gguf_converts_back_to_gguf_with_the_same_vocabulary(builtin_hf: Path, smollm2_gguf: Path,
                                                                     tmp_path: Path) -> None:
    convert(str(builtin_hf), tmp_path / "x.gguf", "gguf", quant="q8_0", progress=False)
    source, back = GGUFReader(smollm2_gguf).metadata, GGUFReader(tmp_path / "x.gguf").metadata
    assert back["tokenizer.ggml.tokens"] == source["tokenizer.ggml.tokens"]
    assert back["tokenizer.ggml.merges"] == source["tokenizer.ggml.merges"]
    assert back["tokenizer.ggml.pre"] == source["tokenizer.ggml.pre"] == "smollm"
    assert back["tokenizer.chat_template"] == source["tokenizer.chat_template"]
    assert tokenizer_of(tmp_path / "x.gguf").encode(TEXT) == tokenizer_of(smollm2_gguf).encode(TEXT)


def test_tokenizer_option_takes_the_vocabulary_out_of_a_gguf(smollm2_gguf: Path, tmp_path: Path) -> None:
    config = ModelConfig.from_name("7b").tiny(vocab_size=49152, bos_token_id=1, eos_token_id=2)
    write_hf(tmp_path / "bare", config)  # weights and config only
    convert(str(tmp_path / "bare"), tmp_path / "out", "hf", tokenizer=str(smollm2_gguf), progress=False)
    assert not list((tmp_path / "out").glob("*.gguf"))
    hf = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert hf.encode(TEXT) == tokenizer_of(smollm2_gguf).encode(TEXT)
    assert hf_render(tmp_path / "out").startswith("<|im_start|>system\nBe brief.<|im_end|>")
    convert(str(tmp_path / "bare"), tmp_path / "b.gguf", "gguf", tokenizer=str(smollm2_gguf), progress=False)
    assert GGUFReader(tmp_path / "b.gguf").metadata["tokenizer.chat_template"].startswith("{% for message")


def test_no_template_is_not_called_embedded(tmp_path: Path, llama2_tokenizer_dir: Path) -> None:
    config = ModelConfig.from_name("llama-2-7b").tiny(vocab_size=32000)
    write_hf(tmp_path / "src", config)
    shutil.copyfile(llama2_tokenizer_dir / "tokenizer.json", tmp_path / "src" / "tokenizer.json")
    convert(str(tmp_path / "src"), tmp_path / "out", "hf", progress=False)
    assert json.loads((tmp_path / "out" / "camelid.json").read_text())["chat_template"] is None
    # the companions are filled in from the tokenizer itself
    assert AutoTokenizer.from_pretrained(tmp_path / "out").encode(TEXT) == \
        AutoTokenizer.from_pretrained(llama2_tokenizer_dir).encode(TEXT)


@pytest.fixture
def jinja_source(tmp_path: Path, llama2_tokenizer_dir: Path) -> Path:
    """A tiny model whose template lives only in chat_template.jinja, as transformers 5 saves it."""
    config = ModelConfig.from_name("llama-2-7b").tiny(vocab_size=32000)
    src = tmp_path / "src"
    write_hf(src, config)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(llama2_tokenizer_dir / f, src / f)
    tc = json.loads((src / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (src / "tokenizer_config.json").write_text(json.dumps(tc))
    (src / "chat_template.jinja").write_text(JINJA)
    return src


def test_chat_template_jinja_travels_to_every_format(jinja_source: Path, tmp_path: Path) -> None:
    expected = hf_render(jinja_source)
    assert expected.startswith("<<system>>Be brief.</s>")
    convert(str(jinja_source), tmp_path / "m.gguf", "gguf", progress=False)
    assert GGUFReader(tmp_path / "m.gguf").metadata["tokenizer.chat_template"] == JINJA
    convert(str(tmp_path / "m.gguf"), tmp_path / "g-hf", "hf", progress=False)
    assert hf_render(tmp_path / "g-hf") == expected
    convert(str(jinja_source), tmp_path / "meta", "meta", progress=False)
    convert(str(tmp_path / "meta"), tmp_path / "e", "easylm", progress=False)
    convert(f"params::{tmp_path / 'e'}", tmp_path / "m.flm", "flm", dtype="float16", progress=False)
    assert FLMReader(tmp_path / "m.flm").metadata["camelid_chat_template"] == JINJA
    convert(str(tmp_path / "m.flm"), tmp_path / "f-hf", "hf", progress=False)
    for out in (tmp_path / "meta", tmp_path / "e", tmp_path / "f-hf"):
        assert json.loads((out / "camelid.json").read_text())["chat_template"] == "embedded", out
    assert hf_render(tmp_path / "f-hf") == expected
    assert Tokenizer.from_folder(tmp_path / "f-hf").chat_template == JINJA


def test_chat_template_jinja_kept_by_in_place_convert_and_diff(jinja_source: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(jinja_source, copy)
    convert(str(copy), copy, "hf", dtype="bfloat16", force=True, progress=False)
    assert (copy / "chat_template.jinja").read_text() == JINJA
    target = tmp_path / "target"
    shutil.copytree(jinja_source, target)
    make_diff(str(copy), str(target), tmp_path / "diff", progress=False)
    assert (tmp_path / "diff" / "chat_template.jinja").read_text() == JINJA
    recover(str(copy), str(tmp_path / "diff"), tmp_path / "rec", progress=False)
    assert hf_render(tmp_path / "rec") == hf_render(jinja_source)


def test_generate_runs_on_the_hf_folder_from_gguf(builtin_hf: Path, camelid_bin: Path) -> None:
    proc = subprocess.run([str(camelid_bin), "generate", "--model", str(builtin_hf), "The capital of France is",
                           "--max-new-tokens", "4"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr
