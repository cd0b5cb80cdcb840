"""`camelid serve` runs a quantized GGUF on its own blocks by default, as `camelid generate` does: the server's
greedy text equals generate's, and differs from the float model's on a prompt where the two part. (Batched rows
against single requests, now on the native step: test_serve_api.py.)"""
from __future__ import annotations

import subprocess
import sys

import openai
import pytest

from camelid import kernels
from camelid.serve.launch import start_server

pytestmark = pytest.mark.skipif(kernels.ext() is None, reason="native kernels not built here")
# On the built-in Q4_1 model the native and float greedy replies to this prompt differ from the 10th token on.
PROMPT = "The three primary colours are"
TOKENS = 24


def generate(*extra: str) -> str:
    out = subprocess.run([sys.executable, "-m", "camelid.cli", "generate", "--max-new-tokens", str(TOKENS),
                          "--ignore-eos", *extra, PROMPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_serve_defaults_to_native_blocks_and_answers_as_generate(tmp_path):
    server = start_server(["--max-batch", "4", "--context", "256"], tmp_path / "server.log")
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)

        def ask(prompt: str) -> str:
            r = client.completions.create(model="SmolLM2-135M-Instruct", prompt=prompt, max_tokens=TOKENS,
                                          temperature=0, extra_body={"ignore_eos": True})
            return r.choices[0].text

        single = ask(PROMPT)
    finally:
        server.stop()
    native, floating = generate(), generate("--quant", "none")
    assert native != floating
    assert native.rstrip("\n") == single
