"""camelid's engine as an lm-evaluation-harness 0.4 model (`lm_eval.api.model.LM`).

Tokenization follows lm-eval's own `hf` model (context/continuation split, BOS handling, left
truncation, rolling windows), so the same requests give the same numbers; the scoring itself is
camelid's: contexts shared across a multiple-choice item's answers run once (batch_score.py), and
generation runs through the scheduler's continuous batching.
"""
from __future__ import annotations

from typing import Any

from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from ..engine import LoadedModel
from ..generate import SamplingParams
from .batch_generate import generate_batch
from .batch_score import Pair, score_pairs


class CamelidLM(TemplateLM):
    """lm-eval model over a loaded camelid model. `template`: a camelid chat template, for
    `--apply-chat-template` (lm-eval then calls `apply_chat_template` with each few-shot chat)."""

    def __init__(self, loaded: LoadedModel, *, batch_size: int = 32, max_length: int | None = None,
                 max_gen_toks: int = 256, template: Any = None):
        super().__init__()
        self.loaded, self.model, self.tok = loaded, loaded.model, loaded.tokenizer
        self.batch_size = batch_size
        self._max_length = min(max_length or loaded.config.max_position_embeddings,
                               loaded.config.max_position_embeddings)
        self.max_gen_toks = max_gen_toks
        self.template = template

    # --- what lm-eval asks of a model ------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.loaded.name

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.template.name if self.template is not None else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if self.template is None:
            raise ValueError("this model has no chat template")
        return self.template.render_text(chat_history, add_generation_prompt=add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        bos = self.tok.add_bos if add_special_tokens is None else add_special_tokens
        # Like lm-eval's hf model: a text that already starts with BOS (a chat template's) gets no second one.
        if add_special_tokens is None and self.tok.bos_token and string.startswith(self.tok.bos_token):
            bos = False
        ids = self.tok.encode(string, bos=bool(bos and self.tok.bos_id is not None))
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special=True)

    # --- scoring ----------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        pairs = []
        for _, context, continuation in requests:
            # Left truncation exactly as lm-eval's hf model: the model reads (context + continuation)[:-1],
            # at most max_length tokens.
            whole = (list(context) + list(continuation))[-(self.max_length + 1):]
            pairs.append(Pair(tuple(whole[:len(whole) - len(continuation)]), list(continuation)))
        with tqdm(total=len(pairs), desc="loglikelihood", disable=disable_tqdm) as bar:
            return score_pairs(self.model, pairs, rows=self.batch_size, progress=bar.update)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for n, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(n)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[owner] += logprob
        return totals

    # --- generation -------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        eos = self.tok.decode([self.eot_token_id]) if self.eot_token_id is not None else None
        prompts, params, stops = [], [], []
        for context, gen_kwargs in (req.args for req in requests):
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            stops.append(handle_stop_sequences(kwargs.pop("until", None), eos=eos))
            max_gen = kwargs.pop("max_gen_toks")
            prompts.append(self.tok_encode(context, left_truncate_len=self.max_length - max_gen))
            temperature = float(kwargs.get("temperature") or 0.0) if kwargs.get("do_sample") else 0.0
            params.append(SamplingParams(max_new_tokens=max_gen, temperature=temperature, seed=1234))
        with tqdm(total=len(prompts), desc="generate_until", disable=disable_tqdm) as bar:
            return generate_batch(self.loaded, prompts, params, stop_ids=set(self.tok.stop_ids), stop_strings=stops,
                                  batch=self.batch_size, context=self.max_length, progress=bar.update)
