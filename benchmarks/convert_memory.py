"""Peak memory and throughput of `camelid convert` for three model sizes: the peak must not grow with the model.

Synthetic random LLaMA models (~0.3B, 1B, 3B parameters, bf16) are written as 2-shard Meta checkpoints,
then converted Meta -> HF -> EasyLM -> HF (Meta -> HF -> Meta -> HF when the EasyLM writer is not
installed). Each conversion runs in its own process, which reports its peak RSS (the process's
own VmHWM, which counts every resident page it ever had, mapped file pages included).

    python benchmarks/convert_memory.py [--sizes 0.3B,1B,3B] [--workdir /tmp]
    python benchmarks/convert_memory.py --sizes tiny      # smoke run
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from camelid.config import ModelConfig
from camelid.convert import expected_shapes
from camelid.formats import WRITERS, PlannedTensor, from_canonical, writer_for

SIZES = {  # OpenLLaMA-like shapes, LLaMA-2 vocabulary ("tiny": a seconds-long smoke run of the whole chain)
    "tiny": dict(hidden_size=256, intermediate_size=688, num_layers=2, num_heads=4, num_kv_heads=4),
    "0.3B": dict(hidden_size=1024, intermediate_size=2816, num_layers=16, num_heads=16, num_kv_heads=16),
    "1B": dict(hidden_size=2048, intermediate_size=5632, num_layers=16, num_heads=16, num_kv_heads=16),
    "3B": dict(hidden_size=3200, intermediate_size=8640, num_layers=26, num_heads=32, num_kv_heads=32),
}


def make_config(size: str) -> ModelConfig:
    return ModelConfig(vocab_size=32000, max_position_embeddings=2048, name=f"synthetic-{size}", **SIZES[size])


def write_meta_source(config: ModelConfig, out: Path) -> None:
    """Random bf16 weights streamed into Meta shards, one tensor at a time (not part of the measurement)."""
    shapes = expected_shapes(config)
    plan = [PlannedTensor(*_native(n, s, config), torch.bfloat16) for n, s in shapes.items()]
    writer = writer_for("meta", out, config, plan=plan, shards=2)
    g = torch.Generator().manual_seed(0)
    for name, shape in shapes.items():
        # randn in fp32 then a cast is the slow part; uniform bf16 noise is as good for moving bytes.
        t = torch.empty(shape, dtype=torch.bfloat16).uniform_(-0.05, 0.05, generator=g)
        writer.write(*from_canonical("meta", name, t, config.num_heads, config.num_kv_heads))
    writer.finish()


def _native(name: str, shape: tuple[int, ...], config: ModelConfig) -> tuple[str, tuple[int, ...]]:
    from camelid.formats import native_shape
    return native_shape("meta", name, shape)


def measure(src: str, out: Path, to: str, extra: list[str]) -> tuple[float, float, int]:
    """(seconds, peak RSS in MiB, bytes of output) of one conversion in a fresh process."""
    argv = ["convert", src, str(out), "--to", to, "--quiet", *extra]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _CHILD, *argv], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"conversion failed ({proc.returncode}): {' '.join(argv)}\n{proc.stderr}")
    size = out.stat().st_size if out.is_file() else sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return seconds, _peak_mib(proc.stdout), size


# The child reports its own high-water mark (VmHWM). ru_maxrss from wait4 would be wrong here: after
# fork + exec it keeps the parent's peak, and this parent held a whole synthetic tensor at a time.
_PRINT_HWM = "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
_CHILD = f"import sys; from camelid.cli import main; rc = main(sys.argv[1:]); {_PRINT_HWM}; sys.exit(rc)"


def _peak_mib(stdout: str) -> float:
    line = next(line for line in stdout.splitlines() if line.startswith("VmHWM"))
    return int(line.split()[1]) / 1024


def baseline_rss() -> float:
    """Peak RSS of a process that only imports camelid's converter: the fixed overhead."""
    code = f"from camelid.cli import build_parser; build_parser(); {_PRINT_HWM}"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return _peak_mib(proc.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="0.3B,1B,3B")
    ap.add_argument("--workdir", default=tempfile.gettempdir())
    args = ap.parse_args()
    middle = "easylm" if "easylm" in WRITERS else "meta"
    if middle == "meta":
        print("note: no EasyLM writer installed; measuring Meta -> HF -> Meta -> HF", file=sys.stderr)
    base = baseline_rss()
    rows = []
    for size in args.sizes.split(","):
        config = make_config(size)
        largest = max(torch.Size(s).numel() for s in expected_shapes(config).values()) * 2 / 2**20
        work = Path(tempfile.mkdtemp(prefix=f"camelid-bench-{size}-", dir=args.workdir))
        try:
            write_meta_source(config, work / "meta")
            (work / "config.json").write_text(json.dumps(config.to_hf_dict()))
            steps = [("meta", "hf", work / "meta", work / "hf1", []),
                     ("hf", middle, work / "hf1", work / ("mid.easylm" if middle == "easylm" else "mid"), []),
                     (middle, "hf", work / ("mid.easylm" if middle == "easylm" else "mid"), work / "hf2", [])]
            for src_fmt, to, src, out, extra in steps:
                spec = f"params::{src}" if src_fmt == "easylm" else str(src)
                if src_fmt == "easylm":  # a bare EasyLM file carries no config (hf1 is deleted by then)
                    extra = ["--config", str(work / "config.json")]
                seconds, rss, nbytes = measure(spec, out, to, extra)
                rows.append((size, config.num_params / 1e9, f"{src_fmt} -> {to}", nbytes / 1e9, largest, rss, seconds,
                             nbytes / 1e6 / seconds))
                print(f"{size:>5} {src_fmt:>6} -> {to:<6} {nbytes / 1e9:6.2f} GB  peak RSS {rss:7.0f} MiB  "
                      f"{seconds:6.1f} s  {nbytes / 1e6 / seconds:6.0f} MB/s", file=sys.stderr)
                if src != work / "meta" and src_fmt != "meta":
                    shutil.rmtree(src) if src.is_dir() else src.unlink()
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nFixed overhead (python + torch + camelid imported): {base:.0f} MiB peak RSS\n")
    print("| model | params | step | output | largest tensor | peak RSS | time | throughput |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for size, params, step, gb, largest, rss, seconds, mbs in rows:
        print(f"| {size} | {params:.2f} B | {step} | {gb:.2f} GB | {largest:.0f} MiB | {rss:.0f} MiB | {seconds:.1f} s | {mbs:.0f} MB/s |")


if __name__ == "__main__":
    main()
