"""Native CPU kernels (C++, built as a PyTorch extension at first use and cached).

`ext()` is the compiled module, or None where it cannot be built (no compiler, no ninja, or
CAMELID_NO_KERNELS=1): camelid then runs the PyTorch reference path, slower, after one notice line.
The build takes ~1 minute once; later processes load the cached library in milliseconds. The cache folder
is $CAMELID_KERNELS_DIR, else ~/.cache/camelid/kernels (`make setup` builds it ahead of the tests).

Kernels (csrc/): `qmatmul`: products straight from GGUF Q4_0 / Q4_1 / Q8_0 blocks with activations rounded to
int8 per block of 32 (llama.cpp's Q8_0 activations), vpdpbusd (AVX512-VNNI / AVX-VNNI) or AVX2, threads through
ATen's parallel_for; `DecodePlan`: a whole decode step in one call (decode.cpp); `dequantize_rows`: embedding rows.
Every kernel has its PyTorch reference in blocks.py, which tests compare it with.
"""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

SOURCES = ("qmatmul.cpp", "decode.cpp")


def cache_dir() -> Path:
    return Path(os.environ.get("CAMELID_KERNELS_DIR") or Path.home() / ".cache" / "camelid" / "kernels")


@functools.cache
def ext():
    """The compiled extension, or None (after one notice on stderr) where it is disabled or cannot be built."""
    if os.environ.get("CAMELID_NO_KERNELS", "") not in ("", "0"):
        _notice("CAMELID_NO_KERNELS is set")
        return None
    try:
        return build()
    except Exception as e:  # a missing compiler, ninja or header: run the reference path instead
        _notice(f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}")
        return None


def build(verbose: bool = False):
    """Compile (or load the cached build of) the extension; raises where it cannot be built."""
    from torch.utils import cpp_extension

    src = Path(__file__).parent / "csrc"
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    # -march=native: the build happens on the machine that runs it (first use), so use all of its vector units.
    flags = ["-O3", "-march=native", "-fopenmp", "-std=c++17"]
    return cpp_extension.load("camelid_kernels", [str(src / s) for s in SOURCES], extra_cflags=flags,
                              extra_ldflags=["-fopenmp"], build_directory=str(folder), verbose=verbose)


def available() -> bool:
    return ext() is not None


def _notice(reason: str) -> None:
    print(f"camelid: notice: native kernels unavailable ({reason}); running the slower PyTorch path", file=sys.stderr)
