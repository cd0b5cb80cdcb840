"""Loading tiny random models from real HF folders and GGUF files; bad input gives one clear error."""
from __future__ import annotations

import copy
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from camelid.engine import load_model
from camelid.errors import CamelidError
from .builders import reference, write_gguf

TOKENS = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38]])


@pytest.fixture(scope="module")
def ref():
    return reference("gqa")


def logits_of(path) -> torch.Tensor:
    with torch.no_grad():
        return load_model(path).model(TOKENS)


def test_hf_folder_safetensors_sharded_and_bin(ref, tmp_path: Path) -> None:
    with torch.no_grad():
        expected = ref(TOKENS).logits
    ref.save_pretrained(tmp_path / "single")
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "single" / "config.json").read_text())
    torch.save(ref.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    for folder in ("single", "sharded", "bin"):
        assert (logits_of(tmp_path / folder) - expected).abs().max().item() < 1e-4, folder


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"])
def test_gguf_tiny_model_types(ref, tmp_path: Path, qtype: str) -> None:
    """Logits equal transformers' model holding the weights as gguf-py itself quantizes and dequantizes them."""
    kind = gguf.GGMLQuantizationType[qtype]
    rounded = copy.deepcopy(ref)
    with torch.no_grad():
        for p in rounded.parameters():
            if p.ndim == 2:
                arr = p.numpy()
                if kind == gguf.GGMLQuantizationType.F16:
                    arr = arr.astype(np.float16).astype(np.float32)
                elif kind != gguf.GGMLQuantizationType.F32:
                    arr = gguf.quants.dequantize(gguf.quants.quantize(arr, kind), kind)
                p.copy_(torch.from_numpy(arr))
        expected = rounded(TOKENS).logits
    diff = (logits_of(write_gguf(ref, tmp_path / "m.gguf", kind)) - expected).abs().max().item()
    assert diff < 1e-4, f"{qtype}: {diff}"


def test_gguf_k_quant_tensors_decode_like_gguf_py(tmp_path: Path) -> None:
    # gguf-py cannot quantize K types, so write random K blocks and check our reader's shapes and values.
    from camelid.formats.gguf import GGUFReader
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    for qtype in (gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q5_K, gguf.GGMLQuantizationType.Q6_K):
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 255, size=(4, 512 // block * type_size), dtype=np.uint8)
        raw.reshape(4, -1, type_size)[:, :, :2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)  # sane scale
        w.add_tensor(qtype.name, raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    reader = GGUFReader(tmp_path / "k.gguf")
    for name in ("Q4_K", "Q5_K", "Q6_K"):
        data, qtype, shape = reader.raw(name)
        assert shape == (4, 512)
        assert torch.equal(reader.read(name), torch.from_numpy(gguf.quants.dequantize(data, qtype)).reshape(shape))


def test_bad_inputs_give_one_clear_error(ref, tmp_path: Path) -> None:
    with pytest.raises(CamelidError, match="no such file or folder"):
        load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CamelidError, match="no checkpoint found"):
        load_model(tmp_path / "empty")

    good = write_gguf(ref, tmp_path / "good.gguf")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CamelidError, match="truncated.gguf"):
        load_model(truncated)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(CamelidError, match="garbage.gguf"):
        load_model(garbage)

    with pytest.raises(CamelidError, match="GGUF type MXFP4"):  # Q5_0/Q5_1 are read (llama.cpp's K-quant fallbacks)
        load_model(write_gguf(ref, tmp_path / "mxfp4.gguf", gguf.GGMLQuantizationType.MXFP4))

    ref.save_pretrained(tmp_path / "hf")
    st = tmp_path / "hf" / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])
    with pytest.raises(CamelidError, match="model.safetensors"):
        load_model(tmp_path / "hf")

    ref.save_pretrained(tmp_path / "wrong")
    config = (tmp_path / "wrong" / "config.json")
    config.write_text(config.read_text().replace('"intermediate_size": 160', '"intermediate_size": 128'))
    with pytest.raises(CamelidError, match="mlp.*has shape .* but the config implies"):
        load_model(tmp_path / "wrong")

    (tmp_path / "noconfig").mkdir()
    save_file({"model.norm.weight": torch.ones(64)}, tmp_path / "noconfig" / "model.safetensors")
    with pytest.raises(CamelidError, match=r"carries no model config \(no config.json"):
        load_model(tmp_path / "noconfig")
