# genperc — the two commands a new user needs are `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# torch is pinned to the CPU wheel first so that the `torch>=2.4` range in pyproject installs
# nothing more (an unpinned torch would pull a multi-GB CUDA build).
TORCH  ?= torch==2.13.0

.PHONY: install demo test test-slow bench lint fixtures clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "no python3.11 or python3 on PATH — install Python >= 3.11"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	@touch $(STAMP)

demo: install
	$(BIN)/genperc demo --out demo

test: install
	$(BIN)/pytest -n 2 -q

test-slow: install
	$(BIN)/pytest -q -m slow

bench: install
	$(BIN)/python benchmarks/run.py

lint: install
	$(BIN)/ruff check src tests benchmarks

fixtures: install
	$(BIN)/genperc data fixtures

clean:
	rm -rf $(VENV) demo runs
