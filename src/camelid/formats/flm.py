"""fastllm's `.flm` files (version 2), read and written; quantized int8 / int4 / int4-group weights.

Layout (little-endian int32/float32; a string is an int32 byte length + UTF-8), as fastllm's
`WeightMap::LoadFromFile` reads it:
  version (2) | n_kv, then n_kv (key, value) strings, sorted by key |
  vocabulary: count, then per token int32 L, L int32 (one per UTF-8 byte), int32 id, float32 score
  (when tokenizer_use_score == "1") | special tokens (count + strings) when tokenizer_has_special_tokens == "1" |
  weights: count, then per tensor name, ndim, dims, dtype code, payload.
Codes: 0 fp32, 7 fp16, 3 int8 (axis, per-row (min, max), u8), 8 int4 without zero point (axis, per-row
(min, max), two codes a byte), 9 int4-group (axis, groups, group size, (min, max) per row x group, packed);
1 bf16 and 4 int4-with-zero-point are read, not written. Names are Hugging Face's, q/k rows rotate-half:
the layout is the identity. Only linear weights are quantized or stored in 16 bits; embeddings and norms
stay fp32, as fastllm's own converter writes them. Quantization rules: flm_quant.py; vocabulary, tokenizer
settings and prompt keys: flm_vocab.py.
Booleans are written `True`/`False` (fastllm parses them with `std::boolalpha`; "1" would read as false).
"""
from __future__ import annotations

import ast
import json
import math
import mmap
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from ..errors import CamelidError
from . import flm_quant as fq
from .atomic import atomic_output
from .base import TensorInfo

F32, BF16, INT8, INT4Z, F16, INT4, INT4G = 0, 1, 3, 4, 7, 8, 9
CODE_NAMES = {F32: "F32", BF16: "BF16", F16: "F16", INT8: "int8", INT4Z: "int4z", INT4: "int4", INT4G: "int4g"}
QUANT_CODES = {"int8": INT8, "int4": INT4, "int4g": INT4G}
FLOAT_CODES = {torch.float32: F32, torch.float16: F16}
DEFAULT_GROUP = 128
_LINEAR = ("_proj.weight", "lm_head.weight")
PROMPT_KEYS = ("pre_prompt", "user_role", "bot_role", "history_sep")
CHAT_TEMPLATE_KEY = "camelid_chat_template"  # the model's own jinja template, kept for the way back


def _is_linear(name: str) -> bool:
    return name.endswith(_LINEAR)


# ---- low-level I/O ----------------------------------------------------------------------------------
def _put_int(f: BinaryIO, *values: int) -> None:
    f.write(struct.pack(f"<{len(values)}i", *values))


def _put_str(f: BinaryIO, s: str) -> None:
    raw = s.encode("utf-8")
    _put_int(f, len(raw))
    f.write(raw)


class _In:
    """Sequential reads from a memory-mapped file (pages are read as touched, never the weights), with clear
    errors on a cut-short file."""

    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, "rb")
        self.size = os.fstat(self.f.fileno()).st_size
        self.buf = mmap.mmap(self.f.fileno(), 0, access=mmap.ACCESS_READ) if self.size else b""
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > self.size:
            raise CamelidError(f"{self.path}: cut short at byte {self.size}; the .flm file is truncated")
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        return raw

    def ints(self, n: int = 1) -> tuple[int, ...]:
        if self.pos + 4 * n > self.size:
            raise CamelidError(f"{self.path}: cut short at byte {self.size}; the .flm file is truncated")
        values = struct.unpack_from(f"<{n}i", self.buf, self.pos)
        self.pos += 4 * n
        return values

    def int(self) -> int:
        return self.ints(1)[0]

    def str(self) -> str:
        n = self.int()
        if not 0 <= n < 1 << 30:
            raise CamelidError(f"{self.path}: a string of length {n} at byte {self.pos - 4}; not a .flm file")
        return self.take(n).decode("utf-8", errors="replace")

    def close(self) -> None:
        if isinstance(self.buf, mmap.mmap):
            self.buf.close()
        self.f.close()


# ---- the writer -------------------------------------------------------------------------------------
def _config_keys(config: Any) -> dict[str, str]:
    """The model's config as fastllm reads it (llama.cpp-style flat keys, Python spellings of values)."""
    if config.head_dim != config.hidden_size // config.num_heads:
        raise CamelidError(f"fastllm derives head_dim as hidden_size / heads; this model's head_dim {config.head_dim} "
                           "differs, so it cannot run in fastllm")
    keys: dict[str, Any] = {
        "model_type": "llama", "architectures": "LlamaForCausalLM", "hidden_act": "silu",
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim, "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_theta,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
    }
    if config.rope_scaling:
        kind = config.rope_scaling["type"]
        if kind not in ("linear", "dynamic"):
            raise CamelidError(f"fastllm knows only linear and dynamic rope scaling; this model uses {kind!r} "
                               "and would compute wrong results there")
        for k, v in config.rope_scaling.items():
            keys[f"rope_scaling.{k}"] = v
    return {k: _value_text(v) for k, v in keys.items()}


def _value_text(v: Any) -> str:
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)  # True/False, None, 1e-05 ... as torch2flm writes them


class FLMWriter:
    """One .flm file: config and prompt keys, the vocabulary, then each tensor as it arrives."""

    def __init__(self, out: Path, config: Any, *, plan: list, dtype: torch.dtype = torch.float32,
                 quant: str | None = None, group: int | None = None, force: bool = False,
                 tokenizer_files: dict[str, Path] | None = None, tokenizer_metadata: dict[str, Any] | None = None,
                 chat_template: str | None = None, prompt_template: Any = None, **_options: Any):
        from . import flm_vocab
        if quant is not None and quant not in QUANT_CODES:
            raise CamelidError(f"fastllm quantization {quant!r} is not supported (use {', '.join(QUANT_CODES)})")
        if group is not None and quant != "int4g":
            raise CamelidError("--group applies only to --quant int4g")
        self.group = DEFAULT_GROUP if group is None else group
        if self.group <= 0 or self.group % 2:
            raise CamelidError(f"--group {self.group}: the group size must be a positive even number")
        self.quant, self.dtype = quant, dtype
        if not quant and dtype not in FLOAT_CODES:
            # fastllm's CPU bf16 kernels need row sizes in multiples of 32 and round activations to bf16; its own
            # converter writes bf16 models as fp16. Make the user choose instead of rounding silently.
            name = str(dtype).removeprefix("torch.")
            raise CamelidError(f"fastllm stores linear weights as float32 or float16, not {name}; "
                               "pass --dtype float16 (fastllm's usual choice) or --dtype float32 (exact)")
        self._planned = {p.name: tuple(p.shape) for p in plan}
        linear_cols = [p.shape[1] for p in plan if _is_linear(p.name) and len(p.shape) == 2]
        self._cols_gcd = math.gcd(*linear_cols) if linear_cols else 0
        for p in plan:  # refuse before anything is written
            self._code(p.name, tuple(p.shape))
        vocab = flm_vocab.build_vocab(tokenizer_files or {}, tokenizer_metadata or {}, config)
        keys = _config_keys(config)
        keys.update(flm_vocab.tokenizer_keys(vocab))
        keys.update(flm_vocab.prompt_keys(vocab, chat_template, prompt_template))
        if chat_template:
            keys[CHAT_TEMPLATE_KEY] = chat_template
        self._ctx = atomic_output(out, force=force, is_dir=False)
        self.tmp = self._ctx.__enter__()
        self._f: BinaryIO | None = None
        try:
            f = self._f = open(self.tmp, "wb")
            _put_int(f, 2, len(keys))
            for k in sorted(keys):
                _put_str(f, k)
                _put_str(f, keys[k])
            flm_vocab.write_vocab(f, vocab)
            _put_int(f, len(plan))
        except BaseException:
            self.abort()
            raise

    def _code(self, name: str, shape: tuple[int, ...]) -> int:
        if not _is_linear(name) or len(shape) != 2:
            return F32
        if not self.quant:
            return FLOAT_CODES[self.dtype]
        code = QUANT_CODES[self.quant]
        cols = shape[1]
        if code in (INT4, INT4G) and cols % 2:
            raise CamelidError(f"tensor {name!r} has an odd number of columns ({cols}); fastllm packs two 4-bit codes "
                               "a byte, so use --quant int8")
        if code == INT4G and cols % self.group:
            raise CamelidError(f"--group {self.group} does not divide the {cols} columns of {name!r}; use a group "
                               f"size that divides {self._cols_gcd} (it divides every matrix's column count)")
        return code

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._planned:
            raise CamelidError(f"tensor {name!r} was not planned for this output (or was written twice)")
        shape = self._planned.pop(name)
        if tuple(tensor.shape) != shape:
            raise CamelidError(f"tensor {name!r}: got shape {tuple(tensor.shape)}, planned {shape}")
        f = self._f
        code = self._code(name, shape)
        _put_str(f, name)
        _put_int(f, len(shape), *shape, code)
        if code in (F32, F16, BF16):
            dt = {F32: torch.float32, F16: torch.float16, BF16: torch.bfloat16}[code]
            f.write(memoryview(tensor.to(dt).contiguous().view(-1).view(torch.uint8).numpy()))
            return
        rows = tensor.float().reshape(shape[0], -1)
        if code == INT4G:
            groups = shape[1] // self.group
            q, mins, maxs, _, _ = fq.quantize_rows(rows.reshape(-1, self.group), 4, with_zero=False)
            q = q.reshape(shape[0], shape[1])
            _put_int(f, 0, groups, self.group)
        else:
            bits = 8 if code == INT8 else 4
            q, mins, maxs, _, _ = fq.quantize_rows(rows, bits, with_zero=code == INT8)
            _put_int(f, 0)
        pairs = torch.stack([mins, maxs], dim=1).contiguous()
        f.write(pairs.numpy().astype("<f4").tobytes())
        data = q if code == INT8 else fq.pack_int4(q)
        f.write(memoryview(data.contiguous().numpy()))

    def finish(self) -> None:
        if self._planned:
            first = next(iter(self._planned))
            raise CamelidError(f"{len(self._planned)} planned tensors were never written, e.g. {first!r}")
        self._f.close()
        self._f = None
        self._ctx.__exit__(None, None, None)

    def abort(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        exc = CamelidError("aborted")
        self._ctx.__exit__(type(exc), exc, None)


# ---- the reader -------------------------------------------------------------------------------------
def _parse_value(text: str) -> Any:
    if text in ("True", "False"):
        return text == "True"
    if text == "None":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.startswith("["):
        try:
            return json.loads(text)
        except ValueError:
            pass
    return text


class FLMReader:
    """A .flm file: its keys (`metadata`), vocabulary and tensors; a tensor is read (and dequantized) on demand."""

    def __init__(self, path: str | Path, **_options: Any):
        self.path = Path(path)
        src = _In(self.path)
        self._tmpdir: Path | None = None
        try:
            version = src.int()
            if version not in (1, 2):
                raise CamelidError(f"{self.path}: .flm version {version} is not supported (expected 2); "
                                   "is this a fastllm model file?")
            self.metadata: dict[str, str] = {}
            for _ in range(src.int()):
                key = src.str()
                self.metadata[key] = src.str()
            if "peft_size" in self.metadata:
                raise CamelidError(f"{self.path}: holds LoRA adapters (peft_size); camelid reads plain models only")
            use_score = self.metadata.get("tokenizer_use_score") == "1"
            self.vocab: list[tuple[bytes, int, float]] = []
            count = src.int()
            for i in range(count):
                n = src.int()
                raw = bytes(b & 0xFF for b in src.ints(n)) if n else b""  # one int32 per byte
                tid = src.int()
                score = struct.unpack("<f", src.take(4))[0] if use_score else float(-i)
                self.vocab.append((raw, tid, score))
            self.special_tokens: list[str] = []
            if self.metadata.get("tokenizer_has_special_tokens") == "1":
                self.special_tokens = [src.str() for _ in range(src.int())]
            self._where: dict[str, tuple[int, int, tuple[int, ...]]] = {}  # name -> (code, offset, shape)
            for _ in range(src.int()):
                name = src.str()
                ndim = src.int()
                shape = tuple(src.ints(ndim)) if ndim else ()
                code = src.int()
                offset = src.pos
                size = self._payload_size(name, code, shape, src)  # reads the quantization header, if any
                src.pos += size
                self._where[name] = (code, offset, shape)
            if self.metadata.get("tie_word_embeddings") == "True" and "model.embed_tokens.weight" in self._where:
                # fastllm needs lm_head.weight even when tied, so writers repeat the embedding there; a tied
                # model does not have it (the HF way back then stores the embedding once, as the source did).
                self._where.pop("lm_head.weight", None)
            if src.size < src.pos:
                raise CamelidError(f"{self.path}: cut short ({src.size} of {src.pos} bytes); "
                                   "the .flm file is truncated")
        finally:
            src.close()
        self.config = self._config()

    def _payload_size(self, name: str, code: int, shape: tuple[int, ...], src: _In) -> int:
        n = math.prod(shape)
        if code == F32:
            return 4 * n
        if code in (F16, BF16):
            return 2 * n
        if code in (INT8, INT4, INT4Z, INT4G):
            axis = src.int()
            groups = 1
            if code == INT4G:
                groups, _ = src.ints(2)
            if axis not in (0, -1):
                raise CamelidError(f"{self.path}: tensor {name!r} is quantized along axis {axis}; camelid reads "
                                   "per-row (axis 0) quantization only")
            k = (shape[0] if axis == 0 else 1) * groups
            data = n if code == INT8 else (n + 1) // 2
            return 8 * k + data  # from here: the (min, max) pairs, then the codes
        raise CamelidError(f"{self.path}: tensor {name!r} has fastllm data type {code}, which camelid cannot read "
                           "(supported: fp32, fp16, bf16, int8, int4, int4-group)")

    def _config(self):
        from ..config import ModelConfig
        md = {k: _parse_value(v) for k, v in self.metadata.items()}
        if md.get("model_type") not in ("llama", None):
            raise CamelidError(f"{self.path}: model_type {md.get('model_type')!r} is not a LLaMA-architecture model")
        scaling = {k.split(".", 1)[1]: v for k, v in md.items() if k.startswith("rope_scaling.")}
        if scaling:
            md["rope_scaling"] = scaling
        else:
            md.pop("rope_scaling", None)
        rope = md.pop("rope_parameters", None)
        if isinstance(rope, str) and "rope_theta" not in md:
            # fastllm's converter writes transformers-5 configs' rope dict as Python text (and fastllm itself then
            # ignores it, running with theta 10000); the model's own theta is in there.
            try:
                rope = ast.literal_eval(rope)
            except (ValueError, SyntaxError):
                rope = None
            if isinstance(rope, dict) and isinstance(rope.get("rope_theta"), (int, float)):
                md["rope_theta"] = float(rope["rope_theta"])
        if "vocab_size" not in md and "model.embed_tokens.weight" in self._where:
            md["vocab_size"] = self._where["model.embed_tokens.weight"][2][0]
        if "intermediate_size" not in md and "model.layers.0.mlp.gate_proj.weight" in self._where:
            md["intermediate_size"] = self._where["model.layers.0.mlp.gate_proj.weight"][2][0]
        md.setdefault("rms_norm_eps", 1e-6)
        if "head_dim" in md and md.get("hidden_size") and md.get("num_attention_heads"):
            md["head_dim"] = md["hidden_size"] // md["num_attention_heads"]  # fastllm's rule, whatever the key says
        try:
            return ModelConfig.from_hf_dict(md)
        except CamelidError as e:
            raise CamelidError(f"{self.path}: {e}") from None

    def tensors(self) -> dict[str, TensorInfo]:
        return {name: TensorInfo(shape, CODE_NAMES[code]) for name, (code, _, shape) in self._where.items()}

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        if name not in self._where:
            raise CamelidError(f"{self.path}: no tensor named {name!r}")
        code, offset, shape = self._where[name]
        n = math.prod(shape)
        with open(self.path, "rb") as f:
            f.seek(offset)
            if code in (F32, F16, BF16):
                dt = {F32: torch.float32, F16: torch.float16, BF16: torch.bfloat16}[code]
                tensor = torch.empty(shape, dtype=dt)
                view = memoryview(tensor.view(-1).view(torch.uint8).numpy()) if n else b""
                if n and f.readinto(view) != len(view):
                    raise CamelidError(f"{self.path}: tensor {name!r} is cut short; the .flm file is truncated")
            else:
                tensor = self._dequantize(f, code, shape)
        return tensor.to(dtype) if dtype is not None else tensor

    def _dequantize(self, f: BinaryIO, code: int, shape: tuple[int, ...]) -> torch.Tensor:
        axis = struct.unpack("<i", f.read(4))[0]
        groups = 1
        if code == INT4G:
            groups, _size = struct.unpack("<2i", f.read(8))
        rows = shape[0] if axis == 0 else 1
        k = rows * groups
        pairs = torch.from_numpy(np.frombuffer(f.read(8 * k), dtype="<f4").astype(np.float32).reshape(k, 2))
        n = math.prod(shape)
        nbytes = n if code == INT8 else (n + 1) // 2
        raw = torch.from_numpy(np.frombuffer(f.read(nbytes), dtype=np.uint8).copy())
        bits = 8 if code == INT8 else 4
        with_zero = code in (INT8, INT4Z)
        scale, zp = fq.loader_params(pairs[:, :1], pairs[:, 1:], bits)
        if bits == 8:
            q = raw.reshape(k, -1)
        else:
            q = fq.unpack_int4(raw.reshape(rows, -1), n // rows).reshape(k, -1)
        return fq.dequantize_rows(q, scale, zp, with_zero).reshape(shape)

    def tokenizer_dir(self) -> Path | None:
        """A folder with tokenizer.model + tokenizer_config.json rebuilt from the file's vocabulary."""
        from . import flm_vocab
        if self._tmpdir is None:
            self._tmpdir = Path(tempfile.mkdtemp(prefix="camelid-flm-tokenizer-"))
            try:
                flm_vocab.rebuild_tokenizer(self, self._tmpdir)
            except BaseException:
                self.close()
                raise
        return self._tmpdir

    def close(self) -> None:
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None


def _register() -> None:
    from . import Layout, _same, register
    # untied: fastllm's llama always reads lm_head.weight, so tied models get their embedding repeated there.
    register("flm", reader=FLMReader, writer=FLMWriter, layout=Layout(_same, _same, untied=True),
             suffixes=(".flm",), quants=tuple(QUANT_CODES))


_register()
