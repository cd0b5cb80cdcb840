"""Load a GGUF's quantized tensors as they are stored: the model's linear layers and embedding become views of
the memory-mapped file (no Python loop over blocks, no copy, no float weights), run by the native kernels.

GGUF keeps q/k rows in the interleaved rotary order; instead of moving rows, each q/k matrix carries a row
permutation that the kernel applies as it writes its output (Hugging Face order comes out).

Q4_0/Q4_1 matrices the products read are repacked once here (8 rows interleaved, csrc/repack.cpp: ~1-2 GB/s,
natively threaded) and the repacked copy is the only one kept: the file's pages are handed back as they are
copied, so resident memory stays about one copy of the weights. Q8_0 matrices stay views of the file (the kernels
read its rows as fast; blocks.load_layout). An embedding that is not also the output matrix stays a
view of the file (only the rows looked up are ever read)."""
from __future__ import annotations

import torch
from torch import nn

from ..formats import names
from ..formats.base import StoredQuantReader
from .blocks import NO_PERM, TYPES, NativeEmbedding, NativeLinear, load_layout, perm_from_source


def mapped_blocks(reader: StoredQuantReader, native: str) -> tuple[torch.Tensor, int]:
    """(uint8 (rows, row bytes) view of the file, kernel type) of one Q4_0/Q4_1/Q8_0 tensor."""
    stored = reader.stored(native)
    return stored.data, TYPES[stored.scheme]


def _perm(hf: str, rows: int, heads: int, kv_heads: int) -> torch.Tensor:
    n = names.rotary_heads(hf, heads, kv_heads)
    if not n:
        return NO_PERM
    return perm_from_source(names.from_interleaved(torch.arange(rows), n))


def swap_in_blocks(model: nn.Module, reader: StoredQuantReader) -> set[str]:
    """Replace every linear layer (and the embedding, and a tied output) whose GGUF tensor is Q4_0/Q4_1/Q8_0 by a
    module over the file's blocks; returns the HF tensor names so handled (the loader skips them)."""
    config = model.config
    done: set[str] = set()
    for native, kind in reader.quantized().items():
        hf = names.gguf_to_hf(native)
        if hf is None or kind not in TYPES or not hf.endswith(".weight"):
            continue
        module_name = hf.removesuffix(".weight")
        blocks, qtype = mapped_blocks(reader, native)
        if hf == "model.embed_tokens.weight":
            if config.tie_word_embeddings and "output.weight" not in reader.tensors():
                blocks, qtype = load_layout(blocks, qtype, release=True)
                model.lm_head = NativeLinear([(blocks, qtype, NO_PERM)])
                done.add("lm_head.weight")
            model.model.embed_tokens = NativeEmbedding(blocks, qtype)
            done.add(hf)
            continue
        parent_name, _, child = module_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if not isinstance(getattr(parent, child, None), nn.Linear):
            continue
        perm = _perm(hf, blocks.shape[0], config.num_heads, config.num_kv_heads)
        blocks, qtype = load_layout(blocks, qtype, release=True)
        setattr(parent, child, NativeLinear([(blocks, qtype, perm)]))
        done.add(hf)
    return done
