"""`camelid train --text-data`: next-token training on windows of `camelid data tokenize` folders, with the
loss checked against transformers on the same windows."""
from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from camelid.data.tokenize import tokenize_corpus
from camelid.errors import CamelidError
from camelid.packing import IGNORE
from camelid.text_data import TextWindows
from camelid.train.loop import train
from camelid.train.options import TrainConfig
from camelid.train.schedule import Schedule
from tests.builders import transformers_folder
from tests.helpers import one_line_error

WORDS = "the cat sat on a mat and looked at one dog which ran away quickly into the old garden".split()


def write_tokens(folder: Path, model: Path, docs: int, seed: int, cache: Path) -> Path:
    rng = random.Random(seed)
    src = folder.with_suffix(".jsonl")
    lines = [json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40)))}) for _ in range(docs)]
    src.write_text("\n".join(lines) + "\n")
    tokenize_corpus([str(src)], folder, model=str(model), cache_dir=str(cache), quiet=True)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, llama2_tokenizer_dir) -> tuple[Path, Path, Path]:
    """A tiny random LLaMA with the LLaMA-2 tokenizer (transformers' own save) and two token folders."""
    root = tmp_path_factory.mktemp("tiny_text")
    transformers_folder(root / "model", llama2_tokenizer_dir, hidden_size=64, intermediate_size=128,
                        max_position_embeddings=256, tie_word_embeddings=False)
    a = write_tokens(root / "web", root / "model", 120, 0, root / "cache")
    b = write_tokens(root / "code", root / "model", 40, 1, root / "cache")
    return root / "model", a, b


def run(model: Path, out: Path, **options) -> dict:
    settings = dict(model=str(model), out=str(out), seq_len=32, batch_size=2, lr=3e-3, warmup=1, quiet=True,
                    force=True)
    settings.update(options)
    stop = settings.pop("stop_after", None)
    return train(TrainConfig(**settings), stop_after=stop)


def log_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def reference_loss(hf: LlamaForCausalLM, tokens, labels, segments) -> float:
    """Sum of token losses / trained tokens, each document of a window run on its own through transformers."""
    total, count = 0.0, 0
    with torch.no_grad():
        for t, l, s in zip(tokens, labels, segments):
            for seg in s.unique():
                keep = s == seg
                logits = hf(t[keep][None]).logits[0]
                target = l[keep]
                trained = target != IGNORE
                total += F.cross_entropy(logits[trained], target[trained], reduction="sum").item()
                count += int(trained.sum())
    return total / count


@pytest.mark.parametrize("document_mask", [False, True])
def test_first_losses_equal_transformers_on_the_same_windows(tiny, tmp_path, document_mask):
    model_dir, web, _ = tiny
    result = run(model_dir, tmp_path / "out", text_data=[str(web)], lr=0.0, max_steps=3,
                 document_mask=document_mask, seed=3)
    data = TextWindows([str(web)], 32, document_mask=document_mask, seed=3)
    schedule = Schedule(len(data), 2, 1, 1, 3)
    hf = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    for step, loss in enumerate(result["losses"]):
        tokens, labels, positions, segments = data.batch(schedule.rows(step, 0))
        if document_mask:
            assert (segments.max(dim=1).values > 0).any(), "no window spans two documents: the mask is untested"
            assert (labels == IGNORE).any()
        else:
            assert (segments == 0).all() and (labels != IGNORE).all()
        assert abs(loss - reference_loss(hf, tokens, labels, segments)) < 1e-5


def test_windows_cover_the_tokens_and_mix_by_weight(tiny):
    _, web, code = tiny
    data = TextWindows([f"{web}:3", f"{code}:1"], 16, seed=0)
    n_web, n_code = data.folders[0].windows(16), data.folders[1].windows(16)
    assert sum(data.shares) == n_web + n_code
    assert abs(data.shares[0] / data.shares[1] - 3) < 0.1
    tokens, labels, positions, _ = data.batch(torch.arange(len(data)))
    # Every window's labels are its tokens shifted by one, read from the memory-mapped array.
    for (f, w), t, l in zip(data.table.tolist(), tokens, labels):
        raw = torch.from_numpy(data.folders[f].tokens[w * 16:w * 16 + 17].astype("int64"))
        assert torch.equal(t, raw[:-1]) and torch.equal(l, raw[1:])
    assert (positions == torch.arange(16)).all()


def test_resume_mid_epoch_is_bit_identical(tiny, tmp_path):
    model_dir, web, code = tiny
    options = dict(text_data=[f"{web}:2", f"{code}:1"], document_mask=True, max_steps=6, save_every=3)
    full = run(model_dir, tmp_path / "full", **options)
    log = log_of(tmp_path / "full")
    assert log[-1]["epoch"] < 1  # the run ends inside its first epoch
    assert full["losses"][-1] < full["losses"][0]
    part = run(model_dir, tmp_path / "part", stop_after=4, **options)
    assert part["losses"] == full["losses"][:4]
    resumed = run(model_dir, tmp_path / "part", resume=True, force=False, **options)
    assert resumed["losses"] == full["losses"][3:]
    from safetensors.torch import load_file
    wa, wb = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "part" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (tmp_path / "full" / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_text_data_is_refused(tiny, tmp_path, smollm2_gguf, camelid_bin):
    model_dir, web, _ = tiny
    with pytest.raises(CamelidError, match="another tokenizer"):
        TextWindows([str(web)], 16, tokenizer_sha="0" * 64)
    with pytest.raises(CamelidError, match="no manifest.json"):
        TextWindows([str(tmp_path)], 16)
    with pytest.raises(CamelidError, match="no window"):
        TextWindows([str(web)], 10**7)
    with pytest.raises(CamelidError, match="weight"):
        TextWindows([f"{web}:-1"], 16)
    proc = subprocess.run([str(camelid_bin), "train", "--model", str(smollm2_gguf), "--text-data", str(web),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    one_line_error(proc, "another tokenizer", "tokenize it again")
    proc = subprocess.run([str(camelid_bin), "train", "--document-mask", "--data", str(tmp_path),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    one_line_error(proc, "--document-mask")


@pytest.mark.slow
def test_builtin_model_learns_a_repeated_text(tmp_path, camelid_bin):
    text = ("The quick brown llama jumps over the lazy alpaca while the koala watches from the eucalyptus tree. "
            "Camelids are even-toed ungulates that chew the cud.")
    (tmp_path / "rep.txt").write_text("\n\n".join([text] * 40) + "\n")
    proc = subprocess.run([str(camelid_bin), "data", "tokenize", "--source", str(tmp_path / "rep.txt"), "--out",
                           str(tmp_path / "tok"), "--cache-dir", str(tmp_path / "cache"), "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([str(camelid_bin), "train", "--text-data", str(tmp_path / "tok"), "--out",
                           str(tmp_path / "run"), "--max-steps", "20", "--seq-len", "64", "--batch-size", "2",
                           "--lr", "1e-4", "--quiet", "--keep-checkpoints", "1"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [r["loss"] for r in log_of(tmp_path / "run")]
    assert len(losses) == 20 and sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses
    assert (tmp_path / "run" / "loss.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_two_process_fsdp_matches_one_process(tiny, tmp_path):
    import os
    import sys
    model_dir, web, code = tiny
    common = ["-m", "camelid.cli", "train", "--model", str(model_dir), "--text-data", f"{web}:2", f"{code}:1",
              "--document-mask", "--seq-len", "32", "--max-steps", "3", "--lr", "3e-3", "--quiet", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, *common, "--batch-size", "4", "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          str(20000 + random.randrange(30000)), *common, "--batch-size", "2",
                          "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = log_of(tmp_path / "one"), log_of(tmp_path / "two")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        assert abs(ra["loss"] - rb["loss"]) < 1e-5 and abs(ra["grad_norm"] - rb["grad_norm"]) < 1e-5
