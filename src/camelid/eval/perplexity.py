"""Perplexity of a model on a text, by the two methods people quote.

`llama.cpp`: the text is one token stream cut into non-overlapping windows of `context` tokens; each
window is scored on its second half only, so every scored token has at least context/2 tokens before it
(what `llama-perplexity` reports, with the same +/- standard error, and BOS written over each window's
first token when the vocabulary adds one). `sliding`: the Hugging Face guide's strided window: windows of
`context` tokens advanced by `stride`, each scoring only the tokens the previous windows did not.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..errors import CamelidError
from ..model import Llama

METHODS = ("llama.cpp", "sliding")


@dataclass
class Perplexity:
    """Sums of negative log-likelihoods, so results of several texts add up."""
    method: str
    context: int
    stride: int | None = None
    tokens: int = 0  # tokens of text read
    scored: int = 0  # tokens whose log-probability counts
    nll: float = 0.0
    nll2: float = 0.0
    scanned: int = 0  # tokens run through the model (windows x their length)
    seconds: float = 0.0
    windows: int = 0
    per_window: list[float] = field(default_factory=list)  # running perplexity after each window

    def add(self, nlls: torch.Tensor) -> None:
        nlls = nlls.double()
        self.scored += nlls.numel()
        self.nll += float(nlls.sum())
        self.nll2 += float((nlls * nlls).sum())
        self.windows += 1
        self.per_window.append(math.exp(self.nll / self.scored))

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.scored) if self.scored else float("nan")

    @property
    def stderr(self) -> float:
        """llama-perplexity's uncertainty: the standard error of the mean NLL, propagated through exp."""
        if self.scored < 2:
            return float("nan")
        mean = self.nll / self.scored
        var = self.nll2 / self.scored - mean * mean
        return math.sqrt(var / (self.scored - 1)) * self.ppl if var > 0 else float("nan")

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(ppl=self.ppl, ppl_stderr=self.stderr, mean_nll=self.nll / self.scored if self.scored else None,
                   tokens_per_second=self.scanned / self.seconds if self.seconds else None)
        return out


def _no_cache(model: Llama) -> None:
    # A plain causal forward needs no KV cache; one left by generation would make forward() use it.
    if model.max_seq:
        model.clear_cache()


@torch.inference_mode()
def window_nlls(model: Llama, windows: torch.Tensor, first: Sequence[int]) -> list[torch.Tensor]:
    """Negative log-likelihoods of each window's tokens after position first[b] (a batch of equal-length
    windows, (batch, n)): token t+1 given tokens 0..t, for t in first[b]..n-2. The vocabulary projection
    runs only at the scored positions."""
    b, n = windows.shape
    only = torch.zeros(b, n, dtype=torch.bool, device=windows.device)
    for i, f in enumerate(first):
        only[i, f:n - 1] = True
    logits = model(windows, only=only).float()
    targets = windows[:, 1:][only[:, :-1]]
    nll = -(F.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0])
    counts = [n - 1 - f for f in first]
    return list(nll.split(counts))


def llamacpp_windows(ids: Sequence[int], context: int, bos_id: int | None) -> list[list[int]]:
    """Non-overlapping windows of `context` tokens (a short tail is dropped, as llama-perplexity does);
    with a BOS id, each window's first token is replaced by BOS."""
    windows = [list(ids[i:i + context]) for i in range(0, len(ids) - context + 1, context)]
    if bos_id is not None:
        for w in windows:
            w[0] = bos_id
    return windows


def sliding_windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position within the window) for the HF guide's strided windows."""
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        # The tokens after prev_end are new; position p of the window predicts token p+1, so the first
        # scored prediction sits one before the first new token (never before the window's start).
        first = max(prev_end - begin - 1, 0)
        out.append((begin, end, first))
        prev_end = end
        if end == n_tokens:
            break
    return out


def check_settings(method: str, context: int, stride: int | None, batch: int) -> None:
    """Bad settings fail before the model loads."""
    if method not in METHODS:
        raise CamelidError(f"--method {method!r}: choose from {', '.join(METHODS)}")
    if context < 4:
        raise CamelidError(f"--context {context}: use at least 4 tokens")
    if batch < 1:
        raise CamelidError(f"--batch {batch}: use at least 1")
    if method == "sliding":
        if stride is None or not 0 < stride <= context:
            raise CamelidError(f"--stride {stride}: the sliding method needs 0 < stride <= --context ({context})")
    elif stride is not None:
        raise CamelidError("--stride applies to --method sliding only")


def perplexity(model: Llama, ids: Sequence[int], *, method: str = "llama.cpp", context: int = 512,
               stride: int | None = None, batch: int = 1, bos_id: int | None = None,
               progress: Callable[[int], None] | None = None, result: Perplexity | None = None) -> Perplexity:
    """Perplexity of the token ids `ids` (already tokenized, BOS included where the vocabulary adds one).

    `result`: add to an earlier text's sums (several files, one figure). `progress(n)` is called with the
    number of windows done after each batch.
    """
    check_settings(method, context, stride, batch)
    limit = model.config.max_position_embeddings
    if context > limit:
        raise CamelidError(f"--context {context} is longer than the model's {limit} positions")
    out = result or Perplexity(method, context, stride)
    device = model.model.embed_tokens.weight.device
    _no_cache(model)
    start = time.perf_counter()
    if method == "llama.cpp":
        windows = llamacpp_windows(ids, context, bos_id)
        if not windows:
            raise CamelidError(f"the text has {len(ids)} tokens, fewer than one window of --context {context}; "
                               "give more text or a smaller --context")
        jobs = [(w, context // 2) for w in windows]
    else:
        if len(ids) < 2:
            raise CamelidError("the text has fewer than 2 tokens: nothing to score")
        jobs = [(list(ids[b:e]), f) for b, e, f in sliding_windows(len(ids), context, stride)]
    i = 0
    while i < len(jobs):
        # Batch consecutive windows of the same length (only the sliding method's last one may differ).
        j = i + 1
        while j < len(jobs) and j - i < batch and len(jobs[j][0]) == len(jobs[i][0]):
            j += 1
        tokens = torch.tensor([w for w, _ in jobs[i:j]], dtype=torch.long, device=device)
        for nll in window_nlls(model, tokens, [f for _, f in jobs[i:j]]):
            out.add(nll.cpu())
        out.scanned += tokens.numel()
        if progress is not None:
            progress(j - i)
        i = j
    out.tokens += len(ids)
    out.seconds += time.perf_counter() - start
    return out


def count_windows(n_tokens: int, method: str, context: int, stride: int | None) -> int:
    """Windows a text of n_tokens makes (for the progress bar's total)."""
    if method == "llama.cpp":
        return n_tokens // context
    return len(sliding_windows(n_tokens, context, stride or context))
