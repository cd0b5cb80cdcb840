"""Tensor-parallel inference with PyTorch's DTensor: `torchrun --nproc-per-node N -m camelid.cli
serve|generate|chat --tp N ...`.

The plain model (model.py) is sharded from outside with `parallelize_module`, as in Megatron: q/k/v and
gate/up column-wise (each rank holds heads/N attention heads and intermediate/N MLP columns), o and down
row-wise (partial sums all-reduced), the embedding and the output matrix vocabulary-parallel (rows split;
the logits gathered). Each rank reads every tensor through the format readers, which read one tensor at a
time, keeps its own slice and drops the rest: a rank holds about 1/N of the weights.

Rank 0 runs the command as it would alone (the HTTP server, the terminal, sampling). Every call it makes into
the model (forward, decode_step, setup_cache, clear_cache) is first broadcast to the other ranks, which
make the same call on their shards in the same order: the collectives inside the layers then pair up.
The logits come out replicated, so rank 0 alone chooses tokens and the followers need no sampler.
Multi-host is torchrun's business: `--nnodes M --node-rank R --rdzv-endpoint HOST:PORT`.
"""
from __future__ import annotations

import atexit
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .errors import CamelidError

CALLS = ("forward", "decode_step", "setup_cache", "clear_cache")
IDLE_TIMEOUT = timedelta(days=30)  # followers wait in a broadcast while a server is idle


def check_divisible(config: Any, n: int) -> None:
    """Refuse shapes that do not split into N equal shards, before anything is loaded."""
    for what, value in (("attention heads", config.num_heads), ("kv heads", config.num_kv_heads),
                        ("MLP width (intermediate_size)", config.intermediate_size),
                        ("vocabulary", config.vocab_size)):
        if value % n:
            raise CamelidError(f"--tp {n}: the model's {value} {what} do not divide into {n} equal shards; "
                               f"use a --tp that divides {config.num_heads} heads and {config.num_kv_heads} kv heads")


def init(n: int) -> tuple[int, Any]:
    """This process's rank and the 1-D device mesh of N processes (gloo on CPU, NCCL on GPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != n:
        raise CamelidError(f"--tp {n} needs {n} processes, this is {world}: start it with "
                           f"`torchrun --nproc-per-node {n} -m camelid.cli ...`")
    from torch.distributed.device_mesh import init_device_mesh
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=IDLE_TIMEOUT)
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), init_device_mesh("cuda" if cuda else "cpu", (n,))


def _plan() -> dict[str, Any]:
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
    plan: dict[str, Any] = {
        "model.embed_tokens": RowwiseParallel(input_layouts=Replicate()),
        "lm_head": ColwiseParallel(output_layouts=Replicate()),
    }
    for name in ("q_proj", "k_proj", "v_proj"):
        plan[f"model.layers.*.self_attn.{name}"] = ColwiseParallel()
    plan["model.layers.*.self_attn.o_proj"] = RowwiseParallel()
    for name in ("gate_proj", "up_proj"):
        plan[f"model.layers.*.mlp.{name}"] = ColwiseParallel()
    plan["model.layers.*.mlp.down_proj"] = RowwiseParallel()
    return plan


def _load_shards(model: nn.Module, reader: Any, config: Any, dtype: torch.dtype, device: torch.device) -> None:
    """Fill every parameter with this rank's slice, one stored tensor read at a time."""
    from torch.distributed.tensor import DTensor, Shard
    from .weights import Weights, check_tensors
    params = dict(model.named_parameters(remove_duplicate=False))
    weights = Weights(reader, config)
    check_tensors(model, weights)  # names and shapes, before any data is read
    loaded: set[str] = set()
    for hf in weights.infos:
        tensor, p = weights.read_float(hf), params[hf]
        module_name, _, attr = hf.rpartition(".")
        module = model.get_submodule(module_name)
        if isinstance(p, DTensor):
            (placement,) = p.placements
            local = tensor.chunk(p.device_mesh.size(), dim=placement.dim)[p.device_mesh.get_local_rank()] \
                if isinstance(placement, Shard) else tensor
            value = DTensor.from_local(local.to(dtype).to(device).contiguous(), p.device_mesh, p.placements,
                                       run_check=False, shape=p.shape, stride=_contiguous_stride(p.shape))
        else:
            value = tensor.to(dtype).to(device)
        setattr(module, attr, nn.Parameter(value, requires_grad=False))
        loaded.add(hf)
        del tensor
    if config.tie_word_embeddings and "lm_head.weight" not in loaded:
        # Both matrices are split by vocabulary rows (Shard(0)): the tied output shares the embedding's shard.
        model.lm_head.weight = model.model.embed_tokens.weight
        loaded.add("lm_head.weight")


def _contiguous_stride(shape: torch.Size) -> tuple[int, ...]:
    stride, acc = [], 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= size
    return tuple(reversed(stride))


def load_sharded(path: str | Path | None, n: int, *, dtype: torch.dtype = torch.float32) -> Any:
    """The model of `path` split over N processes (every rank calls this); a `LoadedModel` whose model
    computes the full logits on every rank."""
    from torch.distributed.tensor.parallel import parallelize_module
    from .engine import LoadedModel, build_meta, open_checkpoint, resolve_model_path
    start = time.perf_counter()
    source = resolve_model_path(path)
    config, reader, tokenizer = open_checkpoint(path)
    check_divisible(config, n)
    rank, mesh = init(n)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    model = build_meta(config)
    if config.tie_word_embeddings:
        model.lm_head.weight = nn.Parameter(torch.empty_like(model.lm_head.weight))  # untied until loaded
    parallelize_module(model, mesh, _plan())
    _load_shards(model, reader, config, dtype, device)
    reader.close()
    for layer in model.model.layers:  # the attention reshapes by the heads this rank holds
        layer.self_attn.n_heads //= n
        layer.self_attn.n_kv //= n
    model.eval()
    return LoadedModel(model, config, tokenizer, tokenizer.chat_template if tokenizer else None, source,
                       time.perf_counter() - start)


# ---- rank 0 leads, the others follow ---------------------------------------------------------------------
def lead(model: nn.Module) -> None:
    """On rank 0: broadcast each model call to the followers before making it; release them at exit."""
    for name in CALLS:
        inner = getattr(model, name)

        def call(*args: Any, _name: str = name, _inner: Any = inner, **kwargs: Any) -> Any:
            dist.broadcast_object_list([(_name, args, kwargs)], src=0)
            return _inner(*args, **kwargs)
        setattr(model, name, call)
    atexit.register(release)


def release() -> None:
    """Tell the followers to stop (rank 0, once), then leave the process group."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_rank() == 0:
            dist.broadcast_object_list([None], src=0)
        dist.destroy_process_group()


def follow(model: nn.Module) -> None:
    """On ranks > 0: make the calls rank 0 broadcasts, in order, until it says stop."""
    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0)
        if box[0] is None:
            break
        name, args, kwargs = box[0]
        with torch.inference_mode():
            if name == "setup_cache":
                _grow_cache(model, *args, **kwargs)
            else:
                getattr(model, name)(*args, **kwargs)
    dist.destroy_process_group()


def _grow_cache(model: nn.Module, batch: int, max_seq: int, *args: Any, **kwargs: Any) -> None:
    """setup_cache, keeping a one-row cache's keys/values (rank 0's prefix cache copies them itself when it
    grows the cache; the follower has no such caller, so it keeps all it held)."""
    old = [layer.self_attn.cache for layer in model.model.layers] if model.cache_batch == batch == 1 else None
    model.setup_cache(batch, max_seq, *args, **kwargs)
    if old is not None and old[0] is not None:
        n = min(old[0].k.shape[2], max_seq)
        for layer, cache in zip(model.model.layers, old):
            layer.self_attn.cache.k[:, :, :n] = cache.k[:, :, :n]
            layer.self_attn.cache.v[:, :, :n] = cache.v[:, :, :n]


def load_for_command(path: str | Path | None, n: int, *, dtype: torch.dtype, quant: str | None,
                     compile: bool = False) -> Any:
    """For generate/chat/serve with --tp N: rank 0 gets the loaded model (leading); every other rank
    follows rank 0's calls until it is done and then exits here."""
    if quant:
        raise CamelidError(f"--tp with --quant {quant} is not supported: the int8/int4 layers have no "
                           "DTensor sharding; run --tp in float32 or bfloat16, or --quant in one process")
    if compile:
        raise CamelidError("--tp with --compile is not supported; leave out --compile")
    loaded = load_sharded(path, n, dtype=dtype)
    if dist.get_rank() != 0:
        follow(loaded.model)
        sys.exit(0)
    lead(loaded.model)
    return loaded
