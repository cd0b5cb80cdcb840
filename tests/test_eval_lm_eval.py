"""The lm-evaluation-harness backend against lm-eval's own `hf` model on the same HF folder (float32):
per-request log-likelihoods within 1e-4 and identical metrics, on task YAMLs over local JSON files
(multiple choice, generate_until, rolling log-likelihood); then lm-eval's `local-completions` model
against a live `camelid serve` (/v1/completions with echo + logprobs) giving the same results."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.tasks import TaskManager  # noqa: E402

from camelid.engine import load_model  # noqa: E402
from camelid.eval.lm_eval_backend import CamelidLM  # noqa: E402

from .builders import transformers_folder  # noqa: E402

QUESTIONS = [
    ("The sky on a clear day is", ["blue", "green", "made of cheese", "loud"], 0),
    ("Two plus two equals", ["three", "four", "five apples"], 1),
    ("Water freezes at zero degrees", ["Fahrenheit", "Celsius"], 1),
    ("The opposite of hot is", ["cold", "warm", "tepid water", "boiling"], 0),
    ("A cat says", ["woof", "meow", "moo"], 1),
    ("The capital of France is", ["Berlin", "Madrid", "Paris", "Rome", "Lisbon"], 2),
]
GEN = [("Repeat after me: apple, apple,", " apple"), ("Count: one, two,", " three"), ("Say hi:", " hi"),
       ("The first letter is", " A")]
TEXTS = ["The quick brown fox jumps over the lazy dog. " * 6,
         "In the beginning was the word, and the word was long enough to need several windows. " * 5,
         "Short text."]
SHORT_TEXTS = ["Short text.", "A few words more than that one.", "Hello, world!"]


def write_tasks(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = {"mc": [{"question": q, "choices": c, "answer": a} for q, c, a in QUESTIONS],
            "gen": [{"prompt": p, "target": t} for p, t in GEN],
            "roll": [{"text": t} for t in TEXTS],
            "roll_short": [{"text": t} for t in SHORT_TEXTS]}
    for name, docs in rows.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder}/{{}}.jsonl\ntest_split: test\n"
    (folder / "mc.yaml").write_text("task: camelid_mc\n" + common.format("mc") + """output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    (folder / "gen.yaml").write_text("task: camelid_gen\n" + common.format("gen") + """output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: "{{target}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
""")
    for name in ("roll", "roll_short"):
        (folder / f"{name}.yaml").write_text(f"task: camelid_{name}\n" + common.format(name) + """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""")
    return folder


TASKS = ["camelid_mc", "camelid_gen", "camelid_roll", "camelid_roll_short"]
# lm-eval's API models cut inputs to max_length tokens where its hf model reads max_length + 1 and drops the
# last, so texts longer than one window are scored over slightly different windows: compared on short texts.
API_TASKS = ["camelid_mc", "camelid_gen", "camelid_roll_short"]


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory, llama2_tokenizer_dir: Path) -> Path:
    """A small random LLaMA with the Llama-2 tokenizer (BOS added, SentencePiece-style pieces); the
    context (48) is short enough that the rolling task needs several windows and long inputs are truncated."""
    return transformers_folder(tmp_path_factory.mktemp("lmeval") / "tiny", llama2_tokenizer_dir, std=0.3,
                               hidden_size=64, intermediate_size=128, max_position_embeddings=48,
                               bos_token_id=1, eos_token_id=2)


def evaluate(model, tasks_dir: Path, tasks: list[str] = TASKS, **kwargs) -> dict:
    return lm_eval.simple_evaluate(model=model, tasks=tasks, task_manager=TaskManager(include_path=str(tasks_dir)),
                                   log_samples=True, bootstrap_iters=0, **kwargs)


def responses(result: dict) -> dict[str, list]:
    """Each task's per-request model outputs, in document order."""
    out = {}
    for task, samples in result["samples"].items():
        out[task] = [r for s in sorted(samples, key=lambda s: s["doc_id"]) for r in s["resps"]]
    return out


def assert_same(ours: dict, theirs: dict, tasks: list[str] = TASKS) -> None:
    a, b = responses(ours), responses(theirs)
    assert set(tasks) <= a.keys() and set(tasks) <= b.keys()
    for task in tasks:
        assert len(a[task]) == len(b[task]) > 0, task
        for x, y in zip(a[task], b[task]):
            x, y = x[0], y[0]
            if isinstance(x, str):
                assert x == y, task
            elif isinstance(x, (list, tuple)):  # (loglikelihood, is_greedy)
                assert abs(float(x[0]) - float(y[0])) <= 1e-4 * max(1.0, abs(float(y[0]))), (task, x, y)
                assert bool(x[1]) == bool(y[1]), (task, x, y)
            else:  # rolling log-likelihood
                assert abs(float(x) - float(y)) <= 1e-4 * max(1.0, abs(float(y))), (task, x, y)
    for task in tasks:
        for metric, value in theirs["results"][task].items():
            if metric == "alias" or "stderr" in metric:
                continue
            mine = ours["results"][task][metric]
            if "perplexity" in metric or "bits" in metric:
                assert abs(mine - value) <= 1e-4 * abs(value), (task, metric, mine, value)
            else:
                assert mine == value, (task, metric, mine, value)


@pytest.fixture(scope="module")
def hf_result(tiny_hf: Path, tmp_path_factory) -> dict:
    from lm_eval.models.huggingface import HFLM
    tasks = write_tasks(tmp_path_factory.mktemp("tasks"))
    hf = HFLM(pretrained=str(tiny_hf), dtype="float32", batch_size=4, device="cpu")
    return evaluate(hf, tasks), tasks


def test_camelid_backend_equals_lm_eval_hf_model(tiny_hf: Path, hf_result) -> None:
    theirs, tasks = hf_result
    ours = evaluate(CamelidLM(load_model(tiny_hf, fuse=True), batch_size=5), tasks)
    assert_same(ours, theirs)
    assert any(r[0] for r in responses(ours)["camelid_gen"])  # real generated text, not empty strings
    assert theirs["results"]["camelid_roll"]["word_perplexity,none"] > 1


def test_local_completions_against_camelid_serve_equals_lm_eval_hf_model(tiny_hf: Path, hf_result, tmp_path) -> None:
    from camelid.serve.launch import start_server
    theirs, tasks = hf_result
    server = start_server(["--model", f"tiny={tiny_hf}", "--context", "48", "--max-batch", "4"], tmp_path / "log")
    try:
        ours = evaluate("local-completions", tasks, API_TASKS, model_args=f"model=tiny,base_url={server.url}/v1/completions,"
                        f"tokenizer_backend=huggingface,tokenizer={tiny_hf},add_bos_token=True,max_length=48,"
                        "num_concurrent=1,max_retries=1")
    finally:
        server.stop()
    assert_same(ours, theirs, API_TASKS)


@pytest.mark.slow
def test_cli_on_builtin_model_with_chat_template(camelid_bin: Path, tmp_path: Path) -> None:
    tasks = write_tasks(tmp_path / "tasks")
    out = tmp_path / "results.json"
    proc = subprocess.run([str(camelid_bin), "eval", "lm-eval", "--tasks", "camelid_mc,camelid_gen", "--include-path",
                           str(tasks), "--limit", "3", "--apply-chat-template", "--log-samples", "--output", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["n-samples"]["camelid_mc"]["effective"] == 3
    assert 0 <= result["results"]["camelid_mc"]["acc,none"] <= 1
    prompt = result["samples"]["camelid_mc"][0]["arguments"][0][0]
    assert prompt.startswith("<|im_start|>system") and prompt.rstrip().endswith("<|im_start|>assistant")


def test_cli_unknown_task_is_one_line(camelid_bin: Path, tmp_path: Path) -> None:
    from .helpers import one_line_error
    tasks = write_tasks(tmp_path / "tasks")
    proc = subprocess.run([str(camelid_bin), "eval", "lm-eval", "--tasks", "camelid_nope", "--include-path",
                           str(tasks)], capture_output=True, text=True, timeout=300)
    one_line_error(proc, "camelid_nope")
