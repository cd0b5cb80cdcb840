"""Types for command-line options, checked while the arguments are parsed: a bad value is reported with its
flag's name (`argument --top-p: ...`) before any model is loaded. Only argparse and pathlib here, so every
command module can use them."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable


def _number(kind: Callable[[str], float], ok: Callable[[float], bool], rule: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        if value != value or not ok(value):  # value != value: NaN
            raise argparse.ArgumentTypeError(f"{text} is out of range: {rule}")
        return value
    parse.__name__ = rule  # argparse names the type in some messages
    return parse


positive_int = _number(int, lambda v: v >= 1, "must be at least 1")
non_negative_int = _number(int, lambda v: v >= 0, "must be 0 or more")
non_negative_float = _number(float, lambda v: 0 <= v < float("inf"), "must be 0 or more")
positive_float = _number(float, lambda v: 0 < v < float("inf"), "must be more than 0")
probability = _number(float, lambda v: 0 < v <= 1, "must be more than 0 and at most 1")
port = _number(int, lambda v: 1 <= v <= 65535, "a TCP port is 1 to 65535")


def existing_path(text: str) -> str:
    """A file or folder that exists (kept as the string given)."""
    if text != "-" and not Path(text).expanduser().exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file or folder")
    return text
