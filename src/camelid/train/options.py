"""What a training run is told: `TrainConfig`, every option with its default, filled from the defaults, then
an options file (YAML), then the command line; and the checks that need no model.

No torch here: `camelid train --help` builds its parser from these defaults without importing it.
"""
from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import CamelidError


@dataclass
class TrainConfig:
    model: str | None = None
    model_config: str | None = None  # `--config`: the model's config where --model carries none (params:: EasyLM)
    tokenizer: str | None = None  # where --model carries no tokenizer
    data: str = ""
    out: str = ""
    seq_len: int = 512
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-5
    warmup: int = 0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    epochs: float = 1.0
    max_steps: int | None = None
    lora_rank: int | None = None
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "q_proj,v_proj"
    grad_checkpointing: bool = False
    eval_every: int | None = None
    save_every: int | None = None
    keep_checkpoints: int = 2
    resume: bool = False
    force: bool = False
    seed: int = 0
    template: str | None = None
    text_data: str | list[str] | None = None  # token folders (`data tokenize`), DIR or DIR:WEIGHT each
    document_mask: bool = False
    dtype: str = "float32"
    device: str = "auto"
    threads: int | None = None
    quiet: bool = False

    def lora_target_list(self) -> list[str]:
        return [t.strip() for t in (self.lora_targets or "").split(",") if t.strip()]


KEY_ALIASES = {"config": "model_config"}  # an options file names options as the command line does
LIST_KEYS = ("lora_targets", "text_data")  # a YAML list stands for the comma-separated value


def default(name: str) -> Any:
    """The default of an option, for `--help`."""
    value = TrainConfig.__dataclass_fields__[name].default
    return None if value is MISSING else value


def _coerce(key: str, value: Any, where: str) -> Any:
    """A YAML value as the type the option takes, or one clear error."""
    kind = TrainConfig.__dataclass_fields__[key].type.split(" |")[0]
    if value is None or kind in ("str",):
        return value if value is None else str(value)
    try:
        if kind == "bool":
            if not isinstance(value, bool):
                raise ValueError
            return value
        return {"int": int, "float": float}[kind](value)
    except (ValueError, TypeError):
        raise CamelidError(f"--options {where}: {key}: {value!r} is not a valid {kind}") from None


def is_options_file(value: str | None) -> bool:
    """Whether a `--config` value is a training options file (what train's --config used to name) rather than a
    model config: a .yaml / .yml file. A config.json, params.json, a folder or a preset name is a model config."""
    return bool(value) and Path(value).suffix.lower() in (".yaml", ".yml") and Path(value).is_file()


def read_options_file(path: str) -> dict[str, Any]:
    """The options a YAML file sets (keys as the option names, dashes or underscores), each checked."""
    import yaml
    try:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise CamelidError(f"--options {path}: cannot read YAML ({e})") from None
    if not isinstance(loaded, dict):
        raise CamelidError(f"--options {path}: expected a mapping of option names to values")
    names = {f.name for f in fields(TrainConfig)}
    values: dict[str, Any] = {}
    for key, value in loaded.items():
        key = str(key).replace("-", "_")
        key = KEY_ALIASES.get(key, key)
        if key not in names:
            raise CamelidError(f"--options {path}: unknown key {key!r}")
        if key in LIST_KEYS and isinstance(value, list):
            value = ",".join(map(str, value))
        values[key] = _coerce(key, value, path)
    return values


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults, then the options file's keys, then the options given on the command line."""
    values: dict[str, Any] = read_options_file(args.options) if getattr(args, "options", None) else {}
    for f in fields(TrainConfig):
        value = getattr(args, "config" if f.name == "model_config" else f.name, None)
        if value is not None and value is not False:
            values[f.name] = value
    cfg = TrainConfig(**values)
    check_combinations(cfg)
    return cfg


def check_combinations(cfg: TrainConfig) -> None:
    """Required options and the ones that exclude each other."""
    for need in ("data", "out"):
        if not getattr(cfg, need) and not (need == "data" and cfg.text_data):
            raise CamelidError(f"--{need} is required (on the command line or in --options)"
                               + ("; or --text-data for pre-training on raw text" if need == "data" else ""))
    if cfg.data and cfg.text_data:
        raise CamelidError("--data (conversations) and --text-data (raw text) cannot be combined; pick one")
    if cfg.document_mask and not cfg.text_data:
        raise CamelidError("--document-mask applies to --text-data (packed conversations never attend across examples)")


def check_options(cfg: TrainConfig) -> None:
    """Options that can be wrong without loading the model, checked before it loads."""
    from ..lora import ALL_TARGETS
    if cfg.lora_rank is not None:
        targets = cfg.lora_target_list()
        unknown = [t for t in targets if t not in ALL_TARGETS]
        if unknown or not targets:
            raise CamelidError(f"--lora-targets: unknown module {(unknown[0] if unknown else cfg.lora_targets)!r} "
                               f"(choose from {', '.join(ALL_TARGETS)})")
        if cfg.lora_rank < 1:
            raise CamelidError(f"--lora-rank {cfg.lora_rank}: must be at least 1")
    from ..chat import check_template_name
    check_template_name(cfg.template)
