# genperc — the two commands a new user needs are `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# torch is pinned to the CPU wheel first so that the `torch>=2.4` range in pyproject installs
# nothing more (an unpinned torch would pull a multi-GB CUDA build).
TORCH  ?= torch==2.13.0

.PHONY: install browser demo test test-slow bench gpu-smoke gpu-wheels lint fixtures world-generator clean

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

# The browser test (genperc serve in a real Chromium, driven by Playwright) needs Debian's chromium;
# `playwright install` cannot download here, so the test launches this executable.
CHROMIUM ?= /usr/bin/chromium
browser:
	@test -x $(CHROMIUM) || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get install -y -q chromium >/dev/null 2>&1 || { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q chromium >/dev/null; }; \
	  test -x $(CHROMIUM) || { echo "could not install chromium (apt-get install chromium) — the browser test needs it"; exit 2; }; }

test: install browser
	GENPERC_CHROMIUM=$(CHROMIUM) $(BIN)/pytest -n 2 -q

test-slow: install
	$(BIN)/pytest -q -m slow

bench: install
	$(BIN)/python benchmarks/run.py

# The GPU benchmark (docs/gpu.md): every stage at toy sizes on the CPU, and the wheels a GPU run carries.
gpu-smoke: install
	PATH=$(BIN):$$PATH PYTHON=$(BIN)/python bash benchmarks/gpu/run.sh bench-results/gpu-smoke --smoke

gpu-wheels: install
	PYTHON=$(BIN)/python bash benchmarks/gpu/fetch_wheels.sh

lint: install
	$(BIN)/ruff check src tests benchmarks

fixtures: install
	$(BIN)/genperc data fixtures

# The world generator shipped in src/genperc/weights (issue 12): render the compact world,
# pretrain text-to-image on its captions (~30 min on 2 CPU cores), copy it into the package with
# its sha256 (generator.json). Presets name it as model.pretrained: world-generator.
world-generator: install
	$(BIN)/genperc pretrain --out runs/world-generator --world compact --steps 3000
	rm -rf src/genperc/weights/world-generator
	mkdir -p src/genperc/weights
	cp -r runs/world-generator/generator src/genperc/weights/world-generator

clean:
	rm -rf $(VENV) demo runs
