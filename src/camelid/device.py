"""Where and how inference runs: the device (`--device cpu|cuda|auto`), its default compute dtype, the
CPU thread count (`--threads`), and whether the CPU has native bf16 arithmetic."""
from __future__ import annotations

import torch

from .errors import CamelidError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str | None) -> torch.device:
    """`auto` (or None): CUDA when a GPU is usable, else the CPU; `cuda` without a GPU is a clear error."""
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind = name.split(":")[0]
    if kind not in ("cpu", "cuda"):
        raise CamelidError(f"--device {name}: unknown device (choose from {', '.join(DEVICES)})")
    if kind == "cuda" and not torch.cuda.is_available():
        why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise CamelidError(f"--device {name}: {why}; use --device cpu (or auto)")
    device = torch.device(name)
    if kind == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CamelidError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return device


def cpu_has_bf16() -> bool:
    """True when the CPU computes in bf16 natively (AVX512-BF16 or AMX), where bf16 halves decode's memory traffic."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def default_dtype(device: torch.device, name: str | None = None) -> torch.dtype:
    """The compute dtype: the one named, else bfloat16 on CUDA and float32 on the CPU."""
    if name and name != "auto":
        return getattr(torch, name)
    if name == "auto" and device.type == "cpu":
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def set_threads(n: int | None) -> None:
    """torch's intra-op thread count (`--threads N`); None leaves torch's default."""
    if n is None:
        return
    if n < 1:
        raise CamelidError(f"--threads must be >= 1, got {n}")
    torch.set_num_threads(n)
