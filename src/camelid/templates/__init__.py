"""The built-in conversation templates, kept as data.

`builtin.json` holds one entry per model family; `fastllm_cookbook.json` the prompt settings fastllm's
LLaMA cookbook lists. This module only reads them; `camelid.chat` turns them into templates; it imports nothing of camelid.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


@lru_cache(maxsize=None)
def builtin_specs() -> tuple[dict[str, Any], ...]:
    """Template specs from builtin.json, in file order."""
    data = json.loads((HERE / "builtin.json").read_text(encoding="utf-8"))
    return tuple(data["templates"])


@lru_cache(maxsize=None)
def fastllm_configs() -> dict[str, dict[str, str]]:
    """fastllm cookbook settings by model family: description, pre_prompt, user_role, bot_role, history_sep."""
    data = json.loads((HERE / "fastllm_cookbook.json").read_text(encoding="utf-8"))
    return dict(data["configs"])
