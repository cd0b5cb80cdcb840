"""The decode paths: compiled vs eager, batched vs per-sequence, prefix cache, speculative decoding, --device."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from camelid import cli
from camelid.config import ModelConfig
from camelid.engine import load_model
from camelid.generate import Generation, SamplingParams
from camelid.model import Llama
from camelid.prefix_cache import KVSession, common_prefix, forward_row
from camelid.speculative import SpeculativeGeneration, verify

from .builders import ours_from, random_model, reference, tiny_hf, write_gguf


def perturbed_copy(model: Llama, noise: float, seed: int = 1) -> Llama:
    """A separate model with the same vocabulary whose weights differ a little: a draft for tests."""
    copy = Llama(model.config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        state = {k: v + noise * torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()}
    copy.load_state_dict(state)
    return copy


TINY = ModelConfig.from_name("llama-2-70b").tiny(vocab_size=101, max_position_embeddings=256)


# --- compiled decode ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_compiled_decode_gives_the_eager_greedy_tokens() -> None:
    # The smallest model keeps the one compile of this file short (inductor's C++ backend, ~30 s here).
    model = random_model(dataclasses.replace(TINY, num_layers=1, vocab_size=64, intermediate_size=96))
    prompt = [5, 17, 42, 8, 33]
    eager = list(Generation(model, prompt, SamplingParams(max_new_tokens=24)))
    compiled = list(Generation(model, prompt, SamplingParams(max_new_tokens=24), compile=True))
    assert compiled == eager
    assert model._compiled_step is not None  # really the compiled path, kept for the next generation
    # The fixed-shape step attends over the whole cache with a mask: same logits as the sliced eager step.
    with torch.inference_mode():
        model.setup_cache(1, 64)
        model(torch.tensor([prompt]), torch.arange(5))
        stepped = model.decode_step(torch.tensor([[eager[0]]]), torch.tensor([5]))
        model.setup_cache(1, 64)
        model(torch.tensor([prompt]), torch.arange(5))
        plain = model(torch.tensor([[eager[0]]]), torch.tensor([5]))[:, 0]
    assert (stepped - plain).abs().max().item() < 1e-5


# --- batched decode ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("head_dim", [64, 128])
def test_batched_decode_of_mixed_lengths_equals_per_sequence(head_dim: int) -> None:
    # fastllm's batched CPU decode is wrong below head_dim 128; GQA with 2 kv heads, 4 query heads.
    config = dataclasses.replace(TINY, head_dim=head_dim, hidden_size=4 * head_dim)
    model = random_model(config, std=0.05)
    prompts = [[5, 6, 7], list(range(10, 31)), [20], list(range(40, 49))]
    steps = [[30, 31, 32, 33], [40, 41, 42, 43], [50, 51, 52, 53], [60, 61, 62, 63]]
    with torch.inference_mode():
        expected = [model(torch.tensor([p + s]))[0, len(p) - 1:-1] for p, s in zip(prompts, steps)]

        def prefill_rows(rows):
            model.setup_cache(5, 64)
            outs = []
            for row, prompt in zip(rows, prompts):
                outs.append(model(torch.tensor([prompt]), torch.arange(len(prompt)), rows=torch.tensor([row]))[0, -1])
            return outs

        # The scheduler's path: rows anywhere in the cache, positions per sequence.
        rows = [3, 0, 4, 1]
        got = [prefill_rows(rows)]
        for t in range(3):
            tokens = torch.tensor([[s[t]] for s in steps])
            positions = torch.tensor([[len(p) + t] for p in prompts])
            got.append(model(tokens, positions, rows=torch.tensor(rows))[:, 0])
        # The fixed-shape step: every row decodes, each at its own position.
        model.setup_cache(4, 64)
        fixed = [torch.stack([model(torch.tensor([p]), torch.arange(len(p)), rows=torch.tensor([i]))[0, -1]
                              for i, p in enumerate(prompts)])]
        for t in range(3):
            tokens = torch.tensor([[s[t]] for s in steps])
            fixed.append(model.decode_step(tokens, torch.tensor([len(p) + t for p in prompts])))
    for i in range(len(prompts)):
        batched = torch.stack([got[0][i]] + [g[i] for g in got[1:]])
        assert (batched - expected[i]).abs().max().item() < 1e-5, f"rows path, sequence {i}"
        stepped = torch.stack([f[i] for f in fixed])
        assert (stepped - expected[i]).abs().max().item() < 1e-5, f"fixed-shape path, sequence {i}"


# --- prefix cache --------------------------------------------------------------------------------------------
def test_prefix_cache_prefills_only_the_new_tokens_and_matches_a_fresh_run() -> None:
    model = random_model(TINY)
    turn1 = [1, 9, 14, 27, 3, 55, 2]
    gen = Generation(model, turn1, SamplingParams(max_new_tokens=6), reuse_prefix=True)
    reply = list(gen)
    assert (gen.reused, gen.computed) == (0, len(turn1))
    # Turn 2 repeats turn 1 and the reply, then adds the user's next message.
    turn2 = turn1 + reply + [2, 1, 44, 45, 46, 2]
    held = len(turn1) + len(reply) - 1  # the last reply token was sampled but never fed to the model
    assert common_prefix(model.cache_tokens[0], turn2) == held
    session = KVSession(model, 256)
    cached_logits = session.prefill(turn2)
    assert (session.reused, session.computed) == (held, len(turn2) - held)
    with torch.inference_mode():
        fresh = model(torch.tensor([turn2]))[0, -1]  # no cache at all
    assert (cached_logits - fresh).abs().max().item() < 1e-5
    # A whole turn through Generation: same tokens as without the cache, fewer tokens computed.
    gen2 = Generation(model, turn2, SamplingParams(max_new_tokens=8), reuse_prefix=True)
    with_cache = list(gen2)
    model.clear_cache()
    assert with_cache == list(Generation(model, turn2, SamplingParams(max_new_tokens=8)))
    assert gen2.computed == 1  # the cache already held all of turn2 but its last token


def test_one_row_forward_gives_transformers_logits_in_a_batch_row_and_in_the_session() -> None:
    """prefix_cache.forward_row is the prefill of both the scheduler (any row of a batch cache) and
    KVSession (row 0 of a one-row cache): after a held prefix, the new tokens' logits are transformers'."""
    ref = tiny_hf(kv_heads=2)
    model = ours_from(ref)
    seq = [1, 5, 17, 42, 99, 3, 250, 7, 64, 128, 11, 12, 200, 31, 8, 77, 90, 4]
    with torch.no_grad():
        want = ref(torch.tensor([seq])).logits[0]
    model.setup_cache(4, 64)
    model.cache_tokens[2] = [9, 9, 9]  # stale tokens of an earlier request: forgotten from position 0
    with torch.no_grad():
        forward_row(model, 2, seq[:10], 0)
        rest = forward_row(model, 2, seq[10:], 10)
        last = forward_row(model, 2, seq[10:], 10, last=1)  # the same positions again: last token only
    assert model.cache_tokens[2] == seq and model.cache_tokens[0] == [] and last.shape == (1, want.shape[1])
    assert (rest - want[10:]).abs().max().item() < 1e-4
    assert (last[0] - want[-1]).abs().max().item() < 1e-4
    session = KVSession(model, 64)
    session.prefill(seq[:10])
    assert (session.extend(seq[10:]) - want[10:]).abs().max().item() < 1e-4
    assert session.tokens == seq and model.cache_batch == 1


def test_prefix_cache_survives_a_cache_that_grows() -> None:
    model = random_model(TINY)
    session = KVSession(model, 256, cache_step=16)
    first = list(range(3, 15))
    session.prefill(first)
    assert model.max_seq == 16
    longer = first + list(range(20, 40))
    logits = session.prefill(longer)  # 32 tokens: a larger cache, the 12 held tokens copied over
    assert model.max_seq == 32 and session.reused == 12
    with torch.inference_mode():
        assert (logits - model(torch.tensor([longer]))[0, -1]).abs().max().item() < 1e-5


def test_chat_turns_on_the_builtin_model_prefill_only_the_new_message(smollm2_gguf) -> None:
    from camelid.chat import resolve_template
    loaded = load_model(smollm2_gguf)
    tok = loaded.tokenizer
    template, _ = resolve_template(explicit=None, model_dir=None, embedded=loaded.chat_template,
                                   model_name=loaded.name, tokenizer=tok)
    messages = [{"role": "user", "content": "Name a colour."}]
    ids1, _ = template.render_ids(messages, tok, add_generation_prompt=True)
    gen = Generation(loaded.model, ids1, SamplingParams(max_new_tokens=8), stop_ids=template.stop_token_ids(tok),
                     reuse_prefix=True)
    reply = tok.decode(list(gen))
    messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And another one?"}]
    ids2, _ = template.render_ids(messages, tok, add_generation_prompt=True)
    gen2 = Generation(loaded.model, ids2, SamplingParams(max_new_tokens=1), reuse_prefix=True)
    next(gen2)
    new_message = template.render_ids(messages[-1:], tok, add_generation_prompt=True)[0]
    assert gen2.reused >= len(ids1) and gen2.computed <= len(ids2) - len(ids1)
    assert gen2.computed < len(new_message) + 12  # the new message (+ the reply's end-of-turn), not the history


# --- speculative decoding ----------------------------------------------------------------------------------
def test_speculative_greedy_equals_plain_greedy_decoding() -> None:
    target = random_model(dataclasses.replace(TINY, num_layers=3))
    prompt = [5, 6, 7, 8, 9]
    plain = list(Generation(target, prompt, SamplingParams(max_new_tokens=40)))
    # A close draft (most proposals kept) and a poor one (most rejected): the tokens never change.
    for draft, k, least in [(perturbed_copy(target, 0.003), 4, 0.5), (perturbed_copy(target, 0.2, seed=2), 3, 0.0)]:
        gen = SpeculativeGeneration(target, draft, prompt, SamplingParams(max_new_tokens=40), k=k)
        assert list(gen) == plain
        print(f"draft noise, k={k}: acceptance {gen.acceptance_rate:.2f} over {gen.proposed} proposals")
        assert gen.proposed >= 40 // (k + 1) and gen.acceptance_rate >= least
    # A truncated draft (the target's first two layers) is a different, weaker model: same tokens still.
    small = Llama(dataclasses.replace(target.config, num_layers=2)).eval()
    small.load_state_dict({k: v for k, v in target.state_dict().items() if ".layers.2." not in k})
    gen = SpeculativeGeneration(target, small, prompt, SamplingParams(max_new_tokens=40), k=4, stop_ids={plain[30]})
    assert list(gen) == plain[:plain.index(plain[30])] and gen.finish_reason == "stop"


def test_verify_keeps_the_target_distribution() -> None:
    """Accept/reject statistics on a 4-token vocabulary: emitted tokens follow the target, not the draft."""
    gen = torch.Generator().manual_seed(0)
    P1 = torch.tensor([0.5, 0.3, 0.15, 0.05])
    Q1 = torch.tensor([0.1, 0.2, 0.3, 0.4])
    P2 = torch.softmax(torch.randn(4, 4, generator=gen) * 2, -1)  # target's next token given the first
    Q2 = torch.softmax(torch.randn(4, 4, generator=gen) * 2, -1)
    n_trials = 20000
    first = torch.zeros(4)
    pairs = torch.zeros(4, 4)
    for _ in range(n_trials):
        d1 = int(torch.multinomial(Q1, 1, generator=gen))
        d2 = int(torch.multinomial(Q2[d1], 1, generator=gen))
        p = torch.stack([P1, P2[d1], torch.full((4,), 0.25)])
        n, extra = verify(p, torch.stack([Q1, Q2[d1]]), [d1, d2], gen)
        emitted = [d1, d2][:n] + [extra]
        first[emitted[0]] += 1
        if n >= 1:
            pairs[emitted[0], emitted[1]] += 1
    assert (first / n_trials - P1).abs().max().item() < 0.015
    # Given the first draft was kept, it follows min(P1, Q1) normalised, and the second token P2(.|first).
    kept = torch.minimum(P1, Q1) / torch.minimum(P1, Q1).sum()
    assert (pairs / pairs.sum() - kept[:, None] * P2).abs().max().item() < 0.015


def test_speculative_sampling_with_an_identical_draft_accepts_everything() -> None:
    target = random_model(TINY)
    twin = perturbed_copy(target, 0.0)
    params = SamplingParams(max_new_tokens=30, temperature=0.9, top_p=0.95, seed=4)
    gen = SpeculativeGeneration(target, twin, [3, 4, 5], params, k=4)
    tokens = list(gen)
    assert len(tokens) == 30 and gen.acceptance_rate > 0.95
    assert list(SpeculativeGeneration(target, twin, [3, 4, 5], params, k=4)) == tokens  # seeded: reproducible


def test_cli_speculative_with_the_builtin_model_as_its_own_bf16_draft(smollm2_gguf, capsys) -> None:
    prompt = "The three primary colours are"
    # float32 target (--quant none): speculative = plain greedy holds exactly where both paths do the same float
    # math; with the native kernels (int8 activations) the 6-row verification and the one-call step may round a
    # near-tie activation differently (see test_native_decode_step_equals_the_module_path_and_stays_near_float).
    assert cli.main(["generate", "--device", "cpu", "--quant", "none", "--threads", "2", "--max-new-tokens", "24",
                     prompt]) == 0
    plain = capsys.readouterr().out
    assert cli.main(["generate", "--device", "cpu", "--quant", "none", "--max-new-tokens", "24", "--draft", str(smollm2_gguf),
                     "--draft-dtype", "bfloat16", "--draft-tokens", "5", prompt]) == 0
    out, err = capsys.readouterr()
    assert out == plain and len(plain.strip()) > 10
    accepted, proposed = map(int, err.split("[speculative: ")[1].split(" ")[0].split("/"))
    print(err.strip())
    assert proposed > 0 and accepted / proposed > 0.6  # bf16 flips some near ties of the fp32 target: ~80%


# --- device ------------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error shown where no GPU is present")
def test_cuda_without_a_gpu_is_a_clear_error(capsys) -> None:
    for argv in (["generate", "--device", "cuda", "hello"], ["chat", "--device", "cuda"],
                 ["serve", "--device", "cuda", "--port", "1"]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("camelid: error: --device cuda:") and "--device cpu" in err and "\n" not in err


# --- native block kernels: the one-call decode step against the module-by-module path ------------------------
def _native_gguf(tmp_path, qtype: str, case: str = "gqa"):
    import gguf

    from camelid import kernels
    if kernels.ext() is None:
        pytest.skip("native kernels not built here")
    path = write_gguf(reference(case), tmp_path / f"tiny-{qtype}.gguf", gguf.GGMLQuantizationType[qtype])
    return path, load_model(path, quant="native", fuse=True)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_native_decode_step_equals_the_module_path_and_stays_near_float(tmp_path, qtype) -> None:
    from camelid.kernels.blocks import NativeLinear
    path, loaded = _native_gguf(tmp_path, qtype)
    model = loaded.model
    assert model.fused_step is not None
    assert all(isinstance(m, NativeLinear) for m in (model.lm_head, model.model.layers[1].self_attn.qkv_proj))
    prompt, params = [3, 14, 15], SamplingParams(max_new_tokens=12)
    fused = list(Generation(model, prompt, params))
    steps = {}
    with torch.inference_mode():
        for name in ("fused", "modules"):
            if name == "modules":
                model.fused_step = None
            session = KVSession(model, 64)
            session.prefill(prompt)
            steps[name] = torch.stack([session.step(t) for t in fused])
    assert list(Generation(model, prompt, params)) == fused  # greedy tokens identical
    torch.testing.assert_close(steps["fused"], steps["modules"], rtol=0, atol=1e-4)
    # Against float weights (the GGUF dequantized): only the int8 rounding of activations apart (per block of 32
    # at most half a step, bounded per product in test_kernels.py), compounded here through two layers of
    # std-0.2 weights: measured 2-6% of the largest logit.
    float_model = load_model(path).model
    with torch.inference_mode():
        session = KVSession(float_model, 64)
        session.prefill(prompt)
        exact = torch.stack([session.step(t) for t in fused])
    assert (steps["fused"] - exact).abs().max() < 0.1 * exact.abs().max()


def test_native_batched_decode_rows_at_different_positions(tmp_path) -> None:
    """The server's batched step (tokens (B, 1), positions (B, 1), cache rows) through the native call equals
    each row decoded through the module path."""
    _, loaded = _native_gguf(tmp_path, "Q4_0")
    model = loaded.model
    prompts = [[3, 14, 15, 92, 65], [8, 9], [40, 41, 42]]
    model.setup_cache(3, 32)
    with torch.inference_mode():
        for row, p in enumerate(prompts):
            model(torch.tensor([p]), torch.arange(len(p))[None], rows=torch.tensor([row]))
        tokens = torch.tensor([[7], [11], [13]])
        positions = torch.tensor([[len(p)] for p in prompts])
        batched = model(tokens, positions, rows=torch.tensor([0, 1, 2]))[:, 0]
        step = model.fused_step
        model.fused_step = None
        model.setup_cache(3, 32)
        for row, p in enumerate(prompts):
            model(torch.tensor([p]), torch.arange(len(p))[None], rows=torch.tensor([row]))
        single = model(tokens, positions, rows=torch.tensor([0, 1, 2]))[:, 0]
        model.fused_step = step
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-4)


def test_native_weights_are_one_repacked_copy(smollm2_gguf) -> None:
    """The built-in model's Q4_1 matrices are repacked (8 rows interleaved) as they load, and that copy is the
    only one: their file pages are handed back. Its Q8_0 embedding, also the tied output, stays one view of the
    file that both read (blocks.load_layout): the mapping keeps little more than that tensor resident."""
    from camelid import kernels
    from camelid.kernels.blocks import PACKED, TYPES
    if kernels.ext() is None:
        pytest.skip("native kernels not built here")
    if kernels.ext().isa() == "scalar":
        pytest.skip("no repacked layout without AVX2")
    loaded = load_model(smollm2_gguf, quant="native", fuse=True)
    embed = loaded.model.model.embed_tokens
    down = loaded.model.model.layers[7].mlp.down_proj
    assert down.types[0] == TYPES["Q4_1"] + PACKED and embed.qtype == TYPES["Q8_0"]
    assert loaded.model.lm_head.blocks0.data_ptr() == embed.blocks.data_ptr()  # the tied output reads the same
    start, end = _mapping(smollm2_gguf)
    assert start <= embed.blocks.data_ptr() < end
    with torch.no_grad():
        loaded.model(torch.tensor([[1, 2, 3]]))  # reads the whole output matrix, so the whole embedding
    size = smollm2_gguf.stat().st_size - embed.blocks.numel()  # the bytes the repack hands back
    rss, in_map = 0, False
    for line in open("/proc/self/smaps"):
        if "-" in line.split()[0] and len(line.split()) >= 5:
            in_map = line.rstrip().endswith(str(smollm2_gguf.resolve()))
        elif in_map and line.startswith("Rss:"):
            rss += int(line.split()[1]) * 1024
    assert rss >= 0.95 * embed.blocks.numel()  # the embedding is read where it lies
    rss -= embed.blocks.numel()
    assert rss < 0.1 * size, f"{rss} bytes of the {size}-byte file still resident in the mapping"


def test_q8_0_matrices_stay_views_of_the_file(tiny_formats) -> None:
    """Q8_0 matrices are not repacked (the decode kernel reads their rows as fast): they stay zero-copy views
    of the memory-mapped file (test_load_formats checks its logits and tokens against transformers')."""
    from camelid import kernels
    if kernels.ext() is None:
        pytest.skip("native kernels not built here")
    path = Path(tiny_formats["gguf-q8_0"][0])
    loaded = load_model(path, quant="native", fuse=True)
    down = loaded.model.model.layers[0].mlp.down_proj
    assert down.types == [2]
    start, end = _mapping(path)
    assert start <= down.blocks0.data_ptr() < end


def _mapping(path) -> tuple[int, int]:
    """Address range of the process's mapping of `path`."""
    for line in open("/proc/self/maps"):
        fields = line.split()
        if len(fields) >= 6 and fields[5] == str(path.resolve()):
            lo, hi = (int(v, 16) for v in fields[0].split("-"))
            return lo, hi
    raise AssertionError(f"{path} is not mapped")
