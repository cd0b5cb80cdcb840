"""Speculative decoding: a small draft model proposes k tokens, the target checks them in one forward.

Exact by construction. Greedy: a draft token is kept while it equals the target's argmax, and the
first disagreement is replaced by the target's argmax, so the tokens are those of plain greedy
decoding. Sampling (Leviathan et al. 2023, Chen et al. 2023): draft token x drawn from q is kept with
probability min(1, p(x)/q(x)); on rejection the token is drawn from max(0, p - q) renormalised; when
all k are kept one more is drawn from p. Each emitted token is then distributed exactly as p, the
target's distribution after temperature / top-k / top-p / repetition penalty.

Both models keep their own static cache (prefix_cache.KVSession); rejected tokens are forgotten by
truncating the record, their stale keys/values are masked by position and later overwritten.
"""
from __future__ import annotations

import time
from typing import Iterable, Iterator, Sequence

import torch
from torch import Tensor

from .errors import CamelidError
from .generate import SamplingParams, make_generator, process_logits
from .model import Llama
from .prefix_cache import KVSession, common_prefix


def distribution(logits: Tensor, params: SamplingParams, history: Tensor | None) -> Tensor:
    """The probabilities sampling draws from (fp32, vocab,), after every logit processor."""
    return torch.softmax(process_logits(logits, params, history), dim=-1)


def verify(p: Tensor, q: Tensor, drafts: Sequence[int], generator: torch.Generator | None) -> tuple[int, int]:
    """The accept/reject rule. p: (k+1, vocab) target probabilities, row i given the first i drafts;
    q: (k, vocab) draft probabilities the drafts were drawn from. Returns (how many drafts are kept,
    the token that follows them: a draw from the residual max(0, p - q), or from p[k] if all are kept)."""
    u = torch.rand(len(drafts), generator=generator, device=p.device)
    for i, x in enumerate(drafts):
        if float(q[i, x]) <= 0 or float(u[i]) > float(p[i, x]) / float(q[i, x]):
            residual = (p[i] - q[i]).clamp_min(0)
            total = float(residual.sum())
            # p == q leaves no residual mass; a rejection is then impossible except by rounding: draw from p.
            weights = residual / total if total > 0 else p[i]
            return i, int(torch.multinomial(weights, 1, generator=generator))
    return len(drafts), int(torch.multinomial(p[len(drafts)], 1, generator=generator))


class SpeculativeGeneration:
    """Iterator over new token ids, like `generate.Generation`, with a draft model proposing `k` at a time.

    After it ends: `finish_reason`, and `proposed` / `accepted` draft tokens (`acceptance_rate`).
    """

    def __init__(self, model: Llama, draft: Llama, prompt_ids: Sequence[int], params: SamplingParams,
                 stop_ids: Iterable[int] = (), context: int | None = None, *, k: int = 4,
                 reuse_prefix: bool = False):
        if draft is model:
            raise CamelidError("the draft model must be a separate model (load it again, e.g. in bfloat16)")
        if draft.config.vocab_size != model.config.vocab_size:
            raise CamelidError(f"the draft model's vocabulary ({draft.config.vocab_size} tokens) differs from the "
                               f"target's ({model.config.vocab_size}); a draft must share the target's tokenizer")
        if k < 1:
            raise CamelidError(f"--draft-tokens must be >= 1, got {k}")
        self.model, self.draft, self.params, self.k = model, draft, params, k
        self.prompt = list(prompt_ids)
        self.stop_ids = set(stop_ids)
        limit = min(model.config.max_position_embeddings, draft.config.max_position_embeddings)
        self.context = min(context or limit, limit)
        if not self.prompt:
            raise CamelidError("the prompt is empty: give at least one token")
        if len(self.prompt) >= self.context:
            raise CamelidError(f"the prompt has {len(self.prompt)} tokens but the context holds {self.context}; "
                               "shorten the prompt or use a larger --context")
        self.reuse_prefix = reuse_prefix
        self.finish_reason: str | None = None
        self.prompt_seconds = 0.0
        self.proposed = self.accepted = self.rounds = 0
        self._tokens = self._run()

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    def __iter__(self) -> "SpeculativeGeneration":
        return self

    def __next__(self) -> int:
        return next(self._tokens)

    def _dist(self, logits: Tensor, seq: list[int]) -> Tensor:
        history = None
        if self.params.repetition_penalty != 1.0:
            history = torch.tensor(seq, dtype=torch.long, device=logits.device)
        return distribution(logits, self.params, history)

    @torch.inference_mode()
    def _run(self) -> Iterator[int]:
        params, greedy = self.params, self.params.temperature == 0
        n_prompt = len(self.prompt)
        budget = min(params.max_new_tokens, self.context - n_prompt)
        if budget <= 0:
            self.finish_reason = "length"
            return
        target, drafter = KVSession(self.model, self.context), KVSession(self.draft, self.context)
        generator = make_generator(params.seed, target.device)
        start = time.perf_counter()
        # The target's logits after the prompt choose the first token; the draft catches up each round.
        logits = target.prefill(self.prompt, reuse=self.reuse_prefix, reserve=n_prompt + budget)
        drafter.prefill(self.prompt, reuse=self.reuse_prefix, reserve=n_prompt + budget)
        self.prompt_seconds = time.perf_counter() - start
        seq = list(self.prompt)
        first = int(torch.argmax(logits)) if greedy else int(torch.multinomial(self._dist(logits, seq), 1,
                                                                               generator=generator))
        pending = [first]  # tokens emitted by the last verification, not yet fed to either model
        while True:
            for token in pending:
                if token in self.stop_ids:
                    self.finish_reason = "stop"
                    return
                seq.append(token)
                yield token
                if len(seq) - n_prompt >= budget:
                    self.finish_reason = "length"
                    return
            k = min(self.k, budget - (len(seq) - n_prompt))
            drafts, q_rows = self._propose(drafter, seq, k, greedy, generator)
            # One target forward over the last emitted token and the k drafts: k + 1 next-token distributions.
            target.truncate(min(common_prefix(target.tokens, seq), len(seq) - 1))
            logits = target.extend(seq[len(target.tokens):] + drafts, last=k + 1)
            self.rounds += 1
            self.proposed += k
            if greedy:
                best = logits.argmax(-1).tolist()
                n = 0
                while n < k and drafts[n] == best[n]:
                    n += 1
                pending = drafts[:n] + [best[n]]
            else:
                p = torch.stack([self._dist(logits[i], seq + drafts[:i]) for i in range(k + 1)])
                n, extra = verify(p, torch.stack(q_rows), drafts, generator)
                pending = drafts[:n] + [extra]
            self.accepted += n

    def _propose(self, drafter: KVSession, seq: list[int], k: int, greedy: bool,
                 generator: torch.Generator | None) -> tuple[list[int], list[Tensor]]:
        """k draft tokens after `seq` and the draft distributions they were drawn from."""
        drafter.truncate(min(common_prefix(drafter.tokens, seq), len(seq) - 1))
        logits = drafter.extend(seq[len(drafter.tokens):])[-1]
        drafts: list[int] = []
        q_rows: list[Tensor] = []
        for i in range(k):
            if greedy:
                token = int(torch.argmax(logits))
            else:
                q = self._dist(logits, seq + drafts)
                token = int(torch.multinomial(q, 1, generator=generator))
                q_rows.append(q)
            drafts.append(token)
            if i < k - 1:
                logits = drafter.step(token)
        return drafts, q_rows
