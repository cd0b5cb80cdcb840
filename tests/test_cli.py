"""The `camelid` command end to end on the built-in model, as a user runs it."""
from __future__ import annotations

import json
import subprocess

from camelid.engine import load_model
from camelid.generate import Generation, SamplingParams
from .helpers import run_camelid


def run(camelid_bin, *args: str, stdin: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return run_camelid(camelid_bin, *args, stdin=stdin, timeout=timeout)


def test_generate_prints_only_the_greedy_completion(camelid_bin) -> None:
    prompt = "The three primary colors are"
    result = run(camelid_bin, "generate", "--max-new-tokens", "12", prompt)
    assert result.returncode == 0, result.stderr
    loaded = load_model(quant="auto", fuse=True)  # what the command does: the Q4_1 file on its own blocks
    ids = loaded.tokenizer.encode(prompt)
    tokens = list(Generation(loaded.model, ids, SamplingParams(max_new_tokens=12), stop_ids=loaded.tokenizer.stop_ids))
    assert result.stdout == loaded.tokenizer.decode(tokens) + "\n"
    assert prompt not in result.stdout


def test_chat_answers_through_the_models_template(camelid_bin) -> None:
    result = run(camelid_bin, "chat", "--temperature", "0", "--max-new-tokens", "24", "--show-prompt",
                 stdin="What is 2+2?\n/reset\nSay hello.\n/exit\n")
    assert result.returncode == 0, result.stderr
    replies = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(replies) >= 2
    # The rendered prompt is SmolLM2's ChatML with its default system message.
    assert "<|im_start|>system\nYou are a helpful AI assistant named SmolLM" in result.stderr
    assert "<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\n" in result.stderr
    assert "What is 2+2?" not in result.stderr.split("Say hello.")[0].split("(history cleared)")[-1]


def test_info_describes_the_builtin_model(camelid_bin) -> None:
    result = run(camelid_bin, "info", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["tensors"] == 272 and info["tensor_types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    assert info["config"]["num_layers"] == 30 and "<|im_start|>" in info["chat_template"]
    text = run(camelid_bin, "info").stdout
    assert "num_kv_heads: 3" in text and "272 (" in text


def test_bad_input_is_one_line_and_exit_code_2(camelid_bin, tmp_path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 30)
    for args in (["generate", "--model", str(tmp_path / "nope"), "hi"], ["info", str(bad)],
                 ["generate", "--top-p", "3", "hi"]):
        result = run(camelid_bin, *args)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("camelid: error:"), result.stderr
        assert "Traceback" not in result.stderr


def test_chat_commands_save_load_system_regen_and_multiline(camelid_bin, tmp_path) -> None:
    saved = tmp_path / "conversation.json"
    script = "\n".join([
        "/system You are terse.",
        "Name a colour\\",        # a trailing backslash continues the message on the next line
        "of the sky.",
        "/regen",
        f"/save {saved}",
        "/reset",
        f"/load {saved}",
        "/load /nonexistent/file.json",
        "/exit",
    ]) + "\n"
    # float32 (--quant none): /regen recomputes only the prompt's last token (the rest comes from the prefix
    # cache), and only float math makes that bit-identical to the first full prefill; on the native blocks the
    # prefill runs bfloat16 tiles and the one-token step int8 activations, which can flip this model's near ties.
    result = run(camelid_bin, "chat", "--quant", "none", "--temperature", "0", "--max-new-tokens", "8",
                 "--show-prompt", stdin=script)
    assert result.returncode == 0, result.stderr
    messages = json.loads(saved.read_text())
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[0]["content"] == "You are terse." and messages[1]["content"] == "Name a colour\nof the sky."
    # Greedy: the regenerated reply equals the first one; both prompts were the same two-turn render.
    assert result.stderr.count("<|im_start|>system\nYou are terse.<|im_end|>") == 2
    assert messages[2]["content"] and result.stdout == (messages[2]["content"] + "\n") * 2
    assert "(loaded 3 messages" in result.stderr and "camelid: error: /load /nonexistent/file.json" in result.stderr
