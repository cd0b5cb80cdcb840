"""LLaMA in plain PyTorch: RMSNorm, RoPE (fp32 tables; linear, dynamic-NTK and llama3 scaling),
grouped-query attention through `scaled_dot_product_attention`, SwiGLU MLP, and a static KV cache.

Parameter names and the rotate-half rotary layout are Hugging Face's, so a `transformers`
state dict loads as it is and every comparison with `LlamaForCausalLM` is one to one.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig

SPAN_STEP = 128  # the fixed-shape decode step attends over the cache in spans of this many positions


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 whatever the compute dtype, then scale in the input dtype (as LLaMA does).
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(config: ModelConfig, seq_len: int | None = None) -> Tensor:
    """Inverse frequencies (fp32). `seq_len` is the length being processed: dynamic NTK scaling depends on it."""
    dim, theta = config.head_dim, config.rope_theta
    scaling = config.rope_scaling or {}
    kind = scaling.get("type")
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    if kind == "dynamic" and seq_len is not None and seq_len > config.max_position_embeddings:
        factor, max_pos = scaling["factor"], config.max_position_embeddings
        base = theta * ((factor * torch.tensor(seq_len, dtype=torch.float32) / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (base ** exponents)
    inv_freq = 1.0 / (theta ** exponents)
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_ctx / high) & ~(wavelen > old_ctx / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_table(inv_freq: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """cos and sin for each position, (len, head_dim), computed in fp32."""
    freqs = positions.float()[:, None] * inv_freq[None, :].to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x: (batch, heads, seq, head_dim); cos/sin (seq, head_dim) or, per sequence, (batch, seq, head_dim).
    # Rotate-half layout: first half of each head holds the real parts, second half the imaginary ones.
    if cos.ndim == 3:
        cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class KVCache(nn.Module):
    """Pre-allocated keys/values (batch, kv_heads, max_seq, head_dim); positions are written in place."""

    def __init__(self, batch: int, kv_heads: int, max_seq: int, head_dim: int, dtype: torch.dtype, device=None):
        super().__init__()
        shape = (batch, kv_heads, max_seq, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, positions: Tensor, k: Tensor, v: Tensor, rows: Tensor | None) -> tuple[Tensor, Tensor]:
        """Write k/v (batch, kv_heads, seq, head_dim) at `positions`; return the keys/values up to the last one.

        With `rows`, sequence b of the batch lives in cache row rows[b] and positions are (batch, seq),
        so sequences of different lengths decode together (continuous batching).
        """
        end = int(positions.max()) + 1
        if rows is None:
            self.k[:, :, positions] = k
            self.v[:, :, positions] = v
            return self.k[:, :, :end], self.v[:, :, :end]
        # Advanced indices around a slice put the indexed dims first: values go in as (batch, seq, heads, dim).
        self.k[rows[:, None], :, positions] = k.transpose(1, 2)
        self.v[rows[:, None], :, positions] = v.transpose(1, 2)
        return self.k[rows, :, :end], self.v[rows, :, :end]

    def write_step(self, positions: Tensor, k: Tensor, v: Tensor, span: int) -> tuple[Tensor, Tensor]:
        """Update for one new token per row (all rows decode): k/v (batch, kv_heads, 1, head_dim) go in at
        positions (batch,); the first `span` cache positions come back (a multiple of SPAN_STEP, so the
        shapes change only every SPAN_STEP tokens)."""
        if k.shape[0] == 1:
            # index_copy_ is reinplaced by inductor: no copy of the whole cache per step.
            self.k.index_copy_(2, positions, k)
            self.v.index_copy_(2, positions, v)
        else:
            batch = torch.arange(k.shape[0], device=k.device)
            self.k[batch, :, positions] = k[:, :, 0]
            self.v[batch, :, positions] = v[:, :, 0]
        return self.k[:, :, :span], self.v[:, :, :span]


def decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Attention of one query per sequence over a span of the static cache, written out as two matmuls.

    q (batch, heads, 1, head_dim); k, v (batch, kv_heads, span, head_dim); mask (batch, 1, 1, span).
    For a single query the fused CPU attention kernel spends more on set-up than on arithmetic; plain
    matmuls let inductor fuse the scaling, mask and softmax. Query heads are grouped per kv head (GQA)
    instead of repeating keys and values.
    """
    b, heads, _, dim = q.shape
    kv = k.shape[1]
    qg = q.reshape(b, kv, heads // kv, dim)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * (1.0 / math.sqrt(dim))
    scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)
    return out.reshape(b, heads, 1, dim)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)
        self.qkv_proj: nn.Module | None = None  # q, k and v in one matrix, for inference (quantize.fuse_projections)
        self.cache: KVCache | None = None

    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.qkv_proj is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        kv = self.n_kv * self.head_dim
        return self.qkv_proj(x).split([self.n_heads * self.head_dim, kv, kv], dim=-1)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, mask: Tensor | None,
                rows: Tensor | None = None, static: bool = False) -> Tensor:
        b, s, _ = x.shape
        q, k, v = self.project_qkv(x)
        q = q.reshape(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.reshape(b, s, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.reshape(b, s, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if static:
            k, v = self.cache.write_step(positions, k, v, mask.shape[-1])
            return self.o_proj(decode_attention(q, k, v, mask).transpose(1, 2).reshape(b, s, -1))
        if self.cache is not None:
            # Attend only over the filled part of the cache, not all max_seq slots.
            k, v = self.cache.update(positions, k, v, rows)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=s > 1, enable_gqa=self.n_kv != self.n_heads)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.gate_up_proj: nn.Module | None = None  # gate and up in one matrix, for inference

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_up_proj is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, mask: Tensor | None,
                rows: Tensor | None = None, static: bool = False) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, mask, rows, static)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)


class Llama(nn.Module):
    """The whole model. `forward(tokens, positions)`: without a cache it is a plain causal forward;
    after `setup_cache` it writes keys/values at `positions` and attends over everything before them."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.max_seq = 0
        self.cache_batch = 0
        # Tokens whose keys/values each cache row holds, for callers that reuse a prefix (prefix_cache.py).
        self.cache_tokens: list[list[int]] = []
        self._compiled_step = None
        # A one-call native decode step (kernels/decode.py), set by the loader where every matrix is a block
        # matrix: (tokens, positions, rows) -> logits, or None when it does not serve the call.
        self.fused_step = None

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def setup_cache(self, batch: int, max_seq: int, dtype: torch.dtype | None = None) -> None:
        """Allocate the static KV cache for `batch` sequences of up to `max_seq` tokens."""
        dtype = dtype or self.model.embed_tokens.weight.dtype
        device = self.model.embed_tokens.weight.device
        self.max_seq, self.cache_batch = max_seq, batch
        self.cache_tokens = [[] for _ in range(batch)]
        for layer in self.model.layers:
            attn = layer.self_attn
            attn.cache = KVCache(batch, attn.n_kv, max_seq, attn.head_dim, dtype, device)

    def clear_cache(self) -> None:
        for layer in self.model.layers:
            layer.self_attn.cache = None
        self.max_seq, self.cache_batch, self.cache_tokens = 0, 0, []

    def _rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        seq_len = int(positions.max()) + 1
        cached = getattr(self, "_rope_cache", None)
        scaling = self.config.rope_scaling or {}
        # Dynamic NTK frequencies depend on the current length; the others are fixed once computed.
        key = seq_len if scaling.get("type") == "dynamic" and seq_len > self.config.max_position_embeddings else 0
        if cached is None or cached[0] != key or cached[1].shape[0] < seq_len:
            inv_freq = rope_inv_freq(self.config, seq_len)
            cos, sin = rope_table(inv_freq, torch.arange(max(seq_len, self.max_seq), device=positions.device))
            self._rope_cache = cached = (key, cos, sin)
        return cached[1][positions], cached[2][positions]

    def forward(self, tokens: Tensor, positions: Tensor | None = None, mask: Tensor | None = None,
                rows: Tensor | None = None, only: Tensor | None = None) -> Tensor:
        """tokens (batch, seq) -> logits (batch, seq, vocab); with `only`, a boolean (batch, seq) selection,
        just the selected positions' logits (n, vocab) (training: the vocabulary projection is skipped
        where no loss is taken).

        positions: (seq,) shared by the batch, or (batch, seq) for sequences at different points, which
        needs `rows`: the cache row of each sequence (sequences of a batch share the static cache).
        """
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device)
        if self.fused_step is not None and tokens.shape[1] == 1 and self.max_seq and mask is None and only is None:
            logits = self.fused_step(tokens, positions, rows)
            if logits is not None:
                return logits
        cos, sin = self._rope(positions)
        if mask is None and self.max_seq:
            if positions.ndim == 2:
                # Each query sees cached keys up to its own position; stale keys of a reused row stay hidden.
                end = int(positions.max()) + 1
                mask = (torch.arange(end, device=tokens.device)[None, None, :] <= positions[:, :, None])[:, None]
            elif tokens.shape[1] > 1 and int(positions[0]) > 0:
                # Prefill after earlier tokens: causal within the new tokens, full view of the cached ones.
                end = int(positions[-1]) + 1
                mask = torch.arange(end, device=tokens.device)[None, :] <= positions[:, None]
        x = self.model.embed_tokens(tokens)
        for layer in self.model.layers:
            x = layer(x, cos, sin, positions, mask, rows)
        return self.lm_head(self.model.norm(x if only is None else x[only]))

    def decode_step(self, tokens: Tensor, positions: Tensor, compiled: bool = False) -> Tensor:
        """One new token for every cache row: tokens (batch, 1) at positions (batch,) -> logits (batch, vocab).

        Shapes change only every SPAN_STEP tokens: the first `span` cache positions are attended, masked
        beyond each row's position, which is what lets `torch.compile` build the step once (dynamo makes
        the span dynamic at its first change: one recompile, then none). Attending over the whole cache
        instead costs about as much as reading the weights at a 1k-token cache. Rotary tables and the mask are
        made here, outside the compiled part, so it holds no data-dependent Python.
        """
        if tokens.shape[0] != self.cache_batch:
            raise ValueError(f"decode_step needs one token per cache row ({self.cache_batch}), got {tokens.shape[0]}")
        if self.fused_step is not None:  # already one native call per token: nothing left for compile to fuse
            logits = self.fused_step(tokens, positions, None)
            if logits is not None:
                return logits[:, -1]
        cos, sin = self._rope(positions[:, None])
        span = min(self.max_seq, -(-(int(positions.max()) + 1) // SPAN_STEP) * SPAN_STEP)
        mask = (torch.arange(span, device=tokens.device)[None, :] <= positions[:, None])[:, None, None, :]
        step = self._decode_core
        if compiled:
            if self._compiled_step is None:
                # One compiled step per model, reused by every later generation in the process; a new
                # cache shape (batch or max_seq) makes dynamo recompile it once for that shape.
                self._compiled_step = torch.compile(self._decode_core, fullgraph=True)
            step = self._compiled_step
        return step(tokens, positions, cos, sin, mask)

    def _decode_core(self, tokens: Tensor, positions: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        x = self.model.embed_tokens(tokens)
        for layer in self.model.layers:
            x = layer(x, cos, sin, positions, mask, None, True)
        return self.lm_head(self.model.norm(x))[:, -1]
