"""Generation: greedy decoding and logit processing against transformers; stop rules; errors."""
from __future__ import annotations

import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                          TopKLogitsWarper, TopPLogitsWarper)

from camelid.errors import CamelidError
from camelid.generate import Generation, SamplingParams, StopStringFilter, process_logits
from .builders import ours_from


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    ref = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                       bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            if p.ndim > 1:
                p.normal_(0, 0.3)
    return ref, ours_from(ref)


def test_greedy_tokens_equal_transformers_generate(pair) -> None:
    ref, ours = pair
    prompt = [5, 17, 42, 8, 61]
    expected = ref.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False, eos_token_id=None,
                            pad_token_id=0)[0, len(prompt):].tolist()
    got = list(Generation(ours, prompt, SamplingParams(max_new_tokens=30)))
    assert got == expected


def test_logit_processing_matches_transformers_warpers() -> None:
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        logits = torch.randn(1, 500, generator=gen) * 3
        history = torch.randint(0, 500, (1, 30), generator=gen)
        params = SamplingParams(temperature=0.7, top_k=50 if trial % 2 else None, top_p=0.9, repetition_penalty=1.3)
        scores = RepetitionPenaltyLogitsProcessor(1.3)(history, logits.clone())
        scores = TemperatureLogitsWarper(0.7)(history, scores)
        if params.top_k:
            scores = TopKLogitsWarper(params.top_k)(history, scores)
        scores = TopPLogitsWarper(0.9)(history, scores)
        ours = process_logits(logits[0], params, history[0])
        assert torch.equal(torch.isinf(ours), torch.isinf(scores[0])), f"trial {trial}: kept sets differ"
        kept = ~torch.isinf(ours)
        assert torch.allclose(ours[kept], scores[0][kept], atol=1e-5)


def test_seeded_sampling_is_reproducible_and_varies_with_seed(pair) -> None:
    _, ours = pair
    run = lambda seed: list(Generation(ours, [3, 4, 5], SamplingParams(max_new_tokens=20, temperature=1.5, seed=seed)))  # noqa: E731
    assert run(1) == run(1)
    assert run(1) != run(2)


def test_stop_id_and_length_finish_reasons(pair) -> None:
    _, ours = pair
    greedy = list(Generation(ours, [5, 17, 42], SamplingParams(max_new_tokens=12)))
    stop_at = greedy[4]
    gen = Generation(ours, [5, 17, 42], SamplingParams(max_new_tokens=12), stop_ids={stop_at})
    assert list(gen) == greedy[:greedy.index(stop_at)] and gen.finish_reason == "stop"
    gen = Generation(ours, [5, 17, 42], SamplingParams(max_new_tokens=3))
    assert len(list(gen)) == 3 and gen.finish_reason == "length"


def test_generation_stops_at_the_context_end(pair) -> None:
    _, ours = pair
    gen = Generation(ours, list(range(3, 60)), SamplingParams(max_new_tokens=100))
    assert len(list(gen)) == 64 - 57 and gen.finish_reason == "length"


def test_prompt_longer_than_context_is_a_clear_error(pair) -> None:
    _, ours = pair
    with pytest.raises(CamelidError, match="the prompt has 70 tokens but the context holds 64"):
        Generation(ours, [3] * 70, SamplingParams())
    with pytest.raises(CamelidError, match="top_p"):
        SamplingParams(top_p=1.5)


@pytest.mark.parametrize("chunks, stops, expected", [
    (["Hello", " wor", "ld###", " more"], ["###"], "Hello world"),
    (["a#", "#", "b", "##", "#c"], ["###"], "a##b"),            # a partial match that fails is released
    (["User", ":", " hi"], ["\nUser:"], "User: hi"),             # no stop at the very start without the newline
    (["x\nUs", "er", ": next"], ["\nUser:", "</s>"], "x"),
    (["no stop here"], [], "no stop here"),
])
def test_stop_strings_are_held_back_until_they_cannot_match(chunks, stops, expected) -> None:
    f = StopStringFilter(stops)
    out = "".join(f.feed(c) for c in chunks) + f.flush()
    assert out == expected
    # Text is never emitted that later turns out to be part of a stop string.
    f = StopStringFilter(stops)
    for c in chunks:
        emitted = f.feed(c)
        for s in stops:
            assert s not in emitted


def test_a_vanishing_temperature_is_greedy_in_generate_and_the_server_alike(pair) -> None:
    """`--temperature 1e-40` makes every logit +-inf: the one chooser (sampling.choose, used by `generate` and the
    server's scheduler) falls back to the greedy token instead of raising inside torch.multinomial."""
    from camelid.sampling import choose, sample
    torch.manual_seed(1)
    for _ in range(20):
        logits = torch.randn(97) * 5
        tiny = SamplingParams(temperature=1e-40, top_k=10)
        assert sample(logits, tiny, None, None) == int(torch.argmax(logits))
        assert choose(logits, tiny) == int(torch.argmax(logits))
    _, ours = pair
    prompt = [5, 17, 42, 8, 61]
    greedy = list(Generation(ours, prompt, SamplingParams(max_new_tokens=12)))
    assert list(Generation(ours, prompt, SamplingParams(max_new_tokens=12, temperature=1e-40))) == greedy
