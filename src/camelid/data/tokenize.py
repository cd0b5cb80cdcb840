"""`camelid data tokenize`: raw text (JSONL, plain text, .gz / .zst) -> one token array for pre-training.

The files are read as a stream into a Hugging Face `datasets` Arrow cache (`Dataset.from_generator`, one
shard of files per worker), tokenized there with `Dataset.map` (batched, `--workers` processes), then copied
batch by batch into the output. Memory holds one batch at a time, never the corpus: the Arrow files are on
disk and memory-mapped.

Output folder:
  tokens.bin     every document's ids followed by EOS (BOS first when the tokenizer adds one), end to end;
                 little-endian uint16 when the vocabulary fits, else uint32 (numpy.memmap reads it)
  index.bin      uint64 offset of each document's first token in tokens.bin
  manifest.json  dtype, counts, the tokenizer's sha256, every source file with its size and sha256

The cache is keyed by the files' sha256 and the tokenizer's, so a changed file is read again and the same
inputs give byte-identical outputs (the manifest holds no times or temporary paths).
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import numpy as np

from ..errors import CamelidError

FORMAT = "camelid-tokens"
VERSION = 1
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
TEXT_SUFFIXES = (".txt", ".text", ".md")
COMPRESSED = (".gz", ".zst")
UNITS = ("document", "paragraph", "line")
ENCODE_ROWS = 200  # documents per tokenizer call: its Encodings (ids, offsets, strings) are ~100 bytes a token
WRITE_ROWS = 2000  # documents per Arrow record batch of the tokenized cache, copied into the output one by one


@dataclass
class Source:
    path: Path
    kind: str             # jsonl | text
    compression: str      # "" | .gz | .zst
    size: int
    sha256: str


def _kind(path: Path) -> tuple[str, str]:
    suffixes = [s.lower() for s in path.suffixes]
    compression = suffixes.pop() if suffixes and suffixes[-1] in COMPRESSED else ""
    last = suffixes[-1] if suffixes else ""
    if last in JSONL_SUFFIXES:
        return "jsonl", compression
    if last in TEXT_SUFFIXES:
        return "text", compression
    raise CamelidError(f"{path}: unknown file type; expected .jsonl or .txt (optionally .gz or .zst)")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def find_sources(specs: list[str]) -> list[Source]:
    """The files named (a folder: every JSONL / text file under it, sorted), with their sizes and sha256."""
    paths: list[Path] = []
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
            paths += [f for f in found if _known(f)]
        elif p.is_file():
            paths.append(p)
        else:
            raise CamelidError(f"--source {spec}: no such file or folder")
    if not paths:
        raise CamelidError(f"--source {' '.join(specs)}: no .jsonl or .txt files (optionally .gz / .zst) found")
    kinds = [_kind(p) for p in paths]  # all checked before any file is hashed
    return [Source(p, k, c, p.stat().st_size, _sha256(p)) for p, (k, c) in zip(paths, kinds)]


def _known(path: Path) -> bool:
    try:
        _kind(path)
        return True
    except CamelidError:
        return False


def _open(path: Path, compression: str) -> BinaryIO:
    if compression == ".gz":
        return gzip.open(path, "rb")
    if compression == ".zst":
        import zstandard
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(path.open("rb"), closefd=True))
    return path.open("rb")


def _record(source: int, line: int, text: str = "", error: str = "") -> dict[str, Any]:
    return {"source": source, "line": line, "text": text, "error": error}


def _jsonl(index: int, lines: Iterator[bytes], field: str) -> Iterator[dict[str, Any]]:
    n = 0
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except ValueError as e:  # UnicodeDecodeError is a ValueError too
            yield _record(index, n, error=f"not a JSON record ({e})")
            continue
        if not isinstance(rec, dict) or field not in rec:
            yield _record(index, n, error=f"no field {field!r} in this record")
        elif not isinstance(rec[field], str):
            yield _record(index, n, error=f"field {field!r} is {type(rec[field]).__name__}, not a string")
        else:
            yield _record(index, n, rec[field])


def _text(index: int, lines: Iterator[bytes], unit: str) -> Iterator[dict[str, Any]]:
    parts: list[str] = []
    start = 1
    for n, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield _record(index, n, error=f"not UTF-8 text ({e})")
            continue
        if unit == "line":
            if line.strip():
                yield _record(index, n, line.rstrip("\r\n"))
        elif unit == "paragraph" and not line.strip():
            if parts:
                yield _record(index, start, "".join(parts).rstrip("\r\n"))
            parts, start = [], n + 1
        else:
            parts.append(line)
    if parts and unit != "line":
        yield _record(index, start, "".join(parts) if unit == "document" else "".join(parts).rstrip("\r\n"))


def generate_records(files: list[dict[str, Any]], field: str, unit: str) -> Iterator[dict[str, Any]]:
    """{source, line, text, error} for every document of the files, in order; a bad record carries its error.
    (`Dataset.from_generator` hands each worker a slice of `files`.)"""
    for f in files:
        path, line = Path(f["path"]), 0

        def counted(stream: BinaryIO) -> Iterator[bytes]:
            nonlocal line
            for line, raw in enumerate(stream, 1):
                yield raw
        try:
            with _open(path, f["compression"]) as stream:
                if f["kind"] == "jsonl":
                    yield from _jsonl(f["index"], counted(stream), field)
                else:
                    yield from _text(f["index"], counted(stream), unit)
        except (OSError, EOFError, ValueError) as e:  # a truncated or corrupt .gz / .zst
            yield _record(f["index"], line + 1, error=f"cannot read further ({e})")


# ---- tokenizing (in the map workers) -------------------------------------------------------------------
_TOKENIZERS: dict[str, Any] = {}  # model path -> Tokenizer; forked workers inherit the parent's


def load_tokenizer(model: str | Path | None) -> tuple[Path, Any]:
    """The tokenizer of a GGUF file or a folder (a model's, or just the tokenizer files); weights are not read."""
    from ..engine import resolve_model_path
    from ..tokenizer import Tokenizer
    path = resolve_model_path(model)
    if path.is_dir() and any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        return path, Tokenizer.from_folder(path)
    if path.is_file() and path.suffix == ".gguf":
        from ..formats.gguf import tokenizer_of
        return path, tokenizer_of(path)
    raise CamelidError(f"{path}: no tokenizer here (a .gguf file, or a folder with tokenizer.json or tokenizer.model)")


def _tokenizer(model: str) -> Any:
    if model not in _TOKENIZERS:
        _TOKENIZERS[model] = load_tokenizer(model)[1]
    return _TOKENIZERS[model]


def encode_documents(texts: list[str], errors: list[str], model: str, bos: bool) -> dict[str, list[list[int]]]:
    """Ids of each document + EOS (BOS first when `bos`); bad and empty records get no ids.
    Special-token strings in the text are read as text: a corpus cannot inject an end of turn."""
    tok = _tokenizer(model)
    keep = [i for i, (t, e) in enumerate(zip(texts, errors)) if t and not e]
    encoded = tok.encode_batch([texts[i] for i in keep], special=False)
    ids: list[list[int]] = [[] for _ in texts]
    head = [tok.bos_id] if bos else []
    for i, doc in zip(keep, encoded):
        ids[i] = head + doc + [tok.eos_id]
    return {"ids": ids}


# ---- the pipeline --------------------------------------------------------------------------------------
def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _records_dataset(sources: list[Source], field: str, unit: str, workers: int, cache_dir: str | None) -> Any:
    import datasets
    files = [{"index": i, "path": str(s.path.resolve()), "kind": s.kind, "compression": s.compression}
             for i, s in enumerate(sources)]
    features = datasets.Features({"source": datasets.Value("int32"), "line": datasets.Value("int64"),
                                  "text": datasets.Value("string"), "error": datasets.Value("string")})
    key = _fingerprint(VERSION, field, unit, [(f["path"], s.sha256) for f, s in zip(files, sources)])
    return datasets.Dataset.from_generator(
        generate_records, features=features, cache_dir=cache_dir, fingerprint=key,
        gen_kwargs={"files": files, "field": field, "unit": unit},
        num_proc=min(workers, len(files)) if workers > 1 and len(files) > 1 else None)


def _first_error(records: Any, sources: list[Source]) -> tuple[int, str | None]:
    """How many records are bad, and the first one as `file:line: what`."""
    import pyarrow.compute as pc
    bad = pc.not_equal(records.data.column("error"), "")
    count = int(pc.sum(bad).as_py() or 0)
    if not count:
        return 0, None
    row = records[int(pc.index(bad, True).as_py())]
    return count, f"{sources[row['source']].path}:{row['line']}: {row['error']}"


def _batches(tokenized: Any) -> Iterator[Any]:
    """The record batches of the tokenized cache files, read into memory one by one. Through the memory map
    every page read would stay resident until the end: the corpus's whole ids."""
    import pyarrow as pa
    for f in tokenized.cache_files:
        with pa.OSFile(f["filename"]) as stream:
            yield from pa.ipc.open_stream(stream)


def _write(tokenized: Any, out: Path, dtype: np.dtype, n_sources: int, quiet: bool) -> dict[str, Any]:
    """Copy the ids into tokens.bin and the document starts into index.bin, a batch at a time."""
    import pyarrow.compute as pc
    from tqdm import tqdm
    tokens = documents = 0
    per_source = np.zeros((2, n_sources), dtype=np.int64)  # documents, tokens
    with (out / "tokens.bin").open("wb") as ft, (out / "index.bin").open("wb") as fi, \
            tqdm(total=len(tokenized), unit="doc", desc="write", disable=quiet) as bar:
        for part in _batches(tokenized):
            ids = part.column("ids")
            lengths = pc.list_value_length(ids).to_numpy(zero_copy_only=False).astype(np.int64)
            values = pc.list_flatten(ids).to_numpy(zero_copy_only=False)
            ft.write(values.astype(dtype.newbyteorder("<"), copy=False).tobytes())
            used = lengths > 0
            starts = tokens + np.cumsum(lengths) - lengths
            fi.write(starts[used].astype("<u8").tobytes())
            source = part.column("source").to_numpy()
            np.add.at(per_source[0], source[used], 1)
            np.add.at(per_source[1], source, lengths)
            tokens += int(lengths.sum())
            documents += int(used.sum())
            bar.update(len(part))
    return {"tokens": tokens, "documents": documents, "per_source": per_source}


def tokenize_corpus(specs: list[str], out: str | Path, *, model: str | None = None, field: str = "text",
                    unit: str = "paragraph", workers: int = 1, skip_bad: bool = False, force: bool = False,
                    cache_dir: str | None = None, quiet: bool = False) -> dict[str, Any]:
    """Tokenize the files into `out` (tokens.bin, index.bin, manifest.json); returns the manifest."""
    import datasets
    from ..formats.atomic import atomic_output
    if unit not in UNITS:
        raise CamelidError(f"--text-unit {unit!r}: use one of {', '.join(UNITS)}")
    if workers < 1:
        raise CamelidError(f"--workers {workers}: needs at least 1")
    out = Path(out)
    if out.exists() and not force:
        raise CamelidError(f"{out} already exists; pass --force to replace it")
    model_path, tok = load_tokenizer(model)
    if tok.eos_id is None:
        raise CamelidError(f"{model_path}: the tokenizer has no EOS token to end documents with")
    sources = find_sources(specs)
    if quiet:
        datasets.disable_progress_bars()
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32)
    with atomic_output(out, force=force, is_dir=True) as tmp:
        records = _records_dataset(sources, field, unit, workers, cache_dir)
        bad, first = _first_error(records, sources)
        if bad and not skip_bad:
            raise CamelidError(f"{first}; fix the record or pass --skip-bad to leave bad records out "
                               f"({bad} bad record(s) in all)")
        _TOKENIZERS[str(model_path)] = tok
        bos = bool(tok.add_bos and tok.bos_id is not None)
        tok_hash = tok.fingerprint()
        key = _fingerprint(records._fingerprint, tok_hash, bos, str(dtype), VERSION)
        tokenized = records.map(
            encode_documents, batched=True, batch_size=ENCODE_ROWS, input_columns=["text", "error"],
            remove_columns=["text", "line", "error"], fn_kwargs={"model": str(model_path), "bos": bos},
            features=datasets.Features({"source": datasets.Value("int32"),
                                        "ids": datasets.List(datasets.Value(str(dtype)))}),
            num_proc=workers if workers > 1 else None, new_fingerprint=key, desc="tokenize",
            writer_batch_size=WRITE_ROWS)
        n_records = len(records)
        del records  # unmaps the text: its pages read by the map leave the resident set
        counts = _write(tokenized, tmp, dtype, len(sources), quiet)
        manifest = {
            "format": FORMAT, "version": VERSION, "dtype": str(dtype), "tokens": counts["tokens"],
            "documents": counts["documents"], "records": n_records, "bad_records": bad,
            "empty_documents": n_records - bad - counts["documents"],
            "eos_id": tok.eos_id, "bos_id": tok.bos_id if bos else None, "field": field, "text_unit": unit,
            "tokenizer": {"model": model_path.name, "sha256": tok_hash, "vocab_size": tok.vocab_size},
            "sources": [{"path": str(s.path), "size": s.size, "sha256": s.sha256,
                         "documents": int(counts["per_source"][0, i]), "tokens": int(counts["per_source"][1, i])}
                        for i, s in enumerate(sources)],
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
