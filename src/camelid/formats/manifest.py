"""camelid.json: what a folder camelid wrote says about itself. The one reader and writer of the file.

Written by convert / quantize / diff / delta (`write_canonical`) and by training checkpoints; read by the
loader, the readers of quantized and EasyLM folders, diff/delta, lora merge, train and the template choice.
One error policy for all of them: a folder without the file is a plain folder (None); a file that cannot be
read, is not JSON, is not an object, or holds a field of the wrong type is a CamelidError naming the file and
the field, raised before any slow work. Fields nobody reads pass through untouched.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import CamelidError

NAME = "camelid.json"

# What a folder holds when it is not a model: a weight diff or delta (laid out like a model, never run as one).
DIFF_KINDS = ("camelid-diff", "float-diff", "fastchat-delta")

# The fields camelid reads, and the JSON types each may have (None: the field may be null).
_FIELDS: dict[str, tuple[type | None, ...]] = {
    "format": (str, None),
    "kind": (str, None),
    "quant": (str, None),
    "chat_template": (str, dict, None),
    "layers": (dict, None),  # quantized linear layer -> its scheme ("int4 g32")
    "embedding": (str, None),  # the embedding's scheme when stored quantized
    "quantized_embeddings": (bool, None),  # older quantized folders: int8 embedding rows
    "sha256": (dict, None),
    "base_sha256": (dict, None),
    "base_rows": (dict, None),
}
_JSON_NAMES = {str: "a string", dict: "an object", bool: "true or false", None: "null"}


def path_of(folder: str | Path) -> Path:
    return Path(folder) / NAME


def _bad(file: Path, what: str) -> CamelidError:
    return CamelidError(f"{file}: {what}; camelid writes this file with the folder: restore it from the folder's "
                        "source, or remove it if the folder is a plain model")


def _check(file: Path, info: Any) -> dict[str, Any]:
    if not isinstance(info, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
        raise _bad(file, f"holds {kind.get(type(info), 'null')}, not a JSON object")
    for key, types in _FIELDS.items():
        value = info.get(key)
        if not any(value is None if t is None else isinstance(value, t) for t in types):
            wanted = " or ".join(_JSON_NAMES[t] for t in types)
            raise _bad(file, f"{key!r} is {json.dumps(value)[:40]}, expected {wanted}")
    for key in ("layers", "sha256", "base_sha256"):
        odd = [k for k, v in (info.get(key) or {}).items() if not isinstance(v, str)]
        if odd:
            raise _bad(file, f"{key!r} entry {odd[0]!r} is not a string")
    return info


def read(folder: str | Path) -> dict[str, Any] | None:
    """The camelid.json of `folder` as a dict; None when `folder` is not a folder or has no camelid.json.
    A damaged file is a CamelidError (never a silent "no manifest": the folder would be misread)."""
    folder = Path(folder)
    file = path_of(folder)
    if not folder.is_dir() or not file.exists():
        return None
    try:
        info = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise _bad(file, f"cannot be read ({e.__class__.__name__}: {e})") from None
    except json.JSONDecodeError as e:
        raise _bad(file, f"is not valid JSON ({e})") from None
    return _check(file, info)


def field(folder: str | Path, key: str) -> Any:
    """One field of `folder`'s camelid.json; None when the folder has no camelid.json or the file no such field."""
    info = read(folder)
    return info.get(key) if info is not None else None


def diff_kind(folder: str | Path) -> str | None:
    """"camelid-diff", "float-diff" or "fastchat-delta" when camelid.json says the folder holds weight
    differences rather than a model; None for a model (or a folder camelid did not write)."""
    kind = field(folder, "kind")
    return kind if kind in DIFF_KINDS else None


def write(folder: str | Path, info: dict[str, Any]) -> Path:
    """Write `info` as `folder`/camelid.json (the folder is still the output's temporary one: the caller's
    rename makes it visible with the rest)."""
    file = path_of(folder)
    file.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return file
