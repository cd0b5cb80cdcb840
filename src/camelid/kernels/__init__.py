"""Native CPU kernels (C++, built as a PyTorch extension at first use and cached).

`ext()` is the compiled module, or None where it cannot be built (no compiler, no ninja, or
CAMELID_NO_KERNELS=1): camelid then runs the PyTorch reference path, slower, after one notice line.
The build takes ~1 minute once; later processes load the cached library in milliseconds. The cache folder
is $CAMELID_KERNELS_DIR, else ~/.cache/camelid/kernels (`make setup` builds it ahead of the tests), one
subfolder per build key: the CPU's flags, the compiler, torch and the sources, so a cache copied to another CPU
(or left by another checkout) is rebuilt, never loaded with instructions the CPU lacks.

Kernels (csrc/): `qmatmul`: products straight from GGUF Q4_0 / Q4_1 / Q8_0 blocks with activations rounded to
int8 per block of 32 (llama.cpp's Q8_0 activations), vpdpbusd (AVX512-VNNI / AVX-VNNI) or AVX2, threads through
ATen's parallel_for (qmatmul.cpp: decode-sized; gemm.cpp: prefill-sized, 8 rows x 16 tokens per step), and from
bfloat16 / float32 rows (a float model, dense.py); `repack`: 8 rows' blocks interleaved (repack.cpp);
`DecodePlan`: a whole decode step in one call (decode.cpp); `dequantize_rows`: embedding rows. Every kernel has its
PyTorch reference in blocks.py, which tests compare it with.
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import platform
import subprocess
import sys
from pathlib import Path

SOURCES = ("qmatmul.cpp", "gemm.cpp", "decode.cpp", "repack.cpp", "qmatmul.h")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-std=c++17")


def cache_root() -> Path:
    return Path(os.environ.get("CAMELID_KERNELS_DIR") or Path.home() / ".cache" / "camelid" / "kernels")


def cache_dir() -> Path:
    """The build folder for this CPU, compiler, torch and these sources."""
    return cache_root() / build_key(cpu_flags(), compiler_version())


def cpu_flags() -> str:
    """The CPU's instruction-set flags (-march=native compiles for exactly these)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


@functools.cache
def compiler_version() -> str:
    """First line of `$CXX --version` (the compiler torch's extension builder uses), or '' where there is none."""
    try:
        out = subprocess.run([os.environ.get("CXX", "c++"), "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.splitlines()[0] if out.stdout else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def build_key(flags: str, compiler: str) -> str:
    """16 hex digits naming one build: CPU flags, compiler, torch version, compile flags and source contents."""
    import torch

    h = hashlib.sha256()
    src = Path(__file__).parent / "csrc"
    # The source folder too: torch's build files name the sources by path, so two checkouts sharing one build
    # folder would rebuild each other's library on every first use.
    for part in (flags, compiler, torch.__version__, " ".join(FLAGS), str(src.resolve())):
        h.update(part.encode() + b"\0")
    for name in SOURCES:
        h.update((src / name).read_bytes() + b"\0")
    return h.hexdigest()[:16]


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
    # -march=native: the build happens on the machine that runs it (first use), so use all of its vector units;
    # the folder's key names this CPU's flags, so another CPU never loads it.
    # torch's own lock file outlives a build killed midway (Ctrl-C, a timeout), and every later first use would
    # then wait on it forever; an OS lock, which dies with its process, serialises builds instead.
    with open(folder / "build.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        (folder / "lock").unlink(missing_ok=True)
        return cpp_extension.load("camelid_kernels", [str(src / s) for s in SOURCES if s.endswith(".cpp")],
                                  extra_cflags=list(FLAGS),
                                  extra_ldflags=["-fopenmp"], build_directory=str(folder), verbose=verbose)


def available() -> bool:
    return ext() is not None


def _notice(reason: str) -> None:
    print(f"camelid: notice: native kernels unavailable ({reason}); running the slower PyTorch path", file=sys.stderr)
