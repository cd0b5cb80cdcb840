"""Pre-training windows: fixed-length pieces of the token arrays `camelid data tokenize` writes, for
`camelid train --text-data DIR [DIR:WEIGHT ...]`.

Each folder's tokens.bin is cut into non-overlapping windows of seq_len + 1 tokens (the last token of one
window is the first of the next: every token is a label once). Weights are shares of the training windows:
`web:3 code:1` draws three web windows for each code window; a folder with fewer windows than its share
repeats them (in a seeded order), one with more contributes a seeded subset. The resulting table of
(folder, window) rows is what train.py's `Schedule` permutes per epoch, so the windows of any step depend
only on the seed and the step: resuming mid-epoch needs no sampler state.

With `document_mask` a window carries each token's document (from index.bin): positions restart at every
document start, attention stays within a document (the block-diagonal mask packed conversations use) and
a document's last token (EOS) is not trained to predict the next document's first.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .errors import CamelidError
from .packing import IGNORE


@dataclass
class TokenFolder:
    path: Path
    tokens: np.ndarray    # memory-mapped uint16 / uint32
    starts: np.ndarray    # document starts, uint64
    manifest: dict

    @classmethod
    def open(cls, path: str | Path) -> "TokenFolder":
        path = Path(path)
        manifest_file = path / "manifest.json"
        if not manifest_file.is_file():
            raise CamelidError(f"--text-data {path}: no manifest.json; make the folder with `camelid data tokenize`")
        manifest = json.loads(manifest_file.read_text())
        if manifest.get("format") != "camelid-tokens":
            raise CamelidError(f"--text-data {path}: manifest.json is not a `camelid data tokenize` manifest")
        tokens = np.memmap(path / "tokens.bin", dtype=np.dtype(manifest["dtype"]).newbyteorder("<"), mode="r") \
            if manifest["tokens"] else np.zeros(0, dtype=np.uint16)
        starts = np.fromfile(path / "index.bin", dtype="<u8")
        if len(tokens) != manifest["tokens"] or len(starts) != manifest["documents"]:
            raise CamelidError(f"--text-data {path}: tokens.bin or index.bin does not match manifest.json "
                               "(a damaged or partly copied folder); tokenize again")
        return cls(path, tokens, starts, manifest)

    def windows(self, seq_len: int) -> int:
        return max(0, (len(self.tokens) - 1) // seq_len)


def parse_specs(specs: str | list[str]) -> list[tuple[str, float]]:
    """`DIR` or `DIR:WEIGHT` items (a list, or one string split at commas and spaces)."""
    items = specs.replace(",", " ").split() if isinstance(specs, str) else list(specs)
    out = []
    for spec in items:
        path, sep, weight = spec.rpartition(":")
        if not sep or not path or "/" in weight:
            path, weight = spec, "1"
        try:
            w = float(weight)
        except ValueError:
            raise CamelidError(f"--text-data {spec!r}: the weight after ':' is not a number") from None
        if not w > 0:
            raise CamelidError(f"--text-data {spec!r}: a weight must be above 0")
        out.append((path, w))
    if not out:
        raise CamelidError("--text-data: name at least one folder made by `camelid data tokenize`")
    return out


class TextWindows:
    """Training rows drawn from token folders: `batch(rows)` gives (tokens, labels, positions, segments),
    each (len(rows), seq_len), the same four tensors packed conversations give."""

    def __init__(self, specs: str | list[str], seq_len: int, *, eos_id: int | None = None, tokenizer_sha: str | None = None,
                 document_mask: bool = False, seed: int = 0):
        if seq_len < 2:
            raise CamelidError(f"--seq-len {seq_len}: needs at least 2 tokens")
        self.seq_len, self.document_mask = seq_len, document_mask
        parsed = parse_specs(specs)
        self.folders = [TokenFolder.open(p) for p, _ in parsed]
        for f in self.folders:
            sha = f.manifest["tokenizer"]["sha256"]
            if tokenizer_sha is not None and sha != tokenizer_sha:
                raise CamelidError(f"--text-data {f.path}: tokenized with another tokenizer (sha256 {sha[:12]}...) "
                                   "than the model's; tokenize it again with --model set to this model")
            if f.windows(seq_len) == 0:
                raise CamelidError(f"--text-data {f.path}: {len(f.tokens)} tokens hold no window of "
                                   f"--seq-len {seq_len} + 1")
        self.weights = [w for _, w in parsed]
        self.table = self._mixture(seed)

    def _mixture(self, seed: int) -> Tensor:
        """(rows, 2) int64: folder and window of each row of one epoch."""
        counts = [f.windows(self.seq_len) for f in self.folders]
        total, weight = sum(counts), sum(self.weights)
        parts = []
        for i, (n, w) in enumerate(zip(counts, self.weights)):
            share = max(1, round(total * w / weight)) if len(counts) > 1 else n
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + i)) if share != n \
                else torch.arange(n)
            picked = order.repeat(-(-share // n))[:share]
            parts.append(torch.stack([torch.full_like(picked, i), picked], dim=1))
        return torch.cat(parts)

    def __len__(self) -> int:
        return self.table.shape[0]

    @property
    def shares(self) -> list[int]:
        return torch.bincount(self.table[:, 0], minlength=len(self.folders)).tolist()

    def _window(self, folder: int, window: int) -> tuple[np.ndarray, np.ndarray]:
        f = self.folders[folder]
        start = window * self.seq_len
        ids = np.asarray(f.tokens[start:start + self.seq_len + 1], dtype=np.int64)
        # The document of each token: the last document start at or before it.
        doc = np.searchsorted(f.starts, np.arange(start, start + self.seq_len + 1), side="right").astype(np.int64)
        return ids, doc

    def batch(self, rows: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        n, s = len(rows), self.seq_len
        tokens = torch.empty((n, s), dtype=torch.int64)
        labels = torch.empty((n, s), dtype=torch.int64)
        positions = torch.empty((n, s), dtype=torch.int64)
        segments = torch.zeros((n, s), dtype=torch.int64)
        for r, row in enumerate(rows.tolist()):
            ids, doc = self._window(*self.table[row].tolist())
            ids_t, doc_t = torch.from_numpy(ids), torch.from_numpy(doc)
            tokens[r], labels[r] = ids_t[:-1], ids_t[1:]
            if self.document_mask:
                same = doc_t[1:] == doc_t[:-1]
                labels[r] = torch.where(same, labels[r], IGNORE)
                seg = doc_t[:-1] - doc_t[0]
                segments[r] = seg
                # Position = distance from the first token of its document within the window.
                first = torch.cat([torch.ones(1, dtype=torch.bool), seg[1:] != seg[:-1]])
                idx = torch.arange(s)
                positions[r] = idx - torch.cummax(torch.where(first, idx, 0), dim=0).values
            else:
                positions[r] = torch.arange(s)
        return tokens, labels, positions, segments

    def trained_tokens(self, rows: Tensor) -> int:
        if not self.document_mask:
            return len(rows) * self.seq_len
        return int((self.batch(rows)[1] != IGNORE).sum())

    def describe(self) -> str:
        names = ", ".join(f"{f.path.name} x{n}" for f, n in zip(self.folders, self.shares))
        return (f"{len(self)} windows of {self.seq_len} tokens ({names})"
                f"{', document mask' if self.document_mask else ''}")
