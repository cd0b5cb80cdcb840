"""EasyLM checkpoints: our files are byte for byte what EasyLM's StreamingCheckpointer writes (expected bytes
built here from msgpack + numpy following flax.serialization's rules), round trips through `camelid convert`
are bit exact, train-state and flax msgpack files read, and bad input gives one clear line (exit code 2)."""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import tracemalloc
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from camelid.config import ModelConfig
from camelid.convert import expected_shapes
from camelid.formats import easylm
from .helpers import one_line_error as assert_one_line_error, run_camelid

CONFIG = ModelConfig.from_name("llama-2-70b").tiny(vocab_size=300, num_kv_heads=2)  # GQA: k has fewer heads than q


# ---- flax / EasyLM encoding rules, written out independently of camelid ----------------------------
def np_bf16_rne(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), round to nearest, ties to even (what jnp.astype(bfloat16) does)."""
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def flax_array(arr: np.ndarray, dtype_name: str) -> msgpack.ExtType:
    """flax _msgpack_ext_pack of an ndarray (bf16 arrays come as uint16 bits, named 'bfloat16')."""
    return msgpack.ExtType(1, msgpack.packb((arr.shape, dtype_name, arr.tobytes("C")), use_bin_type=True))


def flax_to_bytes(arr: np.ndarray, dtype_name: str, max_chunk: int = 2**30) -> bytes:
    """flax.serialization.to_bytes(array): one ext, or the chunked-array map above max_chunk bytes."""
    if arr.size * arr.dtype.itemsize > max_chunk:
        n = max(1, int(max_chunk / arr.dtype.itemsize))
        flat = arr.reshape(-1)
        doc = {"__msgpack_chunked_array__": True, "shape": {str(i): d for i, d in enumerate(arr.shape)},
               "chunks": {str(j): flax_array(flat[i:i + n], dtype_name) for j, i in enumerate(range(0, flat.size, n))}}
        return msgpack.packb(doc, use_bin_type=True, strict_types=True)
    return msgpack.packb(flax_array(arr, dtype_name), use_bin_type=True)


def streaming_record(key: tuple[str, ...], value: bytes) -> bytes:
    return msgpack.Packer().pack((key, value))  # StreamingCheckpointer: packer.pack((key, to_bytes(value)))


def as_stored(t: torch.Tensor, dtype: str) -> np.ndarray:
    x = t.numpy()
    return {"float32": lambda: x.astype(np.float32), "float16": lambda: x.astype(np.float16),
            "bfloat16": lambda: np_bf16_rne(x)}[dtype]()


EASYLM_OF_HF = {"self_attn.q_proj.weight": "attention/wq/kernel", "self_attn.k_proj.weight": "attention/wk/kernel",
                "self_attn.v_proj.weight": "attention/wv/kernel", "self_attn.o_proj.weight": "attention/wo/kernel",
                "mlp.gate_proj.weight": "feed_forward/w1/kernel", "mlp.up_proj.weight": "feed_forward/w3/kernel",
                "mlp.down_proj.weight": "feed_forward/w2/kernel", "input_layernorm.weight": "attention_norm/kernel",
                "post_attention_layernorm.weight": "ffn_norm/kernel"}


def easylm_params(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[tuple[str, ...], torch.Tensor]:
    """HF tensors -> EasyLM's params as its convert_hf_to_easylm.py lays them out (permute q/k, transpose kernels)."""
    def permute(w: torch.Tensor, n: int) -> torch.Tensor:
        out, inp = w.shape
        return w.reshape(n, 2, out // n // 2, inp).permute(0, 2, 1, 3).reshape(out, inp)

    params = {("transformer", "wte", "embedding"): hf["model.embed_tokens.weight"],
              ("transformer", "ln_f", "kernel"): hf["model.norm.weight"], ("lm_head", "kernel"): hf["lm_head.weight"].T}
    for i in range(cfg.num_layers):
        for suffix, native in EASYLM_OF_HF.items():
            w = hf[f"model.layers.{i}.{suffix}"]
            if suffix.startswith("self_attn.q"):
                w = permute(w, cfg.num_heads)
            elif suffix.startswith("self_attn.k"):
                w = permute(w, cfg.num_kv_heads)
            params[("transformer", "h", str(i), *native.split("/"))] = w.T if w.ndim == 2 else w
    return params


# ---- helpers ----------------------------------------------------------------------------------------
def write_hf(folder: Path, cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tensors = {n: torch.randn(s, generator=g) * 0.02 for n, s in expected_shapes(cfg).items()}
    # Exact bf16 ties (low 16 bits 0x8000) with even and odd upper halves: truncation or ties-away would differ.
    ties = torch.tensor([0x3F808000, 0x3F818000, 0xBF808000, 0xBF818000, 0x3C238000], dtype=torch.int64)
    tensors["model.layers.0.mlp.up_proj.weight"].view(-1)[:5] = ties.to(torch.int32).view(torch.float32)
    folder.mkdir(parents=True)
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    return tensors


def convert(camelid_bin: Path, *args) -> subprocess.CompletedProcess:
    return run_camelid(camelid_bin, "convert", *args, "--quiet", timeout=120)


def cli(*args) -> subprocess.CompletedProcess:
    """The same `camelid convert` in this process (saves starting python + torch for each error case)."""
    from camelid.cli import main
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        rc = main(["convert", *map(str, args), "--quiet"])
    return subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())


def record_keys(data: bytes) -> list[tuple[str, ...]]:
    """Keys in file order, read the way EasyLM's load_checkpoint reads (a plain msgpack.Unpacker)."""
    return [tuple(key) for key, _ in msgpack.Unpacker(io.BytesIO(data), max_buffer_size=0)]


@pytest.fixture(scope="module")
def hf_src(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    folder = tmp_path_factory.mktemp("easylm") / "src"
    return folder, write_hf(folder, CONFIG)


# ---- tests ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_bytes_identical_to_easylm_and_round_trip(camelid_bin: Path, hf_src, tmp_path: Path, dtype: str) -> None:
    src, tensors = hf_src
    out = tmp_path / "model.easylm"
    proc = convert(camelid_bin, src, out, "--to", "easylm", "--dtype", dtype)
    assert proc.returncode == 0, proc.stderr
    data = out.read_bytes()
    params = easylm_params(tensors, CONFIG)
    keys = record_keys(data)
    assert sorted(keys) == sorted(params)
    expected = b"".join(streaming_record(k, flax_to_bytes(as_stored(params[k], dtype), dtype)) for k in keys)
    assert data == expected
    # bf16 is round-to-nearest-even of the float32 weights: the tie values land on the even neighbour.
    if dtype == "bfloat16":
        assert np_bf16_rne(np.array([0x3F808000, 0x3F818000], np.uint32).view(np.float32)).tolist() == [0x3F80, 0x3F82]

    back = tmp_path / "back"
    proc = convert(camelid_bin, f"params::{out}", back, "--to", "hf", "--config", src / "config.json")
    assert proc.returncode == 0, proc.stderr
    restored = load_file(back / "model.safetensors")
    assert restored.keys() == tensors.keys()
    for name, t in tensors.items():
        assert torch.equal(restored[name], t.to(getattr(torch, dtype))), name


def test_chunked_arrays_bytes_and_read_back(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(easylm, "MAX_CHUNK_SIZE", 102)  # int(102 / itemsize) elements per chunk, a short last one
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 9, generator=g)
    cases = {"a/f32/kernel": ("float32", x), "a/f16/kernel": ("float16", x.half()),
             "b/bf16/kernel": ("bfloat16", x.bfloat16()), "c/small/kernel": ("float32", x[0, :5]),  # 20 bytes: not chunked
             "c/exact/kernel": ("float16", torch.randn(51, generator=g).half())}  # 102 bytes: not chunked (flax: > limit)
    out = tmp_path / "streaming_params"
    writer = easylm.EasyLMWriter(out, CONFIG)
    for name, (_, t) in cases.items():
        writer.write(name, t)
    writer.finish()
    expected = b""
    for name, (dtype, t) in cases.items():
        arr = t.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else t.numpy()
        expected += streaming_record(tuple(name.split("/")), flax_to_bytes(arr, dtype, max_chunk=102))
    assert out.read_bytes() == expected
    assert b"__msgpack_chunked_array__" in expected  # the chunked layout was really exercised
    reader = easylm.EasyLMReader(out, prefix="params")
    assert reader.tensors()["b/bf16/kernel"].dtype == "BF16" and reader.tensors()["a/f32/kernel"].shape == (7, 9)
    for name, (_, t) in cases.items():
        got = reader.read(name)
        assert got.dtype == t.dtype and torch.equal(got, t), name


def test_folder_output_logits_match_transformers(camelid_bin: Path, tmp_path: Path, llama2_tokenizer_dir: Path) -> None:
    from transformers import LlamaForCausalLM
    cfg = CONFIG.tiny(vocab_size=32000, num_kv_heads=2)
    src = tmp_path / "src"
    write_hf(src, cfg, seed=3)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(llama2_tokenizer_dir / f, src / f)
    bare = tmp_path / "streaming_params"  # a bare file: names neither config nor tokenizer
    assert convert(camelid_bin, src, bare, "--to", "easylm").returncode == 0
    # Opening indexes the records without reading tensor data: far less memory than the 8 MB embedding.
    tracemalloc.start()
    reader = easylm.EasyLMReader(bare, prefix="params")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert reader.tensors()["transformer/wte/embedding"].shape == (32000, 64) and peak < 2**20, peak
    assert_one_line_error(cli(f"params::{bare}", tmp_path / "x", "--to", "hf"), "--config")
    assert_one_line_error(cli(f"params::{bare}", tmp_path / "x.gguf", "--to", "gguf",
                                  "--config", src / "config.json"), "--tokenizer")
    proc = convert(camelid_bin, f"params::{bare}", tmp_path / "hf1", "--to", "hf", "--config", src / "config.json",
                   "--tokenizer", src)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "hf1" / "tokenizer.json").is_file()
    # A folder output describes itself (config.json, tokenizer, camelid.json): no options needed to read it back.
    assert convert(camelid_bin, src, tmp_path / "ez", "--to", "easylm").returncode == 0
    assert {"streaming_params", "config.json", "tokenizer.json", "camelid.json"} <= {
        p.name for p in (tmp_path / "ez").iterdir()}
    assert json.loads((tmp_path / "ez" / "camelid.json").read_text())["format"] == "easylm"
    proc = convert(camelid_bin, f"params::{tmp_path / 'ez'}", tmp_path / "hf2", "--to", "hf")
    assert proc.returncode == 0, proc.stderr
    ids = torch.tensor([[1, 450, 4996, 17354, 1701, 432, 17204, 975, 278, 17366, 11203]])
    with torch.no_grad():
        want = LlamaForCausalLM.from_pretrained(src).eval()(ids).logits
        for folder in ("hf1", "hf2"):
            got = LlamaForCausalLM.from_pretrained(tmp_path / folder).eval()(ids).logits
            assert torch.equal(got, want), folder
    assert (tmp_path / "hf2" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()


def _bf16_bits(t: torch.Tensor) -> np.ndarray:
    return np_bf16_rne(t.numpy())


def test_trainstate_and_flax_params_files(hf_src, tmp_path: Path) -> None:
    src, tensors = hf_src
    params = easylm_params(tensors, CONFIG)
    # A train state as EasyLM saves it with float_dtype=bf16: step, params under ('params', 'params'), Adam moments.
    state = [streaming_record(("step",), flax_to_bytes(np.array(1234, np.int32), "int32"))]
    for k, w in params.items():
        state.append(streaming_record(("params", "params", *k), flax_to_bytes(_bf16_bits(w), "bfloat16")))
        state.append(streaming_record(("opt_state", "1", "0", "mu", "params", *k),
                                      flax_to_bytes(_bf16_bits(w * 0.1), "bfloat16")))
    state.append(streaming_record(("opt_state", "1", "0", "count"), flax_to_bytes(np.array(1234, np.int32), "int32")))
    ts = tmp_path / "streaming_train_state"
    ts.write_bytes(b"".join(state))
    # One flax msgpack document (msgpack_serialize of the nested params), the embedding chunked as flax would.
    tree: dict = {}
    for k, w in params.items():
        node = tree
        for part in k[:-1]:
            node = node.setdefault(part, {})
        node[k[-1]] = flax_array(w.numpy(), "float32")
    emb = params[("transformer", "wte", "embedding")].numpy()
    tree["transformer"]["wte"]["embedding"] = msgpack.unpackb(flax_to_bytes(emb, "float32", max_chunk=4000),
                                                             strict_map_key=False)
    fp = tmp_path / "flax_params.msgpack"
    fp.write_bytes(msgpack.packb(tree, use_bin_type=True))
    plain = tmp_path / "streaming_params"
    assert cli(src, plain, "--to", "easylm").returncode == 0
    # msgpack < 1.0 packed the value bytes as a str (use_bin_type=False was its default).
    legacy = tmp_path / "legacy_params"
    legacy.write_bytes(b"".join(msgpack.packb((k, flax_to_bytes(w.numpy(), "float32")), use_bin_type=False)
                                for k, w in params.items()))

    cfg = ("--config", src / "config.json")
    for spec, want_dtype in ((f"trainstate::{ts}", torch.bfloat16), (f"trainstate_params::{ts}", torch.bfloat16),
                             (f"flax_params::{fp}", torch.float32), (f"params::{legacy}", torch.float32)):
        out = tmp_path / f"{spec.split('::')[0]}-{Path(spec).name}"
        proc = cli(spec, out, "--to", "hf", *cfg)
        assert proc.returncode == 0, proc.stderr
        restored = load_file(out / "model.safetensors")
        assert restored.keys() == tensors.keys()
        for name, t in tensors.items():
            assert torch.equal(restored[name], t.to(want_dtype)), (spec, name)
    reader = easylm.EasyLMReader(ts, prefix="trainstate")
    assert reader.metadata["step"] == 1234 and "opt_state/1/0/count" in reader.tensors()
    assert all(not n.startswith(("opt_state", "step")) for n in easylm.EasyLMReader(ts, prefix="trainstate_params").tensors())

    # The wrong load spec for a file: one line naming the spec to use, nothing written.
    assert_one_line_error(cli(f"params::{ts}", tmp_path / "w1", "--to", "hf", *cfg),
                          f"trainstate_params::{ts}")
    assert_one_line_error(cli(f"trainstate_params::{plain}", tmp_path / "w2", "--to", "hf", *cfg),
                          f"params::{plain}")
    assert_one_line_error(cli(f"trainstate::{plain}", tmp_path / "w3", "--to", "hf", *cfg),
                          f"params::{plain}")
    assert_one_line_error(cli(f"params::{fp}", tmp_path / "w4", "--to", "hf", *cfg),
                          f"flax_params::{fp}")
    assert_one_line_error(cli(f"flax_params::{plain}", tmp_path / "w5", "--to", "hf", *cfg),
                          f"params::{plain}")
    assert not any((tmp_path / f"w{i}").exists() for i in range(1, 6))


def test_truncated_and_foreign_files(hf_src, tmp_path: Path) -> None:
    src, _ = hf_src
    full = tmp_path / "full.easylm"
    assert cli(src, full, "--to", "easylm").returncode == 0
    data = full.read_bytes()
    cfg = ("--config", src / "config.json")
    for cut in (len(data) - 100, 40, 5):  # inside the last tensor's bytes, inside a header, inside the first key
        bad = tmp_path / f"cut{cut}"
        bad.write_bytes(data[:cut])
        assert_one_line_error(cli(f"params::{bad}", tmp_path / "o", "--to", "hf", *cfg),
                              str(bad), "truncated")
    # Cut exactly between records: a valid file that lacks tensors.
    first = len(streaming_record(*next((tuple(k), v) for k, v in msgpack.Unpacker(io.BytesIO(data)))))
    short = tmp_path / "short"
    short.write_bytes(data[:first])
    assert_one_line_error(cli(f"params::{short}", tmp_path / "o", "--to", "hf", *cfg), "missing")
    foreign = tmp_path / "model.safetensors"
    shutil.copyfile(src / "model.safetensors", foreign)
    assert_one_line_error(cli(f"params::{foreign}", tmp_path / "o", "--to", "hf", *cfg),
                          "not an EasyLM checkpoint")
    assert not (tmp_path / "o").exists()
