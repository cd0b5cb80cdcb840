"""Training checkpoints: a Hugging Face model folder (safetensors + config.json + tokenizer + camelid.json)
that `camelid chat`, `generate` and `transformers` load as it is, plus the trainer's state (optimizer,
scheduler, RNG, data position) so `--resume` continues exactly where the run stopped.

Weights are streamed one tensor at a time into a safetensors file whose header is planned up front, so
saving never holds a second copy of the model. Under FSDP each parameter is gathered on its own
(`DTensor.full_tensor()`, a collective every rank joins) and only rank 0 writes it.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from . import __version__
from .errors import CamelidError, disk_full_error, is_disk_full
from .formats import PlannedTensor, manifest
from .formats.atomic import atomic_output
from .formats.hf import HFWriter, HFReader

STATE_FILES = ("trainer_state.json",)  # plus rank-N.pt, one per process


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def full(t: Tensor) -> Tensor:
    """The whole tensor of a (possibly FSDP-sharded) parameter; a collective when sharded."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def model_tensors(model: nn.Module) -> list[tuple[str, Tensor]]:
    """(HF name, parameter) of every weight to save; a tied lm_head is left out as HF does."""
    tied = getattr(model, "config", None) is not None and model.config.tie_word_embeddings
    return [(n, p) for n, p in model.named_parameters() if not (tied and n == "lm_head.weight")]


def write_tokenizer(loaded: Any, folder: Path) -> None:
    """The tokenizer files of the source model: copied from a model folder; from a file (a GGUF, a .flm, an EasyLM
    params file with --tokenizer), written from the loaded tokenizer: tokenizer.json, or tokenizer.model for a
    SentencePiece vocabulary, with tokenizer_config.json and special_tokens_map.json."""
    from .formats.source import TOKENIZER_FILES, write_tokenizer_files
    src = loaded.source
    if src.is_dir():
        for f in TOKENIZER_FILES + ("generation_config.json",):
            if (src / f).is_file() and not (folder / f).exists():
                shutil.copyfile(src / f, folder / f)
        return
    tok = loaded.tokenizer
    proto = tok.sentencepiece_model() if tok is not None else None
    if proto is not None:
        (folder / "tokenizer.model").write_bytes(proto)
        write_tokenizer_files(tok, folder, saved=True, sentencepiece=True)
    elif tok is not None and tok.tokenizer_json() is not None:
        write_tokenizer_files(tok, folder)
    else:
        raise CamelidError(f"{src}: its tokenizer cannot be written beside the weights; pass --tokenizer")


def describe(folder: Path, loaded: Any, template_name: str | None, extra: dict[str, Any]) -> None:
    info = {"format": "hf", "source": str(loaded.source), "chat_template": template_name,
            "camelid_version": __version__, **extra}
    manifest.write(folder, info)


def read_description(model: str | Path | None) -> dict[str, Any]:
    """The camelid.json of a model or adapter folder ({} when there is none), read through formats/manifest.py
    (a damaged file is one clear error). Read before anything slow, so a bad file costs no wait."""
    return (manifest.read(Path(model).expanduser()) if model is not None else None) or {}


def save_model(model: nn.Module, loaded: Any, out: Path, *, template_name: str | None, force: bool = False,
               extra: dict[str, Any] | None = None, dtype: torch.dtype = torch.float32,
               state: Any = None, progress: bool = False) -> None:
    """Write `model` as an HF folder at `out` (atomically). `state(folder)` may add files before the rename;
    every rank calls this (gathers are collectives), rank 0 writes."""
    rank = _rank()
    named = model_tensors(model)
    if _world() == 1:  # a diverged run or a bad merge must not become a model that says nothing (FSDP: unchecked)
        from .formats.base import ensure_finite
        for name, p in named:
            ensure_finite(name, p.detach().to(dtype))
    writer = None
    if rank == 0:
        plan = [PlannedTensor(n, tuple(p.shape), dtype) for n, p in named]
        writer = HFWriter(out, loaded.config, plan=plan, force=force)
    bar = tqdm(total=sum(p.numel() for _, p in named) * dtype.itemsize, unit="B", unit_scale=True,
               desc=f"writing {Path(out).name}", disable=not progress or rank != 0, file=sys.stderr)
    try:
        for name, p in named:
            t = full(p.detach())
            if writer is not None:
                writer.write(name, t.to(dtype))
            bar.update(t.numel() * dtype.itemsize)
            del t
        bar.close()
        folder = _shared_folder(writer.tmp if writer is not None else None)
        if rank == 0:
            write_tokenizer(loaded, folder)
            describe(folder, loaded, template_name, extra or {})
        if state is not None:
            state(folder)
        if _world() > 1:
            dist.barrier()
        if writer is not None:
            writer.finish()
    except BaseException as e:
        if writer is not None:
            writer.abort()
        if is_disk_full(e):
            raise disk_full_error(out) from None
        raise


def _shared_folder(tmp: Path | None) -> Path:
    """The temporary folder rank 0 writes into, told to every rank (one filesystem assumed for checkpoints)."""
    path = [str(tmp) if tmp is not None else None]
    if _world() > 1:
        dist.broadcast_object_list(path, src=0)
    return Path(path[0])


def save_adapter_checkpoint(model: nn.Module, loaded: Any, out: Path, *, template_name: str | None,
                            extra: dict[str, Any], state: Any = None, force: bool = True) -> None:
    """A LoRA checkpoint: adapter files (PEFT layout) + camelid.json + tokenizer + trainer state."""
    from .lora import adapter_config, adapter_tensors, base_model_reference
    from safetensors.torch import save_file
    rank = _rank()
    ctx = atomic_output(out, force=force, is_dir=True) if rank == 0 else None
    tmp = ctx.__enter__() if ctx is not None else None
    try:
        tensors = {}
        for name, weight in adapter_tensors(model):
            t = full(weight.detach()).float().contiguous()  # a collective under FSDP: every rank gathers
            if rank == 0:
                tensors[name] = t
        folder = _shared_folder(tmp)
        if rank == 0:
            save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
            (folder / "adapter_config.json").write_text(json.dumps(adapter_config(model, base_model_reference(loaded.source)), indent=2) + "\n")
            write_tokenizer(loaded, folder)
            describe(folder, loaded, template_name, extra)
        if state is not None:
            state(folder)
        if _world() > 1:
            dist.barrier()
        if ctx is not None:
            ctx.__exit__(None, None, None)
    except BaseException as e:
        if ctx is not None:
            ctx.__exit__(type(e), e, e.__traceback__)
        raise


# ---- trainer state --------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def write_state(folder: Path, *, step: int, optimizer: torch.optim.Optimizer, scheduler: Any,
                info: dict[str, Any]) -> None:
    """Each rank writes its optimizer shard and RNG; rank 0 the step, scheduler and run settings."""
    rank = _rank()
    torch.save({"optimizer": optimizer.state_dict(), "rng": rng_state()}, folder / f"rank-{rank}.pt")
    if rank == 0:
        state = {"step": step, "world_size": _world(), "scheduler": scheduler.state_dict(), **info}
        (folder / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")


def latest_checkpoint(out: Path) -> Path | None:
    folders = sorted((p for p in (out / "checkpoints").glob("step-*") if (p / "trainer_state.json").is_file()),
                     key=lambda p: int(p.name.split("-")[1]))
    return folders[-1] if folders else None


def prune(out: Path, keep: int) -> None:
    """Remove all but the `keep` latest checkpoints (the final model's files are hard links, so they stay)."""
    folders = sorted((p for p in (out / "checkpoints").glob("step-*") if p.is_dir()),
                     key=lambda p: int(p.name.split("-")[1]))
    for old in folders[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def read_state(folder: Path) -> dict[str, Any]:
    state = json.loads((folder / "trainer_state.json").read_text())
    if state["world_size"] != _world():
        raise CamelidError(f"{folder} was saved by {state['world_size']} processes; resume it with the same number "
                           f"(this run has {_world()})")
    return state


def load_rank_state(folder: Path, optimizer: torch.optim.Optimizer) -> None:
    path = folder / f"rank-{_rank()}.pt"
    # Our own file; under FSDP it holds DTensors, which the weights-only unpickler does not know.
    saved = torch.load(path, map_location="cpu", weights_only=_world() == 1)
    optimizer.load_state_dict(saved["optimizer"])
    set_rng_state(saved["rng"])


def load_weights_into(model: nn.Module, folder: Path, lora: bool) -> None:
    """Copy a checkpoint's weights (or adapter) into the model, before it is sharded."""
    with torch.no_grad():
        if lora:
            from .lora import adapter_tensors, read_adapter
            _, tensors = read_adapter(folder)
            for name, t in adapter_tensors(model):
                t.copy_(tensors[name])
            return
        reader = HFReader(folder)
        params = dict(model.named_parameters())
        for name in reader.tensors():
            params[name].copy_(reader.read(name, params[name].dtype))
        reader.close()


def publish(folder: Path, out: Path) -> None:
    """Put the final checkpoint's model files at the top of `out` (each replaced atomically), so
    `camelid generate --model OUT` loads the trained model."""
    for f in folder.iterdir():
        if f.name in STATE_FILES or f.name.startswith("rank-") or not f.is_file():
            continue
        tmp = out / f".{f.name}.tmp"
        tmp.unlink(missing_ok=True)
        try:
            os.link(f, tmp)
        except OSError:
            shutil.copyfile(f, tmp)
        os.replace(tmp, out / f.name)


def merge_adapter(adapter: Path, out: Path, *, base: str | None = None, force: bool = False,
                  progress: bool = False) -> str:
    """Fold a LoRA adapter folder into its base model (W' = W + alpha/r B A) and write a whole HF model folder at
    `out`, with the template the adapter's camelid.json records. Returns the base model used."""
    from .engine import load_model
    from .lora import load_adapter, merge_lora, read_adapter_config
    adapter_cfg = read_adapter_config(adapter)
    described = read_description(adapter)  # checked before the base model loads
    base = base or adapter_cfg.get("base_model_name_or_path")
    if not base:
        raise CamelidError(f"{adapter}/adapter_config.json names no base model; pass --base PATH")
    loaded = load_model(base, dtype=torch.float32, progress=progress)
    load_adapter(loaded.model, adapter)
    merge_lora(loaded.model)
    save_model(loaded.model, loaded, out, template_name=described.get("chat_template"), force=force,
               extra={"merged_from": str(adapter), "base_model": str(base)}, progress=progress)
    return str(base)
