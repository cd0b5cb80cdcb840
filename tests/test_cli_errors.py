"""The command line when things go wrong, run as a user runs it (subprocesses of the real `camelid`, tiny models in
the real formats): a full disk or stdout, a taken port, bad options and SIGTERM all end in one line and a known exit
code, with nothing left behind; plus --version, standard input, the loading line and `chat --seed`."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from .builders import llama2_sized_folder
from .helpers import ENV, LIMIT, one_line_error, run_camelid as camelid

@pytest.fixture(scope="module")
def tiny(tmp_path_factory, llama2_tokenizer_dir) -> Path:
    return llama2_sized_folder(tmp_path_factory.mktemp("cli-errors") / "model", llama2_tokenizer_dir)


# ---- defect 3: a full disk or stdout --------------------------------------------------------------------------
@pytest.mark.parametrize("to,name", [("hf", "out"), ("gguf", "out.gguf"), ("easylm", "out"), ("flm", "out.flm"),
                                     ("meta", "out")])
def test_disk_full_convert_is_one_line_and_leaves_nothing(camelid_bin, tiny, tmp_path, to, name) -> None:
    # meta used to abort inside torch's C++ zip writer (exit 134); the others printed a traceback (exit 1).
    proc = camelid(camelid_bin, "convert", tiny, tmp_path / name, "--to", to, "--quiet", fsize=LIMIT)
    one_line_error(proc, name, "disk is full")
    assert list(tmp_path.iterdir()) == []


def test_disk_full_while_a_gguf_vocabulary_is_rebuilt_is_one_line(camelid_bin, smollm2_gguf, tmp_path) -> None:
    # The tokenizer.json rebuilt from the GGUF header (2 MB) is the first write over the limit; tokenizers' own
    # save raised a bare Exception there (a traceback).
    proc = camelid(camelid_bin, "convert", smollm2_gguf, tmp_path / "hf", "--to", "hf", "--quiet", fsize=LIMIT)
    one_line_error(proc, "full")
    assert list(tmp_path.iterdir()) == []


def test_disk_full_quantize_is_one_line_and_leaves_nothing(camelid_bin, tiny, tmp_path) -> None:
    proc = camelid(camelid_bin, "quantize", tiny, tmp_path / "q", "--quant", "int8", "--quiet", fsize=LIMIT)
    one_line_error(proc, "disk is full")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [["templates"], ["info"], ["info", "--json"]])
def test_full_stdout_is_one_line(camelid_bin, args) -> None:
    with open("/dev/full", "w") as full:
        proc = camelid(camelid_bin, *args, stdout=full)
    one_line_error(proc, "standard output", "No space left")


def test_full_stdout_of_prompt(camelid_bin) -> None:
    messages = json.dumps([{"role": "user", "content": "hi"}])
    with open("/dev/full", "w") as full:
        proc = camelid(camelid_bin, "prompt", "--template", "chatml", "--messages", "-", stdin=messages, stdout=full)
    one_line_error(proc, "standard output")


# ---- defect 5: serve's port, before loading -------------------------------------------------------------------
def test_serve_refuses_a_taken_or_invalid_port_before_loading(camelid_bin, tiny) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = camelid(camelid_bin, "serve", "--model", tiny, "--port", port, timeout=120)
        one_line_error(proc, f"--port {port}", "in use")
    for bad in ("99999", "-1", "0", "http"):
        one_line_error(camelid(camelid_bin, "serve", "--model", tiny, "--port", bad), "--port")
    one_line_error(camelid(camelid_bin, "serve", "--model", tiny, "--host", "no-such-host.invalid"), "--host")


# ---- defects 9 and 10: options checked before the model loads, named as flags ----------------------------------
@pytest.mark.parametrize("args,words", [
    (["generate", "--temperature", "-1", "hi"], ["--temperature"]),
    (["generate", "--top-p", "2", "hi"], ["--top-p"]),
    (["generate", "--top-k", "0", "hi"], ["--top-k"]),
    (["generate", "--max-new-tokens", "-2", "hi"], ["--max-new-tokens"]),
    (["generate", "--repetition-penalty", "0", "hi"], ["--repetition-penalty"]),
    (["generate", "--context", "0", "hi"], ["--context"]),
    (["generate", "--context", "-5", "hi"], ["--context"]),
    (["generate", "--draft", "nope.gguf", "hi"], ["--draft", "nope.gguf"]),
    (["generate", "--model", "nope", "hi"], ["--model", "nope"]),
    (["chat", "--template", "nosuch"], ["--template", "nosuch"]),
    (["chat", "--temperature", "nan"], ["--temperature"]),
    (["generate", "--lora", "nope", "hi"], ["--lora", "nope"]),
])
def test_argument_errors_come_before_loading_and_name_the_flag(camelid_bin, args, words) -> None:
    proc = camelid(camelid_bin, *args, stdin="")
    line = one_line_error(proc, *words)  # one line: the "loading ..." line never came
    assert "max_new_tokens" not in line and "top_p" not in line


def test_quant_native_on_float_weights_says_it_runs_float(camelid_bin, tiny) -> None:
    proc = camelid(camelid_bin, "generate", "--model", tiny, "--quant", "native", "--max-new-tokens", "2", "hi")
    assert proc.returncode == 0, proc.stderr
    assert "--quant native" in proc.stderr and "float weights" in proc.stderr


# ---- defect 11 -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [["--template", "nosuch"], ["--lora-rank", "4", "--lora-targets", "q_proj,nosuch"]])
def test_failed_train_leaves_no_out_folder(camelid_bin, tiny, tmp_path, bad) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                               {"role": "assistant", "content": "hello"}]}) + "\n")
    proc = camelid(camelid_bin, "train", "--model", tiny, "--data", data, "--out", tmp_path / "run", *bad)
    one_line_error(proc, bad[-2])
    assert not (tmp_path / "run").exists()


def _terminate_when(proc: subprocess.Popen, ready, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and not ready():
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=60)


def test_sigterm_exits_143(camelid_bin, tiny, tmp_path) -> None:
    # generate: terminated while it writes its completion
    proc = subprocess.Popen([str(camelid_bin), "generate", "--model", str(tiny), "--ignore-eos", "--context", "256",
                             "--max-new-tokens", "240", "--temperature", "1", "hi"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=ENV)
    os.set_blocking(proc.stdout.fileno(), False)
    assert _terminate_when(proc, lambda: bool(proc.stdout.read(1))) == 143
    # chat: terminated while it waits for the user (Ctrl-C there only starts a new line)
    proc = subprocess.Popen([str(camelid_bin), "chat", "--model", str(tiny), "--template", "llama-2"],
                            stdin=subprocess.PIPE, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=ENV)
    os.set_blocking(proc.stderr.fileno(), False)
    err = bytearray()

    def waiting_for_input() -> bool:
        err.extend(proc.stderr.read() or b"")
        return b"camelid chat:" in err

    assert _terminate_when(proc, waiting_for_input) == 143
    # convert: terminated once its temporary output exists; nothing is left
    out = tmp_path / "conv"
    out.mkdir()
    proc = subprocess.Popen([str(camelid_bin), "convert", str(tiny), str(out / "m.gguf"), "--to", "gguf", "--quant",
                             "q4_0", "--quiet"], stderr=subprocess.PIPE, env=ENV)
    assert _terminate_when(proc, lambda: any(out.glob(".m.gguf.tmp-*"))) == 143
    assert list(out.iterdir()) == []
    # serve: terminated once it answers
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(camelid_bin), "serve", "--model", str(tiny), "--port", str(port), "--context", "64",
                             "--max-batch", "1"], stderr=subprocess.PIPE, env=ENV)

    def answering() -> bool:
        with socket.socket() as c:
            return c.connect_ex(("127.0.0.1", port)) == 0

    assert _terminate_when(proc, answering) == 143


def test_chat_seed_is_per_session_so_regen_gives_a_new_reply(camelid_bin, tiny) -> None:
    def session() -> list[str]:
        proc = camelid(camelid_bin, "chat", "--model", tiny, "--template", "llama-2", "--seed", "7", "--temperature",
                       "1", "--max-new-tokens", "12", stdin="Hello\n/regen\n/regen\n/exit\n")
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.split("\n")[:3]

    first = session()
    assert len(set(first)) == 3, first  # each /regen samples anew (it used to repeat the same reply)
    assert session() == first  # and the seed still makes the session reproducible


def test_remote_chat_seed_is_per_session_too(camelid_bin, tiny, tmp_path) -> None:
    from camelid.serve.launch import start_server
    server = start_server(["--model", str(tiny), "--template", "llama-2", "--context", "128", "--max-batch", "1"],
                          tmp_path / "serve.log")
    try:
        def session() -> list[str]:
            proc = camelid(camelid_bin, "chat", "--url", server.url, "--model", tiny.name, "--seed", "7",
                           "--temperature", "1", "--max-new-tokens", "12", stdin="Hello\n/regen\n/exit\n")
            assert proc.returncode == 0, proc.stderr
            return proc.stdout.split("\n")[:2]

        first = session()
        assert first[0] != first[1] and session() == first
    finally:
        server.stop()


# ---- also expected: --version, standard input, the loading line ------------------------------------------------
def test_version_stdin_and_loading_line(camelid_bin, tiny) -> None:
    from importlib.metadata import version
    proc = camelid(camelid_bin, "--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"camelid {version('camelid')}"
    common = ["generate", "--model", tiny, "--max-new-tokens", "6"]
    given = camelid(camelid_bin, *common, "Once upon a time")
    piped = camelid(camelid_bin, *common, "-", stdin="Once upon a time\n")
    assert given.returncode == piped.returncode == 0, given.stderr + piped.stderr
    assert piped.stdout == given.stdout
    size = sum(f.stat().st_size for f in tiny.glob("*.safetensors")) / 1e6
    assert f"loading {tiny.name} ({size:.0f} MB)..." in given.stderr
    messages = [{"role": "user", "content": "hi"}]
    from_file = tiny.parent / "messages.json"
    from_file.write_text(json.dumps(messages))
    a = camelid(camelid_bin, "prompt", "--template", "llama-2", "--messages", from_file)
    b = camelid(camelid_bin, "prompt", "--template", "llama-2", "--messages", "-", stdin=json.dumps(messages))
    assert a.returncode == b.returncode == 0 and a.stdout == b.stdout and "[INST] hi [/INST]" in a.stdout


def test_loading_a_large_file_shows_a_bar(tiny, capsys, monkeypatch) -> None:
    import camelid.engine as engine
    monkeypatch.setattr(engine, "LARGE_FILE", 1)  # the tiny model counts as large here
    engine.load_model(tiny, progress=True)
    err = capsys.readouterr().err
    from camelid.formats import open_reader
    n = len(open_reader(tiny).tensors())
    assert err.startswith(f"loading {tiny.name} (") and f"/{n} [" in err and "tensor/s" in err  # then the bar
    monkeypatch.setattr(engine, "LARGE_FILE", 1 << 40)
    engine.load_model(tiny, progress=True)
    assert capsys.readouterr().err.strip().splitlines() == [err.splitlines()[0]]  # small: the start line alone
