"""`camelid eval perplexity` against the peers on the same weights and tokens: transformers' strided
window (Hugging Face's perplexity guide, float32) and llama.cpp's windows through llama-cpp-python."""
from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from camelid.formats.gguf import tokenizer_of
from camelid.engine import load_model
from camelid.eval.perplexity import llamacpp_windows, perplexity, sliding_windows

from .builders import transformers_folder
from .helpers import one_line_error, run_camelid

ROOT = Path(__file__).resolve().parent.parent
# A fixed English text (the head of an early README), so figures do not move when the README changes.
TEXT = (ROOT / "tests" / "assets" / "perplexity_text.txt").read_text(encoding="utf-8")


def hf_guide_perplexity(model, ids: torch.Tensor, context: int, stride: int) -> float:
    """The Hugging Face guide's loop, with each window's loss weighted by the tokens it actually scored."""
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    seq_len = ids.shape[1]
    for begin in range(0, seq_len, stride):
        end = min(begin + context, seq_len)
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        scored = int((target_ids[:, 1:] != -100).sum())
        nll_sum += float(loss) * scored
        n_tokens += scored
        prev_end = end
        if end == seq_len:
            break
    return math.exp(nll_sum / n_tokens)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    return transformers_folder(tmp_path_factory.mktemp("tiny") / "hf", std=0.2, vocab_size=151, hidden_size=64,
                               intermediate_size=160, max_position_embeddings=256)


@pytest.mark.parametrize("context,stride,batch", [(64, 24, 1), (64, 24, 4), (64, 64, 2), (100, 37, 3)])
def test_sliding_window_equals_transformers(tiny_hf: Path, context: int, stride: int, batch: int) -> None:
    ref = AutoModelForCausalLM.from_pretrained(tiny_hf, dtype=torch.float32).eval()
    ids = torch.randint(0, 151, (1, 333), generator=torch.Generator().manual_seed(1))
    expected = hf_guide_perplexity(ref, ids, context, stride)
    ours = perplexity(load_model(tiny_hf, fuse=True).model, ids[0].tolist(), method="sliding", context=context,
                      stride=stride, batch=batch)
    # Every token but the first, once; with stride == context each window's first token has no context.
    assert ours.scored == (332 if stride < context else 333 - ours.windows)
    assert abs(ours.ppl - expected) / expected < 1e-4, (ours.ppl, expected)


def test_sliding_windows_score_every_token_once() -> None:
    for n, context, stride in [(10, 4, 1), (333, 64, 24), (50, 50, 50), (51, 50, 7)]:
        positions = []
        for begin, end, first in sliding_windows(n, context, stride):
            positions += [begin + p + 1 for p in range(first, end - begin - 1)]
        assert positions == list(range(1, n)), (n, context, stride)


def test_llamacpp_method_and_its_standard_error(tiny_hf: Path) -> None:
    """Second halves of non-overlapping windows, BOS over each window's first token, llama.cpp's error formula."""
    ref = AutoModelForCausalLM.from_pretrained(tiny_hf, dtype=torch.float32).eval()
    ids = torch.randint(2, 151, (333,), generator=torch.Generator().manual_seed(2)).tolist()
    nlls = []
    for w in llamacpp_windows(ids, 64, bos_id=1):
        assert w[0] == 1 and len(w) == 64
        with torch.no_grad():
            logp = torch.log_softmax(ref(torch.tensor([w])).logits[0].double(), -1)
        nlls += [-float(logp[j, w[j + 1]]) for j in range(32, 63)]
    got = perplexity(load_model(tiny_hf, fuse=True).model, ids, context=64, batch=2, bos_id=1)
    assert got.windows == 5 and got.scored == 5 * 31 == len(nlls)
    nll = torch.tensor(nlls, dtype=torch.float64)
    ppl = math.exp(float(nll.mean()))
    err = math.sqrt(float((nll * nll).mean() - nll.mean() ** 2) / (len(nlls) - 1)) * ppl
    assert abs(got.ppl - ppl) / ppl < 1e-5 and abs(got.stderr - err) / err < 1e-4


@pytest.fixture(scope="module")
def builtin_hf(tmp_path_factory, smollm2_gguf, camelid_bin) -> Path:
    out = tmp_path_factory.mktemp("smollm2") / "hf"
    proc = subprocess.run([str(camelid_bin), "convert", str(smollm2_gguf), str(out), "--to", "hf", "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    write_gguf_tokenizer(smollm2_gguf, out)
    return out


def write_gguf_tokenizer(gguf_path: Path, folder: Path) -> None:
    """The GGUF's vocabulary as tokenizer.json + tokenizer_config.json, so transformers reads the same tokens."""
    tok = tokenizer_of(gguf_path)
    tok._backend.tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "bos_token": tok.bos_token,
        "eos_token": tok.eos_token, "chat_template": tok.chat_template}))


def run_cli(camelid_bin: Path, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    return run_camelid(camelid_bin, "eval", "perplexity", *args, timeout=timeout)


def test_cli_on_builtin_model_converted_to_hf_equals_transformers(builtin_hf: Path, camelid_bin: Path,
                                                                 tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    proc = run_cli(camelid_bin, "--model", builtin_hf, "--text", text, "--method", "sliding", "--context", "128",
                   "--stride", "96", "--batch", "2", "--output", tmp_path / "ppl.json")
    assert proc.returncode == 0, proc.stderr
    assert "Final estimate: PPL =" in proc.stderr
    result = json.loads((tmp_path / "ppl.json").read_text())
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(builtin_hf)
    ids = tok(TEXT, return_tensors="pt").input_ids
    assert result["tokens"] == ids.shape[1]
    ref = AutoModelForCausalLM.from_pretrained(builtin_hf, dtype=torch.float32).eval()
    expected = hf_guide_perplexity(ref, ids, 128, 96)
    assert abs(result["ppl"] - expected) / expected < 1e-4, (result["ppl"], expected)


def llama_cpp_perplexity(path: Path, ids: list[int], context: int) -> float:
    """llama.cpp's own logits (every position) over the same windows, scored like llama-perplexity."""
    import numpy as np
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=context, n_batch=context, logits_all=True, verbose=False)
    nll, n = 0.0, 0
    for w in llamacpp_windows(ids, context, None):
        llm.reset()
        llm.eval(w)
        logits = np.asarray(llm.scores[:context], dtype=np.float64)
        logp = logits - logits.max(1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(1, keepdims=True))
        for j in range(context // 2, context - 1):
            nll -= logp[j, w[j + 1]]
            n += 1
    return math.exp(nll / n)


@pytest.mark.parametrize("quant", [None, pytest.param("q8_0", marks=pytest.mark.slow),
                                   pytest.param("q4_0", marks=pytest.mark.slow)])
def test_gguf_agrees_with_llama_cpp(smollm2_gguf: Path, camelid_bin: Path, tmp_path: Path, quant) -> None:
    """The built-in Q4_1 file and `camelid convert`ed Q8_0 / Q4_0 files: within 0.5% of llama.cpp (which
    rounds activations to 8 bits in its quantized dot products; camelid computes in float32)."""
    pytest.importorskip("llama_cpp")
    path = smollm2_gguf
    if quant:
        path = tmp_path / f"m.{quant}.gguf"
        proc = subprocess.run([str(camelid_bin), "convert", str(smollm2_gguf), str(path), "--to", "gguf",
                               "--quant", quant, "--quiet"], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    proc = run_cli(camelid_bin, "--model", path, "--text", text, "--context", "256", "--batch", "2", "--quiet")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    ids = load_model(path).tokenizer.encode(TEXT)
    assert result["tokens"] == len(ids) and result["scored"] == (len(ids) // 256) * 127
    expected = llama_cpp_perplexity(path, ids, 256)
    assert abs(result["ppl"] - expected) / expected < 0.005, (result["ppl"], expected)


@pytest.mark.parametrize("args,words", [
    (["--text", "/nonexistent.txt"], ["--text", "no such file"]),
    (["--text", "README.md", "--stride", "8"], ["--stride", "sliding"]),
    (["--text", "README.md", "--method", "sliding"], ["--stride"]),
    (["--text", "README.md", "--context", "2"], ["--context"]),
    (["--text", "README.md", "--model", "/nonexistent"], ["/nonexistent"]),
])
def test_bad_input_is_one_line_before_loading(camelid_bin: Path, args, words) -> None:
    proc = subprocess.run([str(camelid_bin), "eval", "perplexity", *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    one_line_error(proc, *words)


def test_text_shorter_than_a_window(camelid_bin: Path, tmp_path: Path) -> None:
    text = tmp_path / "short.txt"
    text.write_text("Too short.", encoding="utf-8")
    one_line_error(run_cli(camelid_bin, "--text", text, "--context", "512"), "short.txt", "fewer than one window")
