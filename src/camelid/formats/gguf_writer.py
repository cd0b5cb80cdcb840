"""Writing GGUF files for llama.cpp through the `gguf` package: llama metadata, the vocabulary, tensors.

Tensors are streamed: the header and tensor table are written from the plan, then each tensor's data
as it arrives. 1-D tensors (norms) stay F32 as llama.cpp's converter keeps them; matrices get the
requested float type or Q8_0/Q4_0/Q4_1 (`gguf.quants.quantize`). q/k rows arrive already permuted to
GGUF's interleaved layout (`names.to_interleaved`, applied by the registry's `from_canonical`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from ..errors import CamelidError
from . import kquants
from ..gguf_vocab import gguf_pre
from .atomic import atomic_output

Q = gguf.GGMLQuantizationType
QUANTS = {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1}
FLOATS = {torch.float32: Q.F32, torch.float16: Q.F16, torch.bfloat16: Q.BF16}
FILE_TYPES = {Q.F32: gguf.LlamaFileType.ALL_F32, Q.F16: gguf.LlamaFileType.MOSTLY_F16,
              Q.BF16: gguf.LlamaFileType.MOSTLY_BF16, Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
              Q.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0, Q.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1}
T = gguf.TokenType


# ---- the vocabulary ---------------------------------------------------------------------------------
def _token_id(value: Any, ids: dict[str, int]) -> int | None:
    text = value.get("content") if isinstance(value, dict) else value
    return ids.get(text) if isinstance(text, str) else None


def vocab_from_sentencepiece(path: Path) -> dict[str, Any]:
    """tokenizer.model -> llama vocabulary: pieces, scores and types exactly as the model stores them."""
    from sentencepiece import sentencepiece_model_pb2 as pb2
    proto = pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as e:  # protobuf's DecodeError
        raise CamelidError(f"{path}: not a SentencePiece model ({e})") from None
    tokens = [p.piece for p in proto.pieces]
    # SentencePiece's piece types use GGUF's numbering (1 normal ... 6 byte).
    return {"model": "llama", "tokens": tokens, "scores": [p.score for p in proto.pieces],
            "types": [int(p.type) for p in proto.pieces], "add_space_prefix": proto.normalizer_spec.add_dummy_prefix,
            "unk": proto.trainer_spec.unk_id if proto.trainer_spec.unk_id >= 0 else None,
            "bos": proto.trainer_spec.bos_id if proto.trainer_spec.bos_id >= 0 else None,
            "eos": proto.trainer_spec.eos_id if proto.trainer_spec.eos_id >= 0 else None, "add_bos": True}


def vocab_from_tokenizer_json(path: Path) -> dict[str, Any]:
    """tokenizer.json (BPE) -> a llama vocabulary (SentencePiece-style, byte fallback) or gpt2 (byte-level)."""
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise CamelidError(f"{path}: a {model.get('type')} tokenizer cannot be written to GGUF (only BPE ones)")
    vocab: dict[str, int] = model["vocab"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    size = max([*vocab.values(), *(a["id"] for a in spec.get("added_tokens", []))]) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    for text, i in vocab.items():
        tokens[i] = text
    types = [int(T.NORMAL) if t in vocab else int(T.UNUSED) for t in tokens]
    out: dict[str, Any] = {"tokens": tokens, "types": types}
    if model.get("byte_fallback"):
        # A SentencePiece BPE model converted by transformers: its merge ranks follow the original scores
        # (the best-scored pair merges first), so a token scores minus the rank of the merge that makes it.
        rank: dict[str, int] = {}
        for r, m in enumerate(merges):
            rank.setdefault(m.replace(" ", "", 1), r)
        out["model"] = "llama"
        out["scores"] = [-float(rank.get(t, len(merges) + i)) for i, t in enumerate(tokens)]
        for i, t in enumerate(tokens):
            if len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
                types[i] = int(T.BYTE)
        if model.get("unk_token") in vocab:
            out["unk"] = vocab[model["unk_token"]]
            types[out["unk"]] = int(T.UNKNOWN)
        normalizer = json.dumps(spec.get("normalizer") or {}) + json.dumps(spec.get("pre_tokenizer") or {})
        out["add_space_prefix"] = '"prepend": "\\u2581"' in normalizer or '"prepend_scheme": "first"' in normalizer \
            or '"prepend_scheme": "always"' in normalizer
    else:
        out["model"] = "gpt2"
        out["merges"] = merges
        out["pre"] = gguf_pre(spec.get("pre_tokenizer"))
    for added in spec.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = int(T.CONTROL if added.get("special") else T.USER_DEFINED)
    post = json.dumps(spec.get("post_processor") or {})
    out["add_bos"] = '"SpecialToken"' in post and "single" in post
    return out


def tokenizer_vocab(files: dict[str, Path], metadata: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """The vocabulary to embed, from GGUF metadata (GGUF -> GGUF), tokenizer.model, or tokenizer.json."""
    if metadata.get("tokenizer.ggml.tokens"):
        return {"metadata": metadata}
    if "tokenizer.model" in files:
        v = vocab_from_sentencepiece(files["tokenizer.model"])
    elif "tokenizer.json" in files:
        v = vocab_from_tokenizer_json(files["tokenizer.json"])
    else:
        raise CamelidError("GGUF output needs the tokenizer (llama.cpp cannot run without it): the source has none, "
                           "pass --tokenizer PATH (a tokenizer.json / tokenizer.model or its folder)")
    # A model may have more embedding rows than tokens (Vicuna's 32001, padded vocabularies): name them.
    if len(v["tokens"]) > vocab_size:
        raise CamelidError(f"the tokenizer has {len(v['tokens'])} tokens but the model only {vocab_size} embedding rows")
    extra = vocab_size - len(v["tokens"])
    v["tokens"] += [f"[PAD{len(v['tokens']) + i}]" for i in range(extra)]
    v["types"] += [int(T.USER_DEFINED)] * extra
    if "scores" in v:
        v["scores"] += [0.0] * extra
    ids = {t: i for i, t in enumerate(v["tokens"])}
    if "tokenizer_config.json" in files:
        tc = json.loads(files["tokenizer_config.json"].read_text(encoding="utf-8"))
        for key in ("bos", "eos", "unk", "pad"):
            found = _token_id(tc.get(f"{key}_token"), ids)
            if found is not None:
                v[key] = found
        if "add_bos_token" in tc:
            v["add_bos"] = bool(tc["add_bos_token"])
        if "add_eos_token" in tc:
            v["add_eos"] = bool(tc["add_eos_token"])
    return v


def _write_vocab(w: gguf.GGUFWriter, v: dict[str, Any], config: Any, chat_template: str | None) -> None:
    if "metadata" in v:  # copied from a GGUF source, key by key, with GGUF's own value types
        for key, value in v["metadata"].items():
            if key == "tokenizer.ggml.scores":
                w.add_token_scores(value)
            elif key == "tokenizer.ggml.token_type":
                w.add_token_types(value)
            elif key.endswith("_token_id"):
                w.add_uint32(key, int(value))
            elif key == "tokenizer.chat_template":
                continue  # written below, once
            elif isinstance(value, bool):
                w.add_bool(key, value)
            elif isinstance(value, str):
                w.add_string(key, value)
            elif isinstance(value, list):
                w.add_array(key, value)
            elif isinstance(value, int):
                w.add_uint32(key, value)
        chat_template = chat_template or v["metadata"].get("tokenizer.chat_template")
    else:
        w.add_tokenizer_model(v["model"])
        w.add_tokenizer_pre(v.get("pre", "default"))
        w.add_token_list(v["tokens"])
        if "scores" in v:
            w.add_token_scores(v["scores"])
        w.add_token_types(v["types"])
        if v.get("merges"):
            w.add_token_merges(v["merges"])
        bos = v.get("bos", config.bos_token_id)
        eos = v.get("eos", config.eos_ids[0] if config.eos_ids else None)
        for value, add in ((bos, w.add_bos_token_id), (eos, w.add_eos_token_id), (v.get("unk"), w.add_unk_token_id),
                           (v.get("pad"), w.add_pad_token_id)):
            if value is not None:
                add(int(value))
        w.add_add_bos_token(bool(v.get("add_bos", False)))
        w.add_add_eos_token(bool(v.get("add_eos", False)))
        if "add_space_prefix" in v:
            w.add_add_space_prefix(bool(v["add_space_prefix"]))
    if chat_template:
        w.add_chat_template(chat_template)


# ---- the writer -------------------------------------------------------------------------------------
def _stored_type(shape: tuple[int, ...], dtype: torch.dtype, quant: str | None, name: str = "",
                 config: Any = None, has_output: bool = True) -> "gguf.GGMLQuantizationType":
    if len(shape) < 2:
        return Q.F32  # norms: llama.cpp keeps 1-D tensors in F32
    if quant in kquants.MIXES:
        return kquants.mix_type(quant, name, shape[-1], config.num_layers, has_output)
    if quant:
        qtype = QUANTS[quant]
        if shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0:
            return qtype
        return Q.F16  # rows that do not split into 32-blocks: llama.cpp falls back the same way
    return FLOATS[dtype]


def _nbytes(shape: tuple[int, ...], qtype: "gguf.GGMLQuantizationType") -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * size


class GGUFWriter:
    """One .gguf file: llama hyper-parameters, tokenizer, chat template, then the tensors in plan order."""

    def __init__(self, out: Path, config: Any, *, plan: list, dtype: torch.dtype = torch.float32, quant: str | None = None,
                 force: bool = False, tokenizer_files: dict[str, Path] | None = None,
                 tokenizer_metadata: dict[str, Any] | None = None, chat_template: str | None = None, **_options: Any):
        if quant is not None and quant not in QUANTS and quant not in kquants.MIXES:
            raise CamelidError(f"GGUF quantization {quant!r} is not supported "
                               f"(use {', '.join([*QUANTS, *kquants.MIXES])})")
        if config.rope_scaling and config.rope_scaling["type"] != "linear":
            raise CamelidError(f"rope scaling {config.rope_scaling['type']!r} cannot be written to GGUF by camelid yet")
        vocab = tokenizer_vocab(tokenizer_files or {}, tokenizer_metadata or {}, config.vocab_size)
        has_output = any(p.name == "output.weight" for p in plan)
        self._types = {p.name: _stored_type(tuple(p.shape), dtype, quant, p.name, config, has_output) for p in plan}
        self._order = [p.name for p in plan]
        self._ctx = atomic_output(out, force=force, is_dir=False)
        self.tmp = self._ctx.__enter__()
        try:
            w = self._w = gguf.GGUFWriter(str(self.tmp), "llama")
            w.add_name(config.name or Path(out).stem)
            w.add_context_length(config.max_position_embeddings)
            w.add_embedding_length(config.hidden_size)
            w.add_block_count(config.num_layers)
            w.add_feed_forward_length(config.intermediate_size)
            w.add_head_count(config.num_heads)
            w.add_head_count_kv(config.num_kv_heads)
            w.add_rope_dimension_count(config.head_dim)
            if config.head_dim != config.hidden_size // config.num_heads:
                w.add_key_length(config.head_dim)
                w.add_value_length(config.head_dim)
            w.add_rope_freq_base(config.rope_theta)
            w.add_layer_norm_rms_eps(config.norm_eps)
            w.add_vocab_size(config.vocab_size)
            if config.rope_scaling:
                w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
                w.add_rope_scaling_factor(config.rope_scaling["factor"])
            w.add_file_type(kquants.FILE_TYPES[quant] if quant in kquants.MIXES else
                            FILE_TYPES[QUANTS[quant] if quant else FLOATS[dtype]])
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
            _write_vocab(w, vocab, config, chat_template)
            for p in plan:
                qtype = self._types[p.name]
                w.add_tensor_info(p.name, tuple(p.shape), np.dtype(np.float32), _nbytes(tuple(p.shape), qtype), raw_dtype=qtype)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if not self._order or self._order[0] != name:
            raise CamelidError(f"GGUF tensors must arrive in plan order: got {name!r}, expected "
                               f"{self._order[0] if self._order else 'nothing more'!r}")
        self._order.pop(0)
        qtype = self._types[name]
        if qtype == Q.BF16:
            data = tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
        elif qtype == Q.F16:
            data = tensor.to(torch.float16).contiguous().numpy()
        elif qtype == Q.F32:
            data = tensor.to(torch.float32).contiguous().numpy()
        else:
            data = kquants.quantize(tensor.to(torch.float32).contiguous().numpy(), qtype)
        self._w.write_tensor_data(data)

    def finish(self) -> None:
        if self._order:
            raise CamelidError(f"{len(self._order)} planned tensors were never written, e.g. {self._order[0]!r}")
        self._w.close()
        self._ctx.__exit__(None, None, None)

    def abort(self) -> None:
        w = getattr(self, "_w", None)
        if w is not None:
            for f in w.fout or []:
                f.close()
        exc = CamelidError("aborted")
        self._ctx.__exit__(type(exc), exc, None)
