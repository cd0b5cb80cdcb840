"""Conversations -> token ids with a loss mask -> packed rows of a fixed length, with no cross-talk.

EasyLM concatenates examples into rows and lets each one attend to the examples before it. Here every
row carries a segment id per token: position ids restart at each example and the attention mask is
block-diagonal and causal, so a packed row computes exactly what each example computes alone.

Labels are shifted at packing time: the label at token t is token t+1 of the same example when the loss
mask marks t+1 (an assistant token or its end-of-turn token), else -100. The last token of an example
never predicts the first token of the next one.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import Tensor

from .errors import CamelidError

IGNORE = -100
MIN_ROOM = 8  # a row with less room than this is closed
OPEN_ROWS = 256  # how many rows first-fit searches


@dataclass
class Packed:
    """Rows of packed examples, all (rows, seq_len)."""
    tokens: Tensor
    labels: Tensor
    positions: Tensor
    segments: Tensor  # example index within its row; padding gets -1
    examples: int = 0
    truncated: int = 0
    dropped: int = 0  # examples with no trained token (nothing to learn from)
    stats: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def batch(self, rows: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """tokens, labels, positions, segments of these rows (what the trainer asks any data source for)."""
        return self.tokens[rows], self.labels[rows], self.positions[rows], self.segments[rows]

    def trained_tokens(self, rows: Tensor | list[int] | None = None) -> int:
        labels = self.labels if rows is None else self.labels[rows]
        return int((labels != IGNORE).sum())


def read_conversations(path: Path) -> list[dict[str, Any]]:
    """Records of a conversation JSONL file ({id, source, messages: [{role, content}], preferred})."""
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise CamelidError(f"{path}: cannot read ({e})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise CamelidError(f"{path}:{n}: not a JSON record ({e})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("messages"), list):
            raise CamelidError(f"{path}:{n}: expected {{\"messages\": [{{\"role\", \"content\"}}, ...]}}")
        records.append(rec)
    return records


def tokenize(records: Iterable[dict[str, Any]], template: Any, tokenizer: Any,
             where: str = "data") -> list[tuple[list[int], list[bool]]]:
    """(ids, loss mask) of each conversation, through the template's own renderer."""
    out = []
    for i, rec in enumerate(records):
        try:
            ids, mask = template.render_ids(rec["messages"], tokenizer, add_generation_prompt=False)
        except CamelidError as e:
            raise CamelidError(f"{where}: record {i + 1} (id {rec.get('id')!r}): {e}") from None
        out.append((list(ids), [bool(m) for m in mask]))
    return out


def pack(examples: list[tuple[list[int], list[bool]]], seq_len: int, *, pad_id: int = 0, seed: int | None = 0) -> Packed:
    """Pack examples into rows of `seq_len` tokens (first fit, in a seeded shuffled order).

    Examples longer than `seq_len` are truncated to it and counted; examples with no trained token
    left are dropped and counted."""
    if seq_len < 2:
        raise CamelidError(f"--seq-len {seq_len}: needs at least 2 tokens")
    order = list(range(len(examples)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    truncated = dropped = 0
    rows: list[list[tuple[list[int], list[bool]]]] = []
    free: list[int] = []
    open_rows: list[int] = []  # rows still worth filling; a bounded window keeps packing linear in the data
    for i in order:
        ids, mask = examples[i]
        if len(ids) > seq_len:
            ids, mask = ids[:seq_len], mask[:seq_len]
            truncated += 1
        if not any(mask[1:]):
            dropped += 1
            continue
        for r in open_rows:
            if free[r] >= len(ids):
                rows[r].append((ids, mask))
                free[r] -= len(ids)
                if free[r] < MIN_ROOM:
                    open_rows.remove(r)
                break
        else:
            rows.append([(ids, mask)])
            free.append(seq_len - len(ids))
            if free[-1] >= MIN_ROOM:
                open_rows.append(len(rows) - 1)
                if len(open_rows) > OPEN_ROWS:
                    open_rows.pop(0)
    n = len(rows)
    # int32 at rest (a large set packed to 2048 tokens is big); batches become int64 when used.
    tokens = torch.full((n, seq_len), pad_id, dtype=torch.int32)
    labels = torch.full((n, seq_len), IGNORE, dtype=torch.int32)
    positions = torch.zeros((n, seq_len), dtype=torch.int32)
    segments = torch.full((n, seq_len), -1, dtype=torch.int32)
    for r, row in enumerate(rows):
        at = 0
        for s, (ids, mask) in enumerate(row):
            k = len(ids)
            tokens[r, at:at + k] = torch.tensor(ids)
            target = torch.tensor(ids[1:] + [IGNORE])
            keep = torch.tensor(mask[1:] + [False])
            labels[r, at:at + k] = torch.where(keep, target, IGNORE)
            positions[r, at:at + k] = torch.arange(k)
            segments[r, at:at + k] = s
            at += k
        # Padding continues the positions of nothing: each pad is its own segment's start, so no NaN rows.
        positions[r, at:] = 0
    used = int((segments >= 0).sum())
    return Packed(tokens, labels, positions, segments, examples=len(examples) - dropped, truncated=truncated,
                  dropped=dropped, stats={"rows": n, "fill": used / max(1, n * seq_len)})


def attention_mask(segments: Tensor) -> Tensor:
    """Block-diagonal causal mask (batch, 1, seq, seq), True where a query may attend to a key.

    Padding (segment -1) sees only itself, so no row of the softmax is empty."""
    s = segments.shape[-1]
    causal = torch.ones(s, s, dtype=torch.bool, device=segments.device).tril()
    same = segments[:, :, None] == segments[:, None, :]
    pad = segments < 0
    own = torch.eye(s, dtype=torch.bool, device=segments.device)
    mask = (same & causal & ~pad[:, :, None]) | (pad[:, :, None] & own)
    return mask[:, None]
