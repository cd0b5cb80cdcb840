"""`camelid templates`, `camelid prompt` and `camelid chat --template` as a user runs them."""
from __future__ import annotations

import json
import subprocess

from camelid.chat import get_template, list_templates
from camelid.cli import main
from camelid.tokenizer import Tokenizer

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a colour."}]


def test_templates_lists_every_template_with_a_description(capsys) -> None:
    assert main(["templates"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(list_templates())
    for line, (name, description) in zip(lines, list_templates()):
        assert line.split()[0] == name and line.rstrip().endswith(description)


def test_prompt_prints_text_and_ids(tmp_path, capsys, llama2_tokenizer_dir) -> None:
    messages = tmp_path / "m.json"
    messages.write_text(json.dumps(CONVERSATION), encoding="utf-8")
    assert main(["prompt", "--template", "llama-2", "--messages", str(messages)]) == 0
    assert capsys.readouterr().out == get_template("llama-2").render_text(CONVERSATION) + "\n"
    assert main(["prompt", "--template", "llama-2", "--messages", str(messages), "--no-generation-prompt"]) == 0
    assert capsys.readouterr().out.endswith("[INST] Name a colour. \n")  # no "[/INST]": the model's turn is not opened
    assert main(["prompt", "--template", "llama-2", "--messages", str(messages), "--ids",
                 "--tokenizer", str(llama2_tokenizer_dir)]) == 0
    out = json.loads(capsys.readouterr().out)
    tok = Tokenizer.from_folder(llama2_tokenizer_dir)
    ids, mask = get_template("llama-2").render_ids(CONVERSATION, tok)
    assert out["template"] == "llama-2" and out["ids"] == ids and out["mask"] == [int(m) for m in mask]
    assert out["text"] == tok.decode(ids) and out["text"].count("<s>") == 2 and out["text"].count("</s>") == 1
    finished = tmp_path / "done.json"
    finished.write_text(json.dumps(CONVERSATION[:3]), encoding="utf-8")
    assert main(["prompt", "--template", "vicuna", "--messages", str(finished), "--no-generation-prompt"]) == 0
    assert capsys.readouterr().out == "Be brief. USER: Hi ASSISTANT: Hello.</s>\n"


def test_prompt_errors_exit_2_with_one_clear_line(tmp_path, camelid_bin, capsys) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("[{'role': 'user'}", encoding="utf-8")
    twice = tmp_path / "twice.json"
    twice.write_text(json.dumps([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]))
    finished = tmp_path / "finished.json"
    finished.write_text(json.dumps([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]))
    cases = [
        (("--template", "vicuna", "--messages", str(bad)), "cannot read a JSON list of messages"),
        (("--template", "vicuna", "--messages", str(tmp_path / "missing.json")), "cannot read a JSON list"),
        (("--template", "vicuna", "--messages", str(twice)), "message 2 is 'user' right after another 'user'"),
        (("--template", "vicuna", "--messages", str(finished)), "use --no-generation-prompt"),
        (("--template", "vicunaa", "--messages", str(twice)), "no conversation template named 'vicunaa'"),
        (("--template", "vicuna", "--messages", str(twice), "--ids"), "--ids needs --tokenizer"),
    ]
    for args, message in cases:
        assert main(["prompt", *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("camelid: error: ") and message in err, err
        assert len(err.strip().splitlines()) == 1
    # The installed command, end to end: exit status 2 and the one line, no traceback.
    result = subprocess.run([str(camelid_bin), "prompt", "--template", "vicuna", "--messages", str(bad)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("camelid: error: --messages ")
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_chat_with_a_named_template_shows_its_prompt_and_stops_on_its_stop_string(camelid_bin) -> None:
    # fastllm's YuLan prompt on the built-in SmolLM2: greedy, the model answers and then goes on to write
    # "[|Human|]:..." itself; the template's stop string ends the reply there.
    # Float weights (--quant none): the greedy text checked below is the float model's; the native kernels'
    # 8-bit activations take another branch at a near tie.
    result = subprocess.run([str(camelid_bin), "chat", "--template", "fastllm-yulan", "--show-prompt",
                             "--quant", "none", "--temperature", "0", "--max-new-tokens", "24"],
                            input="Say hi.\n/exit\n", capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "(fastllm-yulan template)" in result.stderr
    prompt = get_template("fastllm-yulan").render_text([{"role": "user", "content": "Say hi."}])
    assert prompt in result.stderr
    assert "[|Human|]" not in result.stdout
    assert result.stdout.count("I'm here to chat") == 1, result.stdout
