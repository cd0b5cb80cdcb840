"""Weight diffs (EasyLM / Koala) and deltas (FastChat / Vicuna), streamed one tensor at a time, and verified.

Every command pairs a BASE with a second checkpoint (target, diff or delta), each in any format camelid
reads, compares them in the canonical form (HF names, rotate-half q/k rows) and writes one output
through a format writer, tensor by tensor: never more than one tensor from each side in memory.

* EasyLM semantics (`diff make/recover --format easylm`): diff = target - base, recovered = base + diff,
  computed in float32 and stored in the diff's float type (bfloat16 by default, like EasyLM's
  `float_dtype`). Not exact, and nothing checks it: that is what Koala's published diff is.
* camelid's own diff (`--format camelid`, the default) is exact: each tensor holds the bitwise XOR of the
  target's bit pattern with the base's (the base first cast to the target's dtype). XOR is its own
  inverse and works element by element on the raw bits, so base XOR diff gives the target's bits back
  whatever their values (fp32, fp16, bf16, NaN, -0.0), with no rounding anywhere; weights that a
  fine-tune barely moved share sign, exponent and top mantissa bits, so the diff is mostly zero bits and
  compresses well. The diff folder's camelid.json holds the sha256 of every target tensor and of every base
  tensor: recovery checks the base tensor before using it (wrong base model) and the recovered tensor
  before writing it (corrupt diff), and stops at the first mismatch, naming it, with no output left.
* FastChat semantics (`delta make/apply`): delta = target - base and target = base + delta in float16
  arithmetic, config and tokenizer travel with the delta.

Vocabulary growth (Vicuna v0's delta has 32001 embedding rows, LLaMA 32000): the base is extended with
zero rows, so the new rows come from the delta (or the diff) as they are, and a notice says so.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .config import ModelConfig
from .convert import (DTYPES, EMBED, HEAD, _bytes, _output_dtype, check_tensors, plan_output,
                      source_config, template_name, write_canonical)
from .errors import CamelidError
from .formats import WRITERS, canonical_infos, manifest, open_reader, parse_source, to_canonical, writer_for
from .formats.base import TensorInfo, TensorReader
from .formats.source import Carried, carried_by

DIFF_KIND = "camelid-diff"
_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_GROWABLE = (EMBED, HEAD)  # tensors whose rows are the vocabulary


@dataclass
class _Side:
    """One checkpoint opened lazily: its reader, canonical infos, and config (None when it carries none)."""
    spec: str
    reader: TensorReader
    infos: dict[str, tuple[str, TensorInfo]]
    config: ModelConfig | None

    def shape(self, hf: str) -> tuple[int, ...]:
        return tuple(self.infos[hf if hf in self.infos else EMBED][1].shape)

    def read(self, hf: str, heads: ModelConfig) -> torch.Tensor:
        """One tensor in HF name and layout (an absent lm_head is the tied embedding)."""
        native = self.infos[hf if hf in self.infos else EMBED][0]
        _, tensor = to_canonical(self.reader.format, native, self.reader.read(native), heads.num_heads,
                                 heads.num_kv_heads)
        return tensor


def _open(spec: str, config: str | None = None) -> _Side:
    reader = open_reader(spec)
    try:
        infos = canonical_infos(reader)
        if EMBED not in infos:
            raise CamelidError(f"{reader.path}: has no token embedding ({EMBED!r}); not a LLaMA checkpoint")
        try:
            cfg = source_config(reader)
        except CamelidError:
            # A bare EasyLM file carries none: --config, or else the other side's config, serves.
            cfg = source_config(reader, config) if config else None
        return _Side(str(spec), reader, infos, cfg)
    except BaseException:
        reader.close()
        raise


def _pair(base: _Side, other: _Side, role: str) -> tuple[list[str], dict[str, tuple[int, ...]]]:
    """The HF names to produce (in `other`'s order) and their output shapes; one clear line on any mismatch."""
    def native(side: _Side, hf: str) -> str:
        return side.infos[hf][0]

    for hf in other.infos:
        if hf not in base.infos and not (hf == HEAD and EMBED in base.infos):
            raise CamelidError(f"{other.reader.path}: tensor {native(other, hf)!r} has no counterpart in the base "
                               f"{base.reader.path}; the {role} does not belong to this base model")
    for hf in base.infos:
        if hf not in other.infos and hf != HEAD:
            raise CamelidError(f"{other.reader.path}: the {role} lacks tensor {hf!r} that the base "
                               f"{base.reader.path} has; the {role} is incomplete or not for this model")
    order = list(other.infos)
    if HEAD in base.infos and HEAD not in other.infos:
        order.append(HEAD)
    shapes: dict[str, tuple[int, ...]] = {}
    for hf in order:
        b, o = base.shape(hf), other.shape(hf)
        if b != o and not (hf in _GROWABLE and len(b) == len(o) and b[1:] == o[1:] and o[0] > b[0]):
            raise CamelidError(f"tensor {hf!r} has shape {o} in the {role} {other.reader.path} but {b} in the base "
                               f"{base.reader.path}; the {role} does not belong to this base model")
        shapes[hf] = o
    return order, shapes


def _heads(base: _Side, other: _Side) -> ModelConfig:
    """The config that tells how many (kv) heads q/k rows hold, for the canonical permutation of both sides."""
    cfg = other.config or base.config
    if cfg is None:
        raise CamelidError(f"neither {base.spec} nor {other.spec} carries a model config; pass --config with a preset "
                           "(7b, 13b ...) or a config.json / params.json path")
    return cfg


def _out_config(base: _Side, other: _Side, shapes: dict[str, tuple[int, ...]]) -> ModelConfig:
    """The output's config: the second side's (FastChat: the delta's), else the base's, fitted to the output."""
    cfg = other.config or base.config
    assert cfg is not None  # _heads checked
    cfg = dataclasses.replace(cfg, vocab_size=shapes[EMBED][0], tie_word_embeddings=HEAD not in shapes)
    check_tensors(other.reader.path, {hf: ("", TensorInfo(s, "")) for hf, s in shapes.items()}, cfg)
    return cfg


def _grow(base: torch.Tensor, rows: int) -> torch.Tensor:
    """The base tensor extended with zero rows up to `rows` (new vocabulary entries)."""
    if base.shape[0] == rows:
        return base
    return torch.cat([base, base.new_zeros((rows - base.shape[0], *base.shape[1:]))])


_SLICE = 1 << 22  # elements per slice of float32 arithmetic (16 MB), whatever the tensor's size


def _by_rows(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], a: torch.Tensor, b: torch.Tensor,
             dtype: torch.dtype) -> torch.Tensor:
    """fn(a, b) -> dtype computed slice by slice of rows: the same result for element-wise arithmetic, while
    its temporaries (casts to float32/float16) stay one slice big instead of whole tensors."""
    if a.dim() == 0 or a.numel() <= _SLICE:
        return fn(a, b).to(dtype)
    out = torch.empty(a.shape, dtype=dtype)
    step = max(1, _SLICE // (a.numel() // a.shape[0]))
    for i in range(0, a.shape[0], step):
        out[i:i + step] = fn(a[i:i + step], b[i:i + step])
    return out


def _xor(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Bitwise XOR of two tensors' bit patterns, viewed back as a's dtype."""
    ints = _INT_VIEW[a.element_size()]
    return torch.bitwise_xor(a.contiguous().view(ints), b.contiguous().view(ints)).view(a.dtype)


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(_bytes(t)).hexdigest()


def _notice(hf: str, base_rows: int, rows: int, role: str) -> None:
    print(f"notice: {hf} has {rows} rows in the {role} but {base_rows} in the base: the base is extended and the "
          f"{rows - base_rows} new rows are taken from the {role} as they are (new vocabulary entries)",
          file=sys.stderr)


def kind_of(spec: str) -> str | None:
    """What camelid.json says a folder holds ("camelid-diff", "float-diff", "fastchat-delta"); None for a model."""
    _, path, _ = parse_source(spec)
    return manifest.field(path, "kind")


_FOR_KIND = {"camelid-diff": "camelid diff recover BASE DIFF OUT", "float-diff": "camelid diff recover BASE DIFF OUT",
             "fastchat-delta": "camelid delta apply BASE DELTA OUT"}


def _expect_kind(spec: str, role: str, allowed: tuple[str | None, ...]) -> None:
    """Refuse an artifact of another kind (a diff given as a delta, a delta as a base ...) by its camelid.json.
    Folders without one pass: FastChat's published deltas and Koala's diffs were not made by camelid."""
    kind = kind_of(spec)
    if kind in allowed:
        return
    use = _FOR_KIND.get(kind)
    raise CamelidError(f"{spec} holds a {kind} (its camelid.json says so), not a {role}"
                       + (f": use `{use}`" if use else ""))


def camelid_diff_info(spec: str) -> dict[str, Any] | None:
    """The camelid.json of a camelid diff folder; None for anything else (a plain float diff)."""
    _, path, _ = parse_source(spec)
    info = manifest.read(path)
    return info if info is not None and info.get("kind") == DIFF_KIND else None


# ---- the one streaming pass all commands share ------------------------------------------------------------------
@dataclass
class Result:
    out: Path
    tensors: int
    bytes_written: int
    seconds: float
    sha256: dict[str, str]


def _run(base: _Side, other: _Side, out: str | Path, fmt: str, role: str, *,
         combine: Callable[[str, torch.Tensor, torch.Tensor], tuple[torch.Tensor, str | None]],
         dtypes: dict[str, torch.dtype], describe: dict[str, Any], tokenizer: str | None, force: bool,
         progress: bool, finite: bool = True) -> Result:
    """Stream base and other tensor by tensor through `combine(hf, base, other) -> (output, sha256 or None)`."""
    import time
    start = time.perf_counter()
    if fmt not in WRITERS:
        raise CamelidError(f"unknown output format {fmt!r} (known: {', '.join(sorted(WRITERS))})")
    order, shapes = _pair(base, other, role)
    heads = _heads(base, other)
    cfg = _out_config(base, other, shapes)
    out_infos = {hf: ("", TensorInfo(shapes[hf], "")) for hf in order}
    order, plan = plan_output(fmt, out_infos, dtypes)
    with _carried(other, base, tokenizer) as carried:
        writer = writer_for(fmt, out, cfg, plan=plan, dtype=dtypes.get(EMBED), force=force, tokenizer_files=carried.files,
                            tokenizer_metadata=carried.gguf_metadata, chat_template=carried.chat_template,
                            source_metadata=other.reader.metadata)
        describe = {"format": fmt, **describe, "chat_template": template_name(carried, fmt, out)}
        total = sum(math.prod(p.shape) * p.dtype.itemsize for p in plan)

        def one(hf: str) -> tuple[torch.Tensor, str | None]:
            o = other.read(hf, heads)
            b = base.read(hf, heads)
            if b.shape[0] != o.shape[0]:
                _notice(hf, b.shape[0], o.shape[0], role)
            return combine(hf, b, o)

        def tensors() -> Iterator[tuple[str, torch.Tensor, str | None]]:
            for hf in order:  # no local names: the generator must not hold a tensor while the next one is read
                yield (hf, *one(hf))

        sums = write_canonical(writer, fmt, cfg, tensors(), total=total, describe=describe, desc=Path(str(out)).name,
                               progress=progress, finite=finite)
        return Result(Path(out), len(order), total, time.perf_counter() - start, sums)


def _carried(other: _Side, base: _Side, tokenizer: str | None) -> Carried:
    """Tokenizer and template from --tokenizer or the diff / target side, else from the base."""
    carried = carried_by(other.reader, tokenizer)
    if carried.files or carried.gguf_metadata.get("tokenizer.ggml.tokens"):
        return carried
    carried.close()
    return carried_by(base.reader)


@contextmanager
def _paired(base: str, other: str, config: str | None, out: str | Path) -> Iterator[tuple[_Side, _Side]]:
    """Both checkpoints opened (closed again on the way out); a full disk becomes one clear line."""
    b = _open(base, config)
    try:
        o = _open(other, config)
        try:
            yield b, o
        finally:
            o.reader.close()
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise CamelidError(f"no space left on the device while writing {out}; nothing was written") from None
        raise CamelidError(f"{out}: {e.strerror or e}") from None
    finally:
        b.reader.close()


# ---- diff: EasyLM semantics, or camelid's exact and verified diff ---------------------------------------------
def make_diff(base: str, target: str, out: str | Path, *, fmt: str = "camelid", dtype: str | None = None,
              config: str | None = None, force: bool = False, progress: bool = True) -> Result:
    """Diff TARGET against BASE. --format camelid (default): the exact XOR diff with sha256 checks, a folder;
    any other format (easylm ...): EasyLM's target - base, stored in --dtype (default bfloat16, as EasyLM)."""
    if fmt == "camelid" and dtype:
        raise CamelidError("--dtype applies to float diffs (--format easylm ...); a camelid diff keeps the "
                           "target's own types exactly")
    _expect_kind(base, "base model", (None,))
    _expect_kind(target, "target model", (None,))
    with _paired(base, target, config, out) as (b, t):
        if fmt == "camelid":
            return _make_exact(b, t, out, force, progress)
        out_dtype = DTYPES[dtype or "bfloat16"]

        def subtract(hf: str, bt: torch.Tensor, tt: torch.Tensor) -> tuple[torch.Tensor, str | None]:
            return _by_rows(lambda t_, b_: t_.float() - b_.float(), tt, _grow(bt, tt.shape[0]), out_dtype), None

        describe = {"kind": "float-diff", "dtype": str(out_dtype).removeprefix("torch."), "target": str(target),
                    "base": str(base)}
        return _run(b, t, out, fmt, "target", combine=subtract, dtypes=_all(t, out_dtype), describe=describe,
                    tokenizer=None, force=force, progress=progress)


def _make_exact(b: _Side, t: _Side, out: str | Path, force: bool, progress: bool) -> Result:
    base_sums: dict[str, str] = {}
    grown: dict[str, int] = {}

    def combine(hf: str, bt: torch.Tensor, tt: torch.Tensor) -> tuple[torch.Tensor, str | None]:
        bt = bt.to(tt.dtype)
        base_sums[hf] = _sha(bt)
        if bt.shape[0] != tt.shape[0]:
            grown[hf] = bt.shape[0]
        return _xor(tt, _grow(bt, tt.shape[0])), _sha(tt)

    dtypes = {hf: _torch_dtype(info.dtype, t.spec, hf) for hf, (_, info) in t.infos.items()}
    # camelid.json is written when the pass completes: base_sha256 and base_rows are filled while it runs.
    describe = {"kind": DIFF_KIND, "method": "xor", "target": t.spec, "base": b.spec,  # XOR bits: not numbers
                "sha256_of": "each TARGET tensor in Hugging Face name and layout, in its dtype",
                "base_sha256": base_sums, "base_rows": grown, "recover": "camelid diff recover BASE THIS_FOLDER OUT"}
    return _run(b, t, out, "hf", "target", combine=combine, dtypes=dtypes, describe=describe, tokenizer=None,
                force=force, progress=progress, finite=False)


def recover(base: str, diff: str, out: str | Path, *, fmt: str = "hf", dtype: str | None = None,
            config: str | None = None, tokenizer: str | None = None, force: bool = False,
            progress: bool = True) -> Result:
    """BASE + DIFF -> OUT. A camelid diff gives the target bit for bit, each tensor checked against its sha256;
    any other diff (Koala's EasyLM file) is added in float32 and stored in --dtype (default: the diff's type)."""
    _expect_kind(base, "base model", (None,))
    _expect_kind(diff, "weight diff", (None, DIFF_KIND, "float-diff"))
    info = camelid_diff_info(diff)
    with _paired(base, diff, config, out) as (b, d):
        if info is not None:
            return _recover_exact(b, d, out, fmt, info, dtype, tokenizer, force, progress)
        out_dtype = _output_dtype(dtype, d.infos)

        def add(hf: str, bt: torch.Tensor, dt: torch.Tensor) -> tuple[torch.Tensor, str | None]:
            return _by_rows(lambda b_, d_: b_.float() + d_.float(), _grow(bt, dt.shape[0]), dt, out_dtype), None

        describe = {"dtype": str(out_dtype).removeprefix("torch."), "source": str(diff), "base": str(base),
                    "recovered_from": "float-diff"}
        return _run(b, d, out, fmt, "diff", combine=add, dtypes=_all(d, out_dtype), describe=describe,
                    tokenizer=tokenizer, force=force, progress=progress)


def _recover_exact(b: _Side, d: _Side, out: str | Path, fmt: str, info: dict[str, Any], dtype: str | None,
                   tokenizer: str | None, force: bool, progress: bool) -> Result:
    want, want_base = info.get("sha256", {}), info.get("base_sha256", {})
    missing = [hf for hf in d.infos if hf not in want]
    if missing:
        raise CamelidError(f"{d.reader.path}: camelid.json has no sha256 for tensor {missing[0]!r}; the diff is "
                           "incomplete or was edited")
    cast = DTYPES[dtype] if dtype else None

    def unxor(hf: str, bt: torch.Tensor, dt: torch.Tensor) -> tuple[torch.Tensor, str | None]:
        key = hf if hf in d.infos else EMBED  # an untied output format repeats a tied embedding
        bt = bt.to(dt.dtype)
        if key in want_base and _sha(bt) != want_base[key]:
            raise CamelidError(f"tensor {key!r} of the base {b.spec} is not the one this diff was made from "
                               f"(sha256 differs): wrong base model; nothing was written")
        target = _xor(dt, _grow(bt, dt.shape[0]))
        if _sha(target) != want[key]:
            cause = "" if key in want_base else " (or the base is not the one it was made from)"
            raise CamelidError(f"tensor {key!r}: the recovered weights do not match the target's sha256: the diff "
                               f"{d.spec} is corrupt{cause}; download it again; nothing was written")
        if cast is not None and cast != target.dtype:
            return target.to(cast), None
        return target, want[key]

    dtypes = {hf: cast or _torch_dtype(i.dtype, d.spec, hf) for hf, (_, i) in d.infos.items()}
    describe = {"dtype": _dtype_label(dtypes), "source": d.spec, "base": b.spec, "recovered_from": DIFF_KIND,
                "verified": "every tensor matched the target's sha256 before it was written"}
    return _run(b, d, out, fmt, "diff", combine=unxor, dtypes=dtypes, describe=describe, tokenizer=tokenizer,
                force=force, progress=progress, finite=False)


def _torch_dtype(stored: str, where: str, hf: str) -> torch.dtype:
    dt = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "float32": torch.float32,
          "float16": torch.float16, "bfloat16": torch.bfloat16}.get(stored)
    if dt is None:
        raise CamelidError(f"{where}: tensor {hf!r} is stored as {stored}; an exact diff needs float32, float16 or "
                           "bfloat16 weights (convert the checkpoint first)")
    return dt


def _all(side: _Side, dtype: torch.dtype) -> dict[str, torch.dtype]:
    return {hf: dtype for hf in side.infos}


def _dtype_label(dtypes: dict[str, torch.dtype]) -> str:
    names = sorted({str(d).removeprefix("torch.") for d in dtypes.values()})
    return names[0] if len(names) == 1 else "mixed: " + ", ".join(names)


# ---- delta: FastChat semantics (float16 arithmetic, config and tokenizer from the delta) ----------------------------
def make_delta(base: str, target: str, out: str | Path, *, fmt: str = "hf", config: str | None = None,
               force: bool = False, progress: bool = True) -> Result:
    """FastChat's make_delta: delta = target - base in float16; config and tokenizer from the target."""
    def subtract(hf: str, bt: torch.Tensor, tt: torch.Tensor) -> tuple[torch.Tensor, str | None]:
        return _by_rows(lambda t_, b_: t_.to(torch.float16) - b_.to(torch.float16), tt, _grow(bt, tt.shape[0]),
                        torch.float16), None

    _expect_kind(base, "base model", (None,))
    _expect_kind(target, "target model", (None,))
    with _paired(base, target, config, out) as (b, t):
        describe = {"kind": "fastchat-delta", "dtype": "float16", "target": str(target), "base": str(base)}
        return _run(b, t, out, fmt, "target", combine=subtract, dtypes=_all(t, torch.float16), describe=describe,
                    tokenizer=None, force=force, progress=progress)


def apply_delta(base: str, delta: str, out: str | Path, *, fmt: str = "hf", config: str | None = None,
                tokenizer: str | None = None, force: bool = False, progress: bool = True) -> Result:
    """FastChat's apply_delta: target = base + delta in float16; config and tokenizer from the delta.
    A delta with more vocabulary rows than the base (Vicuna v0) extends it with the delta's rows."""
    def add(hf: str, bt: torch.Tensor, dt: torch.Tensor) -> tuple[torch.Tensor, str | None]:
        return _by_rows(lambda b_, d_: b_.to(torch.float16) + d_.to(torch.float16), _grow(bt, dt.shape[0]), dt,
                        torch.float16), None

    _expect_kind(base, "base model", (None,))
    _expect_kind(delta, "FastChat delta", (None, "fastchat-delta"))
    with _paired(base, delta, config, out) as (b, d):
        describe = {"dtype": "float16", "source": str(delta), "base": str(base), "recovered_from": "fastchat-delta"}
        return _run(b, d, out, fmt, "delta", combine=add, dtypes=_all(d, torch.float16), describe=describe,
                    tokenizer=tokenizer, force=force, progress=progress)
