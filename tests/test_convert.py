"""`camelid convert` end to end through the CLI: chains of formats, atomic output under SIGTERM,
and one clear line (exit code 2) for every bad input."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from camelid.config import ModelConfig
from .builders import write_hf
from .helpers import interrupt_midway, one_line_error as assert_one_line_error, run_camelid


def run(camelid_bin: Path, *args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return run_camelid(camelid_bin, "convert", *args, "--quiet", cwd=cwd, timeout=120)


def test_cli_chain_hf_meta_gguf_hf(camelid_bin: Path, tmp_path: Path, llama2_tokenizer_dir: Path) -> None:
    config = ModelConfig.from_name("llama-2-70b").tiny(vocab_size=32000, num_kv_heads=2)  # GQA
    src = tmp_path / "src"
    tensors = write_hf(src, config)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(llama2_tokenizer_dir / f, src / f)
    proc = run(camelid_bin, src, tmp_path / "meta", "--to", "meta", "--shards", "2", "--dtype", "bfloat16")
    assert proc.returncode == 0 and "wrote" in proc.stdout, proc.stderr
    # camelid's Meta output keeps the source's tokenizer files beside the shards; a Meta folder without
    # them needs --tokenizer for the GGUF vocabulary.
    assert (tmp_path / "meta" / "tokenizer.json").is_file()
    bare = tmp_path / "bare-meta"
    shutil.copytree(tmp_path / "meta", bare)
    for f in bare.glob("tokenizer*"):
        f.unlink()
    proc = run(camelid_bin, bare, tmp_path / "m.gguf", "--to", "gguf")
    assert_one_line_error(proc, "--tokenizer")
    assert not (tmp_path / "m.gguf").exists()
    proc = run(camelid_bin, bare, tmp_path / "m.gguf", "--to", "gguf", "--tokenizer", src)
    assert proc.returncode == 0, proc.stderr
    proc = run(camelid_bin, tmp_path / "m.gguf", tmp_path / "back", "--to", "hf", "--dtype", "bfloat16")
    assert proc.returncode == 0, proc.stderr
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert torch.equal(back[name], t.to(torch.bfloat16)), name
    described = json.loads((tmp_path / "back" / "camelid.json").read_text())
    assert described["source_format"] == "gguf" and described["dtype"] == "bfloat16"
    first = json.loads((tmp_path / "meta" / "camelid.json").read_text())
    assert first["sha256"] == described["sha256"]  # the same canonical tensors all along


def test_sigterm_midway_leaves_no_output(camelid_bin: Path, tmp_path: Path, llama2_tokenizer_dir: Path) -> None:
    # Big enough that Q4_0 quantization (numpy, in gguf) takes several seconds.
    config = ModelConfig.from_name("llama-7b").tiny(vocab_size=32000, hidden_size=512, intermediate_size=1536,
                                                    num_layers=16, num_heads=8, num_kv_heads=8, head_dim=64)
    src = tmp_path / "src"
    write_hf(src, config)
    shutil.copyfile(llama2_tokenizer_dir / "tokenizer.json", src / "tokenizer.json")
    proc = subprocess.Popen([str(camelid_bin), "convert", str(src), str(tmp_path / "m.gguf"), "--to", "gguf",
                             "--quant", "q4_0", "--quiet"], stderr=subprocess.PIPE, text=True)
    interrupt_midway(proc, tmp_path, ".m.gguf.tmp-*", "conversion")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bad") / "src"
    write_hf(folder, ModelConfig.from_name("llama-7b").tiny())
    return folder


def test_missing_source(camelid_bin: Path, tmp_path: Path) -> None:
    assert_one_line_error(run(camelid_bin, tmp_path / "nope", tmp_path / "out", "--to", "hf"), "nope", "no such")


def test_existing_output_needs_force(camelid_bin: Path, tiny_src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_one_line_error(run(camelid_bin, tiny_src, out, "--to", "meta"), "already exists", "--force")
    assert (out / "keep.txt").read_text() == "mine"
    assert run(camelid_bin, tiny_src, out, "--to", "meta", "--force").returncode == 0
    assert (out / "consolidated.00.pth").is_file() and not (out / "keep.txt").exists()


def test_unknown_tensor(camelid_bin: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_hf(src, ModelConfig.from_name("llama-7b").tiny(), extra={"model.layers.0.self_attn.q_bias": torch.zeros(64)})
    assert_one_line_error(run(camelid_bin, src, tmp_path / "out", "--to", "meta"), "model.layers.0.self_attn.q_bias")
    assert not (tmp_path / "out").exists()


def test_shape_mismatch(camelid_bin: Path, tiny_src: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(tiny_src, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 192
    (src / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(run(camelid_bin, src, tmp_path / "out", "--to", "hf"), "mlp.", "shape", "(64, 192)")


def test_config_needed_and_options_checked(camelid_bin: Path, tiny_src: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(tiny_src, src)
    (src / "config.json").unlink()
    assert_one_line_error(run(camelid_bin, src, tmp_path / "out", "--to", "meta"), "--config")
    assert_one_line_error(run(camelid_bin, src, tmp_path / "out", "--to", "meta", "--config", "7b"), "shape")
    ok = run(camelid_bin, src, tmp_path / "out", "--to", "meta", "--config", tiny_src / "config.json")
    assert ok.returncode == 0, ok.stderr
    assert_one_line_error(run(camelid_bin, tiny_src, tmp_path / "o2", "--to", "hf", "--quant", "q4_0"), "--quant")
    weird = tmp_path / "weights.xyz"
    weird.write_bytes(b"\0" * 16)
    assert_one_line_error(run(camelid_bin, weird, tmp_path / "o3", "--to", "hf"), "weights.xyz")
    assert_one_line_error(run(camelid_bin, f"nosuch::{weird}", tmp_path / "o3", "--to", "hf"), "nosuch::")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src", "weights.xyz"]


def test_layout_options_are_checked_not_ignored(camelid_bin: Path, tmp_path: Path) -> None:
    config = ModelConfig.from_name("7b").tiny()
    write_hf(tmp_path / "src", config)
    assert_one_line_error(run(camelid_bin, tmp_path / "src", tmp_path / "o", "--to", "hf", "--shards", "2"),
                          "--shards", "--shard-size")
    assert_one_line_error(run(camelid_bin, tmp_path / "src", tmp_path / "o", "--to", "meta", "--shards", "0"),
                          "--shards 0")
    assert_one_line_error(run(camelid_bin, tmp_path / "src", tmp_path / "o", "--to", "meta", "--shard-size", "1MB"),
                          "--shard-size")
    assert not (tmp_path / "o").exists()


def test_flm_float16_stays_float16_and_the_summary_gives_the_size_on_disk(camelid_bin: Path, tmp_path: Path,
                                                                         llama2_tokenizer_dir: Path) -> None:
    config = ModelConfig.from_name("llama-2-7b").tiny(vocab_size=32000)
    write_hf(tmp_path / "src", config)
    shutil.copyfile(llama2_tokenizer_dir / "tokenizer.json", tmp_path / "src" / "tokenizer.json")
    assert run(camelid_bin, tmp_path / "src", tmp_path / "m.flm", "--to", "flm", "--dtype", "float16").returncode == 0
    proc = run(camelid_bin, tmp_path / "m.flm", tmp_path / "back", "--to", "hf")
    assert proc.returncode == 0, proc.stderr
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert back["model.layers.0.mlp.up_proj.weight"].dtype == torch.float16
    proc = run(camelid_bin, tmp_path / "src", tmp_path / "q.gguf", "--to", "gguf", "--quant", "q8_0")
    assert proc.returncode == 0, proc.stderr
    assert f"{(tmp_path / 'q.gguf').stat().st_size / 1e6:.1f} MB" in proc.stdout, proc.stdout
