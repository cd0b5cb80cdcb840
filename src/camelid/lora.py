"""LoRA by module swap, and PEFT's adapter format: chosen `nn.Linear` layers become `LoRALinear` (the frozen base
layer plus a low-rank update B·A scaled by alpha/rank), with no copy of the model classes. Adapters are read
and described in PEFT's layout (adapter_model.safetensors + adapter_config.json) under PEFT's names
(`peft_name`); `merge_lora` folds them into the base weights: W' = W + (alpha/rank)·B·A.
Loading a base model and writing the merged folder is checkpoint.merge_adapter's work, not this module's.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open
from torch import Tensor, nn

from .errors import CamelidError

DEFAULT_TARGETS = ("q_proj", "v_proj")
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."


class LoRALinear(nn.Module):
    """y = base(x) + dropout(x) A^T B^T * alpha / rank. B starts at zero, so the model starts unchanged."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, dtype=base.weight.dtype, device=base.weight.device)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, dtype=base.weight.dtype, device=base.weight.device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's default init
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        base.weight.requires_grad_(False)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> Tensor:  # code that reads `.weight` (dtype, device) still finds the base weight
        return self.base.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def merged_weight(self) -> Tensor:
        delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
        return (self.base.weight.float() + delta).to(self.base.weight.dtype)


def apply_lora(model: nn.Module, *, rank: int, alpha: float, dropout: float = 0.0,
               targets: Iterable[str] = DEFAULT_TARGETS) -> list[str]:
    """Freeze the model and swap each `nn.Linear` whose name ends with a target for a LoRALinear.
    Returns the swapped module names."""
    targets = tuple(targets)
    unknown = [t for t in targets if t not in ALL_TARGETS]
    if unknown:
        raise CamelidError(f"--lora-targets: unknown module {unknown[0]!r} (choose from {', '.join(ALL_TARGETS)})")
    if rank < 1:
        raise CamelidError(f"--lora-rank {rank}: must be at least 1")
    for p in model.parameters():
        p.requires_grad_(False)
    swapped = []
    for name, module in list(model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf in targets and isinstance(module, nn.Linear):
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, leaf, LoRALinear(module, rank, alpha, dropout))
            swapped.append(name)
    if not swapped:
        raise CamelidError(f"--lora-targets {','.join(targets)}: no such linear layers in the model")
    return swapped


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def peft_name(module: str, part: str) -> str:
    """PEFT's name of an adapter weight: `part` (lora_A or lora_B) of the layer named `module`, e.g.
    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight."""
    return f"{PEFT_PREFIX}{module}.{part}.weight"


def adapter_tensors(model: nn.Module) -> Iterable[tuple[str, Tensor]]:
    """(PEFT name, tensor) of every adapter weight."""
    for name, m in lora_modules(model).items():
        for part in ("lora_A", "lora_B"):
            yield peft_name(name, part), getattr(m, part).weight


def base_model_reference(source: Path) -> str:
    """What adapter_config.json names as the base: the absolute path, so peft's AutoPeftModelForCausalLM finds an HF
    folder from any working directory. (A GGUF base is named too, for camelid; peft cannot load a .gguf base.)"""
    return str(Path(source).expanduser().resolve())


def adapter_config(model: nn.Module, base_model: str) -> dict:
    mods = list(lora_modules(model).values())
    targets = sorted({n.rsplit(".", 1)[-1] for n in lora_modules(model)})
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": mods[0].rank, "lora_alpha": mods[0].alpha,
            "lora_dropout": mods[0].dropout.p if isinstance(mods[0].dropout, nn.Dropout) else 0.0,
            "target_modules": targets, "bias": "none", "fan_in_fan_out": False, "inference_mode": True}


def read_adapter_config(folder: Path) -> dict:
    """adapter_config.json of a LoRA adapter folder, checked (no weights read)."""
    cfg_path, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not cfg_path.is_file() or not weights.is_file():
        raise CamelidError(f"{folder}: not a LoRA adapter folder (needs adapter_config.json and adapter_model.safetensors)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise CamelidError(f"{cfg_path}: not readable JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type", "LORA") != "LORA":
        raise CamelidError(f"{cfg_path}: peft_type {cfg.get('peft_type') if isinstance(cfg, dict) else None!r} is not LORA")
    missing = [k for k in ("r", "lora_alpha", "target_modules") if k not in cfg]
    if missing:
        raise CamelidError(f"{cfg_path}: lacks {', '.join(missing)}")
    return cfg


def describe_adapter(path: Path) -> dict | None:
    """What `camelid info` shows of a LoRA adapter folder; None when `path` is not one (a model has config.json)."""
    path = Path(path)
    if not path.is_dir() or not (path / "adapter_config.json").is_file() or (path / "config.json").is_file():
        return None
    cfg = read_adapter_config(path)
    with safe_open(path / "adapter_model.safetensors", framework="pt") as f:
        n_tensors = len(list(f.keys()))
    targets = cfg["target_modules"]
    return {"path": str(path), "kind": "lora-adapter", "base_model": cfg.get("base_model_name_or_path"),
            "r": cfg["r"], "lora_alpha": cfg["lora_alpha"],
            "target_modules": sorted(targets) if isinstance(targets, list) else [targets], "tensors": n_tensors,
            "size_bytes": sum(f.stat().st_size for f in path.iterdir() if f.is_file())}


def read_adapter(folder: Path) -> tuple[dict, dict[str, Tensor]]:
    cfg = read_adapter_config(folder)
    with safe_open(folder / "adapter_model.safetensors", framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return cfg, tensors


def load_adapter(model: nn.Module, folder: Path) -> None:
    """Swap in LoRA layers as the adapter's config says and load its weights."""
    cfg, tensors = read_adapter(folder)
    apply_lora(model, rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), dropout=float(cfg.get("lora_dropout", 0.0)),
               targets=cfg["target_modules"])
    own = dict(adapter_tensors(model))
    missing = [n for n in own if n not in tensors]
    extra = [n for n in tensors if n not in own]
    if missing or extra:
        raise CamelidError(f"{folder}: adapter does not fit this model "
                           f"({'missing ' + missing[0] if missing else 'unexpected ' + extra[0]})")
    with torch.no_grad():
        for n, t in own.items():
            if tuple(tensors[n].shape) != tuple(t.shape):
                raise CamelidError(f"{folder}: adapter does not fit this model ({n} has shape "
                                   f"{tuple(tensors[n].shape)}, the model needs {tuple(t.shape)}): is it for another base?")
            t.copy_(tensors[n].to(t.dtype))


def merge_lora(model: nn.Module) -> None:
    """Replace every LoRALinear by a plain nn.Linear holding the merged weight (in place)."""
    with torch.no_grad():
        for name, m in lora_modules(model).items():
            parent_name, leaf = name.rsplit(".", 1)
            linear = m.base
            linear.weight.copy_(m.merged_weight())
            setattr(model.get_submodule(parent_name), leaf, linear)
