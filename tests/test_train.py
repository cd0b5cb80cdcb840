"""Training: loss masks from the templates, packing without cross-talk, full and LoRA fine-tuning, exact
resume, 2-process FSDP against 1 process, and the built-in SmolLM2 trained and loaded by `camelid generate`.
Peers: transformers (logits of saved checkpoints), peft (our adapters), torchrun (the real launcher)."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from camelid.cli import main as cli_main
from camelid.engine import load_model
from camelid.lora import load_adapter, merge_lora
from camelid.packing import IGNORE, attention_mask, pack
from camelid.chat import get_template
from camelid.formats.gguf import tokenizer_of
from camelid.tokenizer import Tokenizer
from camelid.train.loop import train
from camelid.train.loss import clip_gradients, score_cost, square_sum, token_loss_sum, unpad
from camelid.train.options import TrainConfig

from .builders import transformers_folder, write_data

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "It is 4."}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, llama2_tokenizer_dir) -> tuple[Path, Path]:
    """A tiny random LLaMA (transformers' own save) with the LLaMA-2 tokenizer, and a conversation folder."""
    root = tmp_path_factory.mktemp("tiny")
    transformers_folder(root / "model", llama2_tokenizer_dir, hidden_size=64, intermediate_size=128,
                        max_position_embeddings=256, tie_word_embeddings=False)
    return root / "model", write_data(root / "data")


def run(model: Path, data: Path, out: Path, **options) -> dict:
    settings = dict(model=str(model), data=str(data), out=str(out), template="koala_v1", seq_len=64,
                    batch_size=4, lr=3e-3, warmup=1, quiet=True, force=True)
    settings.update(options)
    stop = settings.pop("stop_after", None)
    return train(TrainConfig(**settings), stop_after=stop)


def log_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


# ---- loss masks and packing -------------------------------------------------------------------------------
@pytest.mark.parametrize("name, ends", [("koala_v1", "</s>"), ("vicuna_v1.1", "</s>"), ("llama-2", " </s>"),
                                        ("chatml", "<|im_end|>")])
def test_loss_mask_is_the_replies_and_their_end_token(name: str, ends: str, llama2_tokenizer_dir, smollm2_gguf) -> None:
    tok = tokenizer_of(smollm2_gguf) if name == "chatml" else Tokenizer.from_folder(llama2_tokenizer_dir)
    messages = MESSAGES[1:] if name == "koala_v1" else MESSAGES  # Koala has no system message
    ids, mask = get_template(name).render_ids(messages, tok, add_generation_prompt=False)
    runs, current = [], []
    for i, m in zip(ids, mask):
        if m:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    assert [tok.decode(r) for r in runs] == ["Hello! How can I help?" + ends, "It is 4." + ends]
    # Packed labels: exactly the trained tokens, each predicted from the token before it.
    packed = pack([(ids, mask)], len(ids) + 5, seed=None)
    labels = packed.labels[0]
    assert labels[labels != IGNORE].tolist() == [i for i, m in zip(ids, mask) if m]
    assert packed.tokens[0, :len(ids)].tolist() == ids


def test_packed_row_logits_equal_each_example_alone(tiny) -> None:
    model_dir, _ = tiny
    model = load_model(model_dir).model
    ref = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rng = random.Random(1)
    examples = [([rng.randrange(3, 32000) for _ in range(n)], [False] + [True] * (n - 1)) for n in (7, 12, 5, 9)]
    packed = pack(examples, 40, seed=None)
    assert len(packed) == 1 and packed.truncated == 0
    with torch.no_grad():
        row = model(packed.tokens, packed.positions, attention_mask(packed.segments))[0]
        at = 0
        for ids, _ in examples:
            alone = ref(torch.tensor([ids])).logits[0]
            assert (row[at:at + len(ids)] - alone).abs().max().item() < 1e-5
            at += len(ids)
    # Cross-talk would show: the same row with plain causal attention gives other logits for example 2.
    with torch.no_grad():
        leaky = model(packed.tokens)[0, 7:19]
    assert (leaky - row[7:19]).abs().max().item() > 1e-3
    # Too long examples are truncated and counted, never split.
    long = pack([(list(range(3, 60)), [True] * 57), examples[0]], 32, seed=None)
    assert long.truncated == 1 and long.tokens.shape == (2, 32)


@pytest.mark.parametrize("lengths, layout, tied", [((7, 12, 5, 9, 20), (1, 53), False),  # rows of 33 + 20: one row
                                                    ((38, 30, 9), (2, 39), False),  # rows of 38 + 39: each cut to 39
                                                    ((7, 12, 5, 9, 20), (1, 53), True)])
def test_unpadded_batch_gives_each_examples_loss_and_gradients(tiny, tmp_path, lengths, layout, tied) -> None:
    """A batch computed with its padding removed: loss sum and gradients equal transformers' on each example
    alone; with a tied embedding, the lookup's sparse gradient (what `train` uses) adds up to the dense one."""
    model_dir, _ = tiny
    if tied:
        torch.manual_seed(1)
        config = LlamaConfig.from_pretrained(model_dir, tie_word_embeddings=True)
        LlamaForCausalLM(config).save_pretrained(tmp_path / "tied")
        model_dir = tmp_path / "tied"
    model = load_model(model_dir).model
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    model.model.embed_tokens.sparse = tied
    ref = AutoModelForCausalLM.from_pretrained(model_dir)
    rng = random.Random(2)
    examples = [([rng.randrange(3, 32000) for _ in range(n)], [False] * 3 + [rng.random() < 0.7 for _ in range(n - 3)])
                for n in lengths]
    packed = pack(examples, 40, seed=None)
    assert len(packed) == 2
    # The layout token_loss_sum picks: the one with fewer flops for this model (a score ~ 1/288 token here).
    cut = unpad(packed.tokens, packed.labels, packed.positions, packed.segments, score_cost(model.config))
    assert cut[0].shape == layout
    ours = token_loss_sum(model, packed.tokens, packed.labels, packed.positions, packed.segments)
    ours.backward()
    theirs = torch.zeros(())
    for ids, mask in examples:
        labels = torch.tensor([i if m else IGNORE for i, m in zip(ids, mask)])
        logits = ref(torch.tensor([ids])).logits[0, :-1]
        theirs = theirs + torch.nn.functional.cross_entropy(logits, labels[1:], reduction="sum")
    theirs.backward()
    assert abs(ours.item() - theirs.item()) < 1e-4 * theirs.item()
    grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad.layout == torch.strided, name  # AdamW(fused=True) takes dense gradients only
        assert (p.grad - grads[name].grad).abs().max().item() < 1e-5 * max(1.0, grads[name].grad.abs().max().item()), name


def test_gradient_clipping_matches_torch() -> None:
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(n, 7)) for n in (3, 50, 1)]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for ps in (ours, theirs):
        for p in ps:
            p.grad = p.detach() * 3
    norm = clip_gradients(ours, 1.0, 1)
    assert abs(norm - torch.nn.utils.clip_grad_norm_(theirs, 1.0).item()) < 1e-5 * norm
    assert all(torch.allclose(a.grad, b.grad, rtol=1e-6, atol=0) for a, b in zip(ours, theirs))
    assert abs(clip_gradients(ours, 0.0, 1) - 1.0) < 1e-5  # clipped to 1 before; 0 measures without clipping
    # Sums of squares of large gradients stay float64-exact (a plain fp32 norm is off by ~1e-3 at this size).
    big = torch.randn(8_000_003) * 1e-3 + 1e-4
    assert abs(square_sum(big).item() / big.double().pow(2).sum().item() - 1) < 1e-7


# ---- training -----------------------------------------------------------------------------------------
def test_training_lowers_the_loss_and_resume_is_exact(tiny, tmp_path: Path) -> None:
    model_dir, data = tiny
    full = run(model_dir, data, tmp_path / "full", max_steps=6, save_every=3, eval_every=3)
    assert full["losses"][-1] < full["losses"][0] - 0.3
    log = log_of(tmp_path / "full")
    assert [r["step"] for r in log if "eval_loss" in r] == [3, 6]
    evals = [r["eval_loss"] for r in log if "eval_loss" in r]
    assert evals[1] < evals[0]
    assert all({"lr", "grad_norm", "tokens_per_s"} <= r.keys() for r in log if "loss" in r)
    assert (tmp_path / "full" / "loss.png").read_bytes()[:4] == b"\x89PNG"

    interrupted = run(model_dir, data, tmp_path / "part", max_steps=6, save_every=3, eval_every=3, stop_after=4)
    assert interrupted["losses"] == full["losses"][:4]
    resumed = run(model_dir, data, tmp_path / "part", max_steps=6, save_every=3, eval_every=3, resume=True, force=False)
    assert resumed["losses"] == full["losses"][3:]  # bit-exact: continued from the step-3 checkpoint
    def timeless(records: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]
    assert timeless(log_of(tmp_path / "part")) == timeless(log)  # eval losses, lr and grad norms too

    # The output is an HF folder: transformers loads it and agrees with camelid.
    out = tmp_path / "full"
    assert json.loads((out / "camelid.json").read_text())["chat_template"] == "koala_v1"
    tokens = torch.tensor([[1, 450, 6635, 3290, 373, 278, 1775]])
    with torch.no_grad():
        ours = load_model(out).model(tokens)
        theirs = AutoModelForCausalLM.from_pretrained(out).eval()(tokens).logits
    assert (ours - theirs).abs().max().item() < 1e-5
    with pytest.raises(Exception, match="already holds a training run"):
        run(model_dir, data, out, max_steps=1, force=False)


def test_lora_adapter_loads_in_peft_and_merges_to_the_same_logits(tiny, tmp_path: Path) -> None:
    from peft import PeftModel
    model_dir, data = tiny
    result = run(model_dir, data, tmp_path / "lora", max_steps=4, lr=1e-2, lora_rank=4, lora_alpha=8,
                 lora_targets="q_proj,v_proj,down_proj", grad_checkpointing=True)
    assert result["losses"][-1] < result["losses"][0]
    adapter = tmp_path / "lora"
    tokens = torch.tensor([[1, 450, 6635, 3290, 373, 278, 1775, 29889]])
    base = load_model(model_dir).model
    load_adapter(base, adapter)
    with torch.no_grad():
        ours = base(tokens)
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter).eval()
        theirs = peft_model(tokens).logits
        plain = AutoModelForCausalLM.from_pretrained(model_dir).eval()(tokens).logits
    assert (ours - theirs).abs().max().item() < 1e-5
    assert (ours - plain).abs().max().item() > 1e-4  # the adapter changed something
    assert cli_main(["lora", "merge", str(adapter), str(tmp_path / "merged")]) == 0
    with torch.no_grad():
        merged = load_model(tmp_path / "merged").model(tokens)
        merge_lora(base)
        in_place = base(tokens)
    assert (merged - ours).abs().max().item() < 1e-5
    assert (in_place - ours).abs().max().item() < 1e-5


@pytest.mark.slow
def test_two_process_fsdp_matches_one_process(tiny, tmp_path: Path) -> None:
    model_dir, data = tiny
    common = ["--model", str(model_dir), "--data", str(data), "--max-steps", "3", "--eval-every", "3", "--quiet",
              "--threads", "1"]
    settings = ["--template", "koala_v1", "--seq-len", "64", "--lr", "3e-3"]
    # The 1-process run takes its settings from a YAML file, the 2-process run from the command line.
    (tmp_path / "train.yaml").write_text("template: koala_v1\nseq-len: 64\nlr: 3.0e-3\nbatch_size: 4\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "camelid.cli", "train", *common, "--options", str(tmp_path / "train.yaml"),
                          "--out", str(tmp_path / "one")], env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          str(29500 + os.getpid() % 1000), "-m", "camelid.cli", "train", *common, *settings, "--batch-size", "2",
                          "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = log_of(tmp_path / "one"), log_of(tmp_path / "two")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 3]
    for ra, rb in zip(a, b):
        for key in ("loss", "grad_norm", "eval_loss"):
            if key in ra:
                assert abs(ra[key] - rb[key]) < 1e-5, (key, ra, rb)
    # The sharded model was gathered parameter by parameter into the same weights.
    wa, wb = load_model(tmp_path / "one").model.state_dict(), load_model(tmp_path / "two").model.state_dict()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5


@pytest.mark.slow  # ~1 min on an idle 2-core machine (the 135M model)
def test_smollm2_finetune_then_generate(tmp_path: Path, camelid_bin: Path) -> None:
    data = write_data(tmp_path / "data", n_train=12, n_eval=2)
    out = tmp_path / "smol"
    result = train(TrainConfig(data=str(data), out=str(out), seq_len=128, batch_size=1, max_steps=10, lr=5e-5,
                               eval_every=10, quiet=True))
    assert len(result["losses"]) == 10 and all(l == l for l in result["losses"])
    assert json.loads((out / "camelid.json").read_text())["chat_template"] == "embedded"
    done = subprocess.run([str(camelid_bin), "generate", "--model", str(out), "--max-new-tokens", "5", "Hello"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip()


def test_options_file_and_the_old_config_spelling(tiny, tmp_path: Path, capsys) -> None:
    """--options FILE sets any option; --config FILE.yaml (train's old spelling) still does, with one notice
    line; both at once are refused in one line."""
    model_dir, data = tiny
    opts = tmp_path / "run.yaml"
    opts.write_text("template: koala_v1\nseq-len: 48\nmax_steps: 1\nbatch-size: 2\nquiet: true\n")
    common = ["train", "--model", str(model_dir), "--data", str(data), "--threads", "1"]
    assert cli_main([*common, "--out", str(tmp_path / "new"), "--options", str(opts)]) == 0
    new_err = capsys.readouterr().err
    assert cli_main([*common, "--out", str(tmp_path / "old"), "--config", str(opts)]) == 0
    notices = [line for line in capsys.readouterr().err.splitlines() if line.startswith("camelid: --config")]
    assert len(notices) == 1 and "--options" in notices[0] and "camelid: --config" not in new_err
    for out in ("new", "old"):
        state = json.loads((tmp_path / out / "checkpoints" / "step-000001" / "trainer_state.json").read_text())
        assert (state["step"], state["config"]["seq_len"], state["config"]["batch_size"]) == (1, 48, 2)
    assert log_of(tmp_path / "new")[0]["loss"] == log_of(tmp_path / "old")[0]["loss"]
    assert cli_main([*common, "--out", str(tmp_path / "both"), "--options", str(opts), "--config", str(opts)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"camelid: error: --config {opts}") and err.count("\n") == 1
    assert not (tmp_path / "both").exists()


def test_bad_device_and_bad_camelid_json_are_one_line(tiny, tmp_path: Path, capsys) -> None:
    """--device and a model's or adapter's camelid.json are checked before the model loads: one line, exit 2."""
    from safetensors.torch import save_file
    model_dir, data = tiny
    common = ["train", "--data", str(data), "--out", str(tmp_path / "out"), "--template", "koala_v1"]
    devices = ["tpu"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in devices:
        assert cli_main([*common, "--model", str(model_dir), "--device", device]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"camelid: error: --device {device}") and err.count("\n") == 1
    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                             "target_modules": ["q_proj"],
                                                             "base_model_name_or_path": str(model_dir)}))
    save_file({}, str(adapter / "adapter_model.safetensors"))
    for text in ("{not json", "[1, 2]"):
        (bad / "camelid.json").write_text(text)
        (adapter / "camelid.json").write_text(text)
        for argv, folder in (([*common, "--model", str(bad)], bad),
                             (["lora", "merge", str(adapter), str(tmp_path / "merged")], adapter)):
            assert cli_main(argv) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"camelid: error: {folder / 'camelid.json'}: ") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "merged").exists()


def test_train_help_shows_the_defaults(capsys) -> None:
    """train's --help shows TrainConfig's defaults, though its options default to None (so that an --options
    file's values hold where the command line says nothing). test_cli_help checks that it imports no torch."""
    from camelid.cli import build_parser
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps help lines
    for shown in ("--options FILE", "--config CONFIG", "--device DEVICE", "(default: 512)", "(default: auto)",
                  "(default: q_proj,v_proj)", "(default: 2e-05)", "(default: float32)"):
        assert shown in out, shown
