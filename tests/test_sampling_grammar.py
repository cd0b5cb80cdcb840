"""The one token chooser (sampling.py) with logit_bias, the grammar bitmask and the non-finite guard, checked
against llguidance's own reference for applying a bitmask; the grammar compiler (grammar.py) on the built-in
model's vocabulary."""
from __future__ import annotations

import json

import llguidance.numpy as llg_numpy
import numpy as np
import pytest
import torch

from camelid.engine import load_model
from camelid.grammar import GrammarCompiler
from camelid.sampling import SamplingParams, apply_bitmask, choose


def test_bitmask_matches_llguidance_reference():
    gen = torch.Generator().manual_seed(0)
    vocab = 1000
    mask = torch.randint(-2**31, 2**31 - 1, ((vocab + 31) // 32,), generator=gen, dtype=torch.int64).to(torch.int32)
    logits = torch.randn(vocab, generator=gen)
    ours = apply_bitmask(logits.clone(), mask)
    reference = logits.numpy().copy()[None]
    llg_numpy.apply_token_bitmask_inplace(reference, mask.numpy()[None].copy())
    assert np.array_equal(np.isinf(ours.numpy()), np.isinf(reference[0]))
    assert np.array_equal(ours.numpy()[np.isfinite(reference[0])], reference[0][np.isfinite(reference[0])])


def test_choose_respects_mask_bias_and_guards_non_finite_logits():
    gen = torch.Generator().manual_seed(1)
    vocab = 200
    allowed = torch.zeros(224, dtype=torch.bool)  # whole 32-bit words
    allowed[[3, 50, 199]] = True
    mask = torch.from_numpy(np.packbits(allowed.numpy(), bitorder="little").view(np.int32).copy())
    params = SamplingParams(temperature=1.0)
    picks = {choose(torch.randn(vocab, generator=gen) * 5, params, generator=gen, mask=mask) for _ in range(300)}
    assert picks == {3, 50, 199}
    logits = torch.zeros(vocab)
    assert choose(logits, SamplingParams(), bias={7: 100}) == 7  # greedy with +100
    banned = {choose(torch.randn(vocab, generator=gen), params, generator=gen, bias={i: -100 for i in range(1, vocab)})
              for _ in range(20)}
    assert banned == {0}
    bad = torch.full((vocab,), float("nan"))
    bad[50] = 1.0
    assert choose(bad, params, generator=gen) == 50  # NaN logits: the best finite token, no exception
    assert choose(bad, params, generator=gen, mask=mask) == 50
    hot = torch.randn(vocab, generator=gen)
    assert choose(hot, SamplingParams(temperature=1e-30), mask=mask) in (3, 50, 199)  # softmax overflows


@pytest.fixture(scope="module")
def compiler():
    tok = load_model().tokenizer
    return tok, GrammarCompiler(tok, 49152, tok.stop_ids)


def test_a_valid_answer_is_allowed_token_by_token_and_the_end_is_forced(compiler):
    tok, comp = compiler
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"}},
              "required": ["name", "n"], "additionalProperties": False}
    constraint = comp.json_schema(schema)
    for token in tok.encode(json.dumps({"name": "Ada", "n": 36})):
        allowed = apply_bitmask(torch.zeros(49152), constraint.mask())
        assert torch.isfinite(allowed[token]), tok.decode([token])
        constraint.accept(token)
    assert constraint.error is None
    final = torch.isfinite(apply_bitmask(torch.zeros(49152), constraint.mask())).nonzero().flatten().tolist()
    assert set(final) <= tok.stop_ids and final  # only the end of the reply is left
    other = comp.json_schema(schema)
    first = torch.isfinite(apply_bitmask(torch.zeros(49152), other.mask())).nonzero().flatten().tolist()
    assert all(tok.decode([i]).startswith("{") for i in first)


def test_json_object_mode_and_bad_schemas(compiler):
    from camelid.errors import CamelidError
    _, comp = compiler
    assert comp.json_schema(None).error is None
    with pytest.raises(CamelidError, match="cannot be enforced"):
        comp.json_schema({"type": "no-such-type"})
