"""ModelConfig: the ~15 numbers that define a LLaMA-family model, read from any format that carries them."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CamelidError

ROPE_KINDS = ("linear", "dynamic", "llama3")


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0  # 0 -> hidden_size // num_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None, or {"type": "linear"|"dynamic"|"llama3", "factor": f, and for llama3
    # "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.head_dim:
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise CamelidError(f"config: {self.num_heads} attention heads is not a multiple of {self.num_kv_heads} kv heads")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type")
            if kind not in ROPE_KINDS:
                raise CamelidError(f"config: unsupported rope scaling {kind!r} (supported: none, {', '.join(ROPE_KINDS)})")

    # ---- Hugging Face config.json -------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        try:
            # transformers 5 keeps theta and scaling in `rope_parameters`; 4.x in `rope_theta` + `rope_scaling`.
            rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
            theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
            kind = rope.get("rope_type", rope.get("type", "default"))
            scaling = None
            if kind not in (None, "default"):
                scaling = {"type": kind, "factor": float(rope["factor"])}
                for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                    if key in rope:
                        scaling[key] = rope[key]
            heads = d["num_attention_heads"]
            return cls(
                vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
                num_layers=d["num_hidden_layers"], num_heads=heads, num_kv_heads=d.get("num_key_value_heads") or heads,
                head_dim=d.get("head_dim") or 0, norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
                rope_scaling=scaling, max_position_embeddings=d.get("max_position_embeddings", 2048),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"),
                name=d.get("_name_or_path", ""),
            )
        except KeyError as e:
            raise CamelidError(f"config.json lacks the field {e.args[0]!r} that a LLaMA config needs") from None

    @classmethod
    def from_hf_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CamelidError(f"{path}: cannot read config ({e})") from None
        if d.get("model_type") not in (None, "llama", "mistral"):
            raise CamelidError(f"{path}: model_type {d.get('model_type')!r} is not a LLaMA-architecture model")
        return cls.from_hf_dict(d)

    def to_hf_dict(self) -> dict[str, Any]:
        rope: dict[str, Any] = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling:
            rope.update({k: v for k, v in self.rope_scaling.items() if k != "type"}, rope_type=self.rope_scaling["type"])
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "hidden_act": "silu", "rms_norm_eps": self.norm_eps,
            # Both layouts, so transformers 4.x and 5.x read the same rope settings.
            "rope_theta": self.rope_theta, "rope_parameters": rope,
            "rope_scaling": ({**{k: v for k, v in self.rope_scaling.items() if k != "type"},
                              "rope_type": self.rope_scaling["type"], "type": self.rope_scaling["type"]}
                             if self.rope_scaling else None),
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
            "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
        }

    # ---- Meta params.json ---------------------------------------------------------------------
    @classmethod
    def from_meta_params(cls, p: dict[str, Any], vocab_size: int | None = None,
                         max_position_embeddings: int = 4096) -> "ModelConfig":
        """`vocab_size` overrides params.json's (LLaMA-1 writes -1 there: take it from the tensors)."""
        dim = p["dim"]
        hidden = int(2 * 4 * dim / 3)
        if p.get("ffn_dim_multiplier") is not None:
            hidden = int(p["ffn_dim_multiplier"] * hidden)
        multiple_of = p.get("multiple_of", 256)
        hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
        vocab = vocab_size if vocab_size is not None else p.get("vocab_size", -1)
        if vocab is None or vocab <= 0:
            raise CamelidError("params.json has no vocab_size (LLaMA-1 writes -1): take it from the embedding tensor")
        scaling = None
        if p.get("use_scaled_rope"):  # Llama 3.1 params.json
            scaling = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}
        return cls(vocab_size=vocab, hidden_size=dim, intermediate_size=hidden, num_layers=p["n_layers"],
                   num_heads=p["n_heads"], num_kv_heads=p.get("n_kv_heads") or p["n_heads"],
                   norm_eps=p.get("norm_eps", 1e-5), rope_theta=float(p.get("rope_theta", 10000.0)),
                   rope_scaling=scaling, max_position_embeddings=max_position_embeddings)

    def to_meta_params(self) -> dict[str, Any]:
        """params.json whose FFN rule (`from_meta_params`) gives back exactly `intermediate_size`."""
        dim, ffn = self.hidden_size, self.intermediate_size
        base = int(2 * 4 * dim / 3)
        p: dict[str, Any] = {"dim": dim, "n_layers": self.num_layers, "n_heads": self.num_heads,
                             "n_kv_heads": self.num_kv_heads, "vocab_size": self.vocab_size, "norm_eps": self.norm_eps,
                             "rope_theta": self.rope_theta}
        # Meta's own sizes round up to 256; tiny or unusual models need another multiple or a multiplier.
        if ffn >= base:
            p["multiple_of"] = next(m for m in (256, 128, 64, 32, 16, 8, 4, 2, 1, ffn) if -(-base // m) * m == ffn)
        else:
            p["multiple_of"], p["ffn_dim_multiplier"] = 1, (ffn + 0.5) / base
        if self.rope_scaling and self.rope_scaling.get("type") == "llama3":
            p["use_scaled_rope"] = True
        if self.head_dim != dim // self.num_heads:
            raise CamelidError(f"head_dim {self.head_dim} != dim/heads: Meta's params.json cannot express this model")
        return p

    # ---- GGUF metadata ------------------------------------------------------------------------
    @classmethod
    def from_gguf_metadata(cls, md: dict[str, Any], *, has_output_tensor: bool = True) -> "ModelConfig":
        arch = md.get("general.architecture", "llama")
        if arch != "llama":
            raise CamelidError(f"GGUF architecture {arch!r} is not supported (camelid runs LLaMA-architecture models)")
        a = lambda key, default=None: md.get(f"llama.{key}", default)  # noqa: E731
        try:
            heads = a("attention.head_count")
            hidden = a("embedding_length")
            vocab = a("vocab_size") or len(md["tokenizer.ggml.tokens"])
            scaling = None
            kind = a("rope.scaling.type")
            if kind in ("linear", "yarn") and a("rope.scaling.factor"):
                if kind == "yarn":
                    raise CamelidError("GGUF rope scaling 'yarn' is not supported")
                scaling = {"type": "linear", "factor": float(a("rope.scaling.factor"))}
            cfg = cls(
                vocab_size=vocab, hidden_size=hidden, intermediate_size=a("feed_forward_length"),
                num_layers=a("block_count"), num_heads=heads, num_kv_heads=a("attention.head_count_kv") or heads,
                head_dim=a("attention.key_length") or a("rope.dimension_count") or hidden // heads,
                norm_eps=float(a("attention.layer_norm_rms_epsilon", 1e-5)),
                rope_theta=float(a("rope.freq_base", 10000.0)), rope_scaling=scaling,
                max_position_embeddings=a("context_length", 2048), tie_word_embeddings=not has_output_tensor,
                bos_token_id=md.get("tokenizer.ggml.bos_token_id"), eos_token_id=md.get("tokenizer.ggml.eos_token_id"),
                name=md.get("general.name", ""),
            )
        except (KeyError, TypeError) as e:
            raise CamelidError(f"GGUF metadata lacks a LLaMA field ({e})") from None
        return cfg

    # ---- presets ------------------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "ModelConfig":
        """A preset by name (see PRESETS), with any field overridden."""
        key = name.lower()
        if key not in PRESETS:
            raise CamelidError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[key], name=key, **overrides)

    def tiny(self, **overrides: Any) -> "ModelConfig":
        """The same architecture shrunk to a test size: 2 layers, 64 wide, 4 heads (kv heads keep MHA/GQA)."""
        kv = 4 if self.num_kv_heads == self.num_heads else max(1, 4 * self.num_kv_heads // self.num_heads) or 1
        if 4 % kv:
            kv = 2
        scaling = dict(self.rope_scaling) if self.rope_scaling else None
        if scaling and "original_max_position_embeddings" in scaling:
            scaling["original_max_position_embeddings"] = 32
        small = dict(vocab_size=256, hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4,
                     num_kv_heads=kv, head_dim=16, rope_scaling=scaling, max_position_embeddings=128)
        small.update(overrides)
        return dataclasses.replace(self, **small)

    @property
    def eos_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    @property
    def num_params(self) -> int:
        d, f, v, L = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_layers
        attn = d * self.num_heads * self.head_dim * 2 + d * self.num_kv_heads * self.head_dim * 2
        per_layer = attn + 3 * d * f + 2 * d
        return L * per_layer + v * d * (1 if self.tie_word_embeddings else 2) + d


def _preset(**kw: Any) -> ModelConfig:
    return ModelConfig(**kw)


_LLAMA1 = dict(vocab_size=32000, norm_eps=1e-6, max_position_embeddings=2048)
_LLAMA2 = dict(vocab_size=32000, norm_eps=1e-5, max_position_embeddings=4096)
PRESETS: dict[str, ModelConfig] = {
    "llama-7b": _preset(hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32, **_LLAMA1),
    "llama-13b": _preset(hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40, num_kv_heads=40, **_LLAMA1),
    "llama-30b": _preset(hidden_size=6656, intermediate_size=17920, num_layers=60, num_heads=52, num_kv_heads=52, **_LLAMA1),
    "llama-65b": _preset(hidden_size=8192, intermediate_size=22016, num_layers=80, num_heads=64, num_kv_heads=64, **_LLAMA1),
    "llama-2-7b": _preset(hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32, **_LLAMA2),
    "llama-2-13b": _preset(hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40, num_kv_heads=40, **_LLAMA2),
    "llama-2-70b": _preset(hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64, num_kv_heads=8, **_LLAMA2),
    "llama-3-8b": _preset(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                          num_kv_heads=8, norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192,
                          bos_token_id=128000, eos_token_id=128001),
    "llama-3.1-8b": _preset(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                            num_kv_heads=8, norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
                            rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                            bos_token_id=128000, eos_token_id=[128001, 128008, 128009]),
    "smollm2-135m": _preset(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                            num_kv_heads=3, norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192,
                            tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
}
# Short aliases people use for the LLaMA-1 sizes.
for _size in ("7b", "13b", "30b", "65b"):
    PRESETS[_size] = PRESETS[f"llama-{_size}"]
