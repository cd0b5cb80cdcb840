"""What a checkpoint carries besides its tensors: the tokenizer files, the chat template and the GGUF
tokenizer keys, and the model config. The one owner of those questions for convert, quantize, diff/delta,
lora merge and the inference loader (engine).

Every source yields the same complete set, whatever it stores:
  * an HF folder (or a Meta / EasyLM / .flm source with files beside it): its files, as they are;
  * a GGUF file: tokenizer.json rebuilt from the vocabulary in its metadata, plus the metadata itself
    (so GGUF -> GGUF copies the vocabulary key by key);
  * a .flm file: the tokenizer rebuilt from its vocabulary (flm_vocab.rebuild_tokenizer);
  * `--tokenizer X`: a tokenizer file, a folder, or a .gguf / .flm whose vocabulary is taken (not the file).
Missing companions are filled in from the tokenizer itself: tokenizer_config.json (bos/eos/pad, add_bos and
the chat template) and special_tokens_map.json, so transformers' AutoTokenizer loads what we write.
The chat template comes from chat_template.jinja (transformers 5's file), else tokenizer_config.json, else
the GGUF's tokenizer.chat_template, and travels to every output.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ModelConfig
from ..errors import CamelidError
from .. import gguf_vocab

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja")
VOCAB_FILES = ("tokenizer.json", "tokenizer.model")


@dataclass
class Carried:
    """Tokenizer files (name -> path), the chat template, and GGUF tokenizer.* keys when the source is a GGUF."""
    files: dict[str, Path] = field(default_factory=dict)
    chat_template: str | None = None
    gguf_metadata: dict[str, Any] = field(default_factory=dict)
    _tmp: Path | None = None

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> "Carried":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def scratch(self) -> Path:
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="camelid-tokenizer-"))
        return self._tmp


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CamelidError(f"{path}: cannot read JSON ({e})") from None
    return value if isinstance(value, dict) else {}


def _files_in(folder: Path) -> dict[str, Path]:
    found = {f: folder / f for f in TOKENIZER_FILES if (folder / f).is_file()}
    return found if any(f in found for f in VOCAB_FILES) else {}


def template_of(files: dict[str, Path], gguf_metadata: dict[str, Any] | None = None) -> str | None:
    """The chat template: chat_template.jinja, else tokenizer_config.json's (the default of named ones), else GGUF's."""
    if "chat_template.jinja" in files:
        return files["chat_template.jinja"].read_text(encoding="utf-8")
    if "tokenizer_config.json" in files:
        template = _read_json(files["tokenizer_config.json"]).get("chat_template")
        if isinstance(template, list):  # several named templates: keep the default one
            template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                            None)
        if template:
            return template
    return (gguf_metadata or {}).get("tokenizer.chat_template") or None


def write_tokenizer_files(tok: Any, folder: Path, *, saved: bool = False,
                          sentencepiece: bool = False) -> dict[str, Path]:
    """tokenizer.json (unless `saved`), tokenizer_config.json and special_tokens_map.json of a camelid
    Tokenizer in `folder`, as transformers writes them (AutoTokenizer loads the folder). `sentencepiece`:
    the vocabulary is a tokenizer.model (transformers' LlamaTokenizer reads it)."""
    if not saved:
        text = tok.tokenizer_json(pretty=True)
        if text is None:
            raise CamelidError("this tokenizer cannot be written as tokenizer.json")
        (folder / "tokenizer.json").write_text(text, encoding="utf-8")
    specials = {"bos_token": tok.bos_token, "eos_token": tok.eos_token,
                "pad_token": tok.id_to_token(tok.pad_id) if tok.pad_id is not None else None}
    unk = tok.token_to_id("<unk>")
    if unk is not None and tok.is_special(unk):
        specials["unk_token"] = "<unk>"
    specials = {k: v for k, v in specials.items() if v is not None}
    config = gguf_vocab.hf_tokenizer_config(specials, add_bos=tok.add_bos, chat_template=tok.chat_template,
                                            sentencepiece=sentencepiece)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, ensure_ascii=False) + "\n")
    return {f: folder / f for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
            if (folder / f).is_file()}


def _from_gguf(carried: Carried, metadata: dict[str, Any]) -> None:
    carried.gguf_metadata = {k: v for k, v in metadata.items() if k.startswith("tokenizer.")}
    if "tokenizer.ggml.tokens" not in metadata:
        return
    carried.files = gguf_vocab.write_hf_files(metadata, carried.scratch())


def _complete(carried: Carried) -> None:
    """Fill in tokenizer_config.json / special_tokens_map.json a folder lacks, and put the template in the
    config (transformers reads it there), all in the scratch folder; the source files are never touched."""
    files = carried.files
    if not files or ("tokenizer_config.json" in files and "special_tokens_map.json" in files
                     and (not carried.chat_template or _read_json(files["tokenizer_config.json"]).get("chat_template"))):
        return
    from ..tokenizer import Tokenizer
    source = files["tokenizer.json"].parent if "tokenizer.json" in files else files["tokenizer.model"].parent
    if all(p.parent == source for p in files.values()):
        tok = Tokenizer.from_folder(source)
    else:  # files gathered from several places: read the vocabulary file on its own
        tok = Tokenizer.from_file(files.get("tokenizer.json") or files["tokenizer.model"])
    tok.chat_template = carried.chat_template
    scratch = carried.scratch() / "complete"
    scratch.mkdir(exist_ok=True)
    made = write_tokenizer_files(tok, scratch, saved=True, sentencepiece="tokenizer.json" not in files)
    if "tokenizer_config.json" in files:  # keep what the source's config says; add only what it lacks
        config = _read_json(files["tokenizer_config.json"])
        if carried.chat_template and not config.get("chat_template"):
            config["chat_template"] = carried.chat_template
        made["tokenizer_config.json"].write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if name not in files or name == "tokenizer_config.json":
            files[name] = made[name]


def _from_option(carried: Carried, option: str) -> None:
    path = Path(option).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        from .gguf import GGUFReader
        reader = GGUFReader(path)
        try:
            if "tokenizer.ggml.tokens" not in reader.metadata:
                raise CamelidError(f"--tokenizer {option}: this GGUF file has no vocabulary (tokenizer.ggml.tokens)")
            _from_gguf(carried, reader.metadata)
        finally:
            reader.close()
    elif path.is_file() and path.suffix.lower() == ".flm":
        from .flm import FLMReader
        reader = FLMReader(path)
        try:
            carried.files = {f: Path(shutil.copy(p, carried.scratch())) for f, p in _files_in(reader.tokenizer_dir()).items()}
        finally:
            reader.close()
    elif path.is_file():
        if path.name not in VOCAB_FILES and path.suffix not in (".json", ".model"):
            raise CamelidError(f"--tokenizer {option}: expected a tokenizer.json, tokenizer.model, .gguf, .flm "
                               "or a folder holding the tokenizer files")
        carried.files = {"tokenizer.model" if path.suffix == ".model" else "tokenizer.json": path}
    elif path.is_dir():
        carried.files = _files_in(path)
        if not carried.files:
            raise CamelidError(f"--tokenizer {option}: no tokenizer.json or tokenizer.model there")
    else:
        raise CamelidError(f"--tokenizer {option}: no such file or folder")


def carried_by(reader: Any, option: str | None = None) -> Carried:
    """Everything `reader`'s checkpoint (or `--tokenizer option`) carries besides tensors, complete.
    Close the result (or use it as a context manager) to remove rebuilt files."""
    carried = Carried()
    try:
        if option:
            _from_option(carried, option)
        elif getattr(reader, "format", "") == "gguf":
            _from_gguf(carried, reader.metadata)
        else:
            folders = [reader.path] if reader.path.is_dir() else []
            tokenizer_dir = getattr(reader, "tokenizer_dir", None)
            if tokenizer_dir is not None and tokenizer_dir() is not None:
                folders.append(tokenizer_dir())
            carried.files = next((found for found in map(_files_in, folders) if found), {})
            if getattr(reader, "format", "") == "flm" and carried.files:
                # rebuilt in the reader's own temporary folder, which goes when the reader closes
                carried.files = {f: Path(shutil.copy(p, carried.scratch())) for f, p in carried.files.items()}
        carried.chat_template = template_of(carried.files, carried.gguf_metadata)
        _complete(carried)
    except BaseException:
        carried.close()
        raise
    return carried


# ---- the model config ---------------------------------------------------------------------------------
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def config_from_option(value: str, vocab_size: int | None = None) -> ModelConfig:
    """--config: a preset name (7b, llama-2-13b ...), a config.json / params.json, or a folder holding one."""
    path = Path(value).expanduser()
    if path.is_dir():
        for fname in ("config.json", "params.json"):
            if (path / fname).is_file():
                path = path / fname
                break
        else:
            raise CamelidError(f"--config {value}: the folder has no config.json or params.json")
    if path.is_file():
        if path.name == "params.json" or "dim" in _read_json(path):
            return ModelConfig.from_meta_params(_read_json(path), vocab_size=vocab_size)
        return ModelConfig.from_hf_file(path)
    return ModelConfig.from_name(value)


def source_config(reader: Any, override: str | None = None) -> ModelConfig:
    """The model config the source carries (config.json, params.json, GGUF metadata, .flm keys, a camelid
    EasyLM folder's config.json), or `--config` (`override`); never guessed from names or paths."""
    from . import canonical_infos  # the registry imports this module's neighbours: import it when called
    fmt = getattr(reader, "format", "hf")
    infos = canonical_infos(reader)
    vocab = infos[EMBED][1].shape[0] if EMBED in infos else None
    if override:
        config = config_from_option(override, vocab_size=vocab)
    elif fmt == "hf" and (reader.path / "config.json").is_file():
        config = ModelConfig.from_hf_file(reader.path / "config.json")  # refuses other architectures' model_type
    elif fmt == "meta" and reader.metadata:
        config = ModelConfig.from_meta_params(reader.metadata, vocab_size=vocab)
    elif fmt == "gguf":
        config = ModelConfig.from_gguf_metadata(reader.metadata, has_output_tensor="output.weight" in reader.tensors())
    elif getattr(reader, "config", None) is not None:
        config = reader.config
    else:
        raise CamelidError(f"{reader.path}: carries no model config (no config.json or params.json); pass --config "
                           "with a preset (7b, 13b, llama-2-7b ...) or a config.json / params.json path")
    if fmt == "meta" or override:  # neither params.json nor a preset can say whether the output matrix is tied
        config.tie_word_embeddings = HEAD not in infos
    return config
