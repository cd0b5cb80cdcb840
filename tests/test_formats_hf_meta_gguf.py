"""HF / Meta / GGUF writers and readers: bit-exact round trips, Meta shards vs transformers logits,
GGUF output read by the gguf package and by transformers' GGUF loader."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from camelid.convert import convert
from camelid.formats import open_reader
from camelid.formats.gguf import GGUFReader

from .builders import hf_to_meta_rows, logits, tiny_hf, write_meta_shards

@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_meta_two_shards_to_hf_gives_transformers_logits(tmp_path: Path, kv_heads: int) -> None:
    model = tiny_hf(kv_heads)
    write_meta_shards(model, tmp_path / "meta", shards=2)
    convert(str(tmp_path / "meta"), tmp_path / "hf", "hf", progress=False)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert loaded.config.num_key_value_heads == kv_heads
    assert torch.equal(logits(loaded), logits(model))
    # The Meta reader joins shards into exactly Meta's full tensors.
    reader = open_reader(tmp_path / "meta")
    q = reader.read("layers.1.attention.wq.weight")
    assert torch.equal(q, hf_to_meta_rows(model.state_dict()["model.layers.1.self_attn.q_proj.weight"], 4))


def test_meta_writer_output_is_what_torch_load_reads(tmp_path: Path) -> None:
    model = tiny_hf(2)
    write_meta_shards(model, tmp_path / "ref", shards=2)
    convert(str(tmp_path / "ref"), tmp_path / "hf", "hf", progress=False)
    convert(str(tmp_path / "hf"), tmp_path / "meta", "meta", shards=2, progress=False)
    for r in range(2):
        ours = torch.load(tmp_path / "meta" / f"consolidated.{r:02d}.pth", weights_only=True)
        ref = torch.load(tmp_path / "ref" / f"consolidated.{r:02d}.pth", weights_only=True)
        assert ours.keys() == ref.keys()
        for name in ref:
            assert torch.equal(ours[name], ref[name]), name
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    assert (params["n_kv_heads"], params["vocab_size"]) == (2, 256)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hf_meta_hf_round_trip_is_bit_exact(tmp_path: Path, dtype: str) -> None:
    model = tiny_hf(2).to(getattr(torch, dtype))
    model.save_pretrained(tmp_path / "src")
    convert(str(tmp_path / "src"), tmp_path / "meta", "meta", shards=2 if dtype == "float32" else 1, progress=False)
    convert(str(tmp_path / "meta"), tmp_path / "back", "hf", shard_size=100_000, progress=False)
    a, b = load_file(tmp_path / "src" / "model.safetensors"), {}
    for f in (tmp_path / "back").glob("*.safetensors"):
        b.update(load_file(f))
    assert len(list((tmp_path / "back").glob("*.safetensors"))) > 1  # really sharded, with an index
    assert (tmp_path / "back" / "model.safetensors.index.json").is_file()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    described = json.loads((tmp_path / "back" / "camelid.json").read_text())
    assert described["format"] == "hf" and described["dtype"] == dtype and len(described["sha256"]) == len(a)


@pytest.fixture(scope="module")
def gguf_source(tmp_path_factory, llama2_tokenizer_dir: Path):
    """A tiny GQA model with the LLaMA-2 vocabulary (32000), saved as an HF folder with its tokenizer."""
    folder = tmp_path_factory.mktemp("gguf-src") / "hf"
    model = tiny_hf(2, vocab=32000)
    model.save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(llama2_tokenizer_dir / f, folder / f)
    return model, folder


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_gguf_round_trip_is_bit_exact(gguf_source, tmp_path: Path, dtype: str) -> None:
    model, src = gguf_source
    torch_dtype = getattr(torch, dtype)
    convert(str(src), tmp_path / "m.gguf", "gguf", dtype=dtype, progress=False)
    convert(str(tmp_path / "m.gguf"), tmp_path / "back", "hf", dtype=dtype, progress=False)
    back = load_file(tmp_path / "back" / "model.safetensors")
    for name, t in model.state_dict().items():
        assert torch.equal(back[name], t.to(torch_dtype)), name
    # Stored types follow llama.cpp: matrices in the requested type, norms in F32.
    types = {n: i.dtype for n, i in GGUFReader(tmp_path / "m.gguf").tensors().items()}
    assert types["blk.0.attn_q.weight"] == {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[dtype]
    assert types["blk.0.attn_norm.weight"] == "F32"


def test_gguf_metadata_and_layout_follow_llama_cpp(gguf_source, tmp_path: Path) -> None:
    model, src = gguf_source
    convert(str(src), tmp_path / "m.gguf", "gguf", progress=False)
    reader = gguf.GGUFReader(tmp_path / "m.gguf")  # the gguf package itself, not our wrapper
    md = GGUFReader(tmp_path / "m.gguf").metadata
    assert md["general.architecture"] == "llama" and md["llama.attention.head_count_kv"] == 2
    assert md["llama.block_count"] == 2 and md["llama.feed_forward_length"] == 176
    assert md["tokenizer.ggml.model"] == "llama" and len(md["tokenizer.ggml.tokens"]) == 32000
    vocab = json.loads((src / "tokenizer.json").read_text())["model"]["vocab"]
    assert [md["tokenizer.ggml.tokens"][i] for i in vocab.values()] == list(vocab)
    assert md["tokenizer.ggml.bos_token_id"] == 1 and md["tokenizer.ggml.add_space_prefix"] is True
    assert md["tokenizer.ggml.token_type"][1] == gguf.TokenType.CONTROL
    assert md["tokenizer.ggml.token_type"][3 + 0x41] == gguf.TokenType.BYTE
    tensors = {t.name: t for t in reader.tensors}
    k = np.array(tensors["blk.0.attn_k.weight"].data)
    hf_k = model.state_dict()["model.layers.0.self_attn.k_proj.weight"]
    assert np.array_equal(k, hf_to_meta_rows(hf_k, 2).numpy())  # GGUF rows = Meta's interleaved order


@pytest.mark.parametrize("quant,tol", [(None, 1e-5), ("q8_0", 0.05), ("q4_0", 0.5)])
def test_gguf_loads_in_transformers_with_the_same_logits(gguf_source, tmp_path: Path, quant, tol) -> None:
    model, src = gguf_source
    dtype = "float16" if quant is None else None
    convert(str(src), tmp_path / "m.gguf", "gguf", dtype=dtype, quant=quant, progress=False)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    ref = model.to(torch.float16).float() if quant is None else model  # F16 weights: compare with rounded weights
    want = logits(ref)
    got = logits(theirs)
    assert (got - want).abs().max().item() < tol * max(1.0, want.abs().max().item())
    # and the same as our own reader's dequantization, converted back to HF
    convert(str(tmp_path / "m.gguf"), tmp_path / "back", "hf", progress=False)
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32).eval()  # F16 stays F16
    torch.testing.assert_close(logits(ours), got, atol=1e-4, rtol=1e-4)


TEXTS = ["Hello world", "  two  spaces and\ttabs\n", "café 🦙 中文", "<s> not special here", "x" * 40]


def gpt2_tokenizer_json(folder: Path) -> Path:
    """A real byte-level BPE tokenizer (GPT-2 style, with merges and a special token), trained here."""
    from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers, trainers
    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 20 + ["the quick brown fox jumps over the lazy dog"] * 50, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_gguf_vocabulary_encodes_like_the_source_tokenizer(kind: str, tmp_path: Path, llama2_tokenizer_dir: Path) -> None:
    from tokenizers import Tokenizer as HFTok
    from camelid.tokenizer import Tokenizer
    if kind == "llama":
        tok_file = llama2_tokenizer_dir / "tokenizer.json"
    else:
        tok_file = gpt2_tokenizer_json(tmp_path / "tok")
    vocab = HFTok.from_file(str(tok_file)).get_vocab_size()
    src = tmp_path / "src"
    tiny_hf(2, vocab=vocab + 3).save_pretrained(src)  # 3 padding rows beyond the vocabulary, like Vicuna's
    convert(str(src), tmp_path / "m.gguf", "gguf", tokenizer=str(tok_file), progress=False)
    md = GGUFReader(tmp_path / "m.gguf").metadata
    assert md["tokenizer.ggml.model"] == kind and len(md["tokenizer.ggml.tokens"]) == vocab + 3
    assert md["tokenizer.ggml.tokens"][-1] == f"[PAD{vocab + 2}]"
    if kind == "gpt2":
        assert md["tokenizer.ggml.merges"][0].count(" ") == 1
    # GGUF -> GGUF keeps the vocabulary key by key
    convert(str(tmp_path / "m.gguf"), tmp_path / "copy.gguf", "gguf", quant="q8_0", progress=False)
    copied = GGUFReader(tmp_path / "copy.gguf").metadata
    for key, value in md.items():
        if key.startswith("tokenizer."):
            assert copied[key] == value, key
    reference = HFTok.from_file(str(tok_file))
    ours = Tokenizer.from_gguf_metadata(copied)  # camelid's GGUF vocabulary reader, as for llama.cpp files
    for text in TEXTS:
        assert ours.encode(text) == reference.encode(text, add_special_tokens=False).ids, text
