"""What the test files share besides models (those are in builders.py): the one way to run the `camelid`
command in its own process, and the one-line-error assertion."""
from __future__ import annotations

import os
import resource
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LLAMA2_TOKENIZER_DIR = ROOT / ".cache" / "tokenizer-llama2"  # built by `make setup` from llama-tokenizer-js
LIMIT = 1 << 20  # `ulimit -f` for the disk-full runs: every output the tests write under it is larger
ENV = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}  # no .pyc written under the file-size limit


def run_camelid(camelid_bin: Path, *args, stdin: str | None = None, fsize: int | None = None, cwd: Path | None = None,
                stdout=subprocess.PIPE, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """`camelid ARGS` in its own process, as a user runs it; `fsize` sets `ulimit -f` (bytes) for disk-full runs."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run([str(camelid_bin), *map(str, args)], input=stdin, stdout=stdout, stderr=subprocess.PIPE,
                          text=True, timeout=timeout, cwd=cwd, env={**ENV, **(env or {})},
                          preexec_fn=limit if fsize else None)


def one_line_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    """The command failed with exit code 2 and one `camelid: error: ...` line holding each of `words`."""
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("camelid: error: "), proc.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def interrupt_midway(proc: subprocess.Popen, folder: Path, partial: str, what: str, timeout: float = 60) -> None:
    """SIGTERM `proc` once a temporary output matching `partial` (a glob in `folder`) holds over 1 MiB, i.e. midway
    through writing; it must still be running then, and exit non-zero."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        temps = list(folder.glob(partial))
        if temps and temps[0].stat().st_size > 2**20:
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"the {what} ended before it could be interrupted: {proc.stderr.read()}"
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert proc.returncode != 0


def openai_client(server, key: str, timeout: float = 120):
    """The openai client on a running `camelid serve` (no retries: a failure shows at once)."""
    import openai
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=timeout)


@contextmanager
def http_client(server, key: str, timeout: float = 120):
    """An httpx client on a running `camelid serve`, with its API key."""
    import httpx
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=timeout) as c:
        yield c
