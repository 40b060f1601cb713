# Fresh-machine entry points: `make test` and `make demo` create .venv and install what they need.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
DEMO_CATEGORIES := compare,tally
DEMO := runs/demo

.PHONY: install test test-slow lint demo clean

$(STAMP): setup.py constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip setuptools wheel
	# never install transformer-engine on a CPU box: it breaks `import megatron.core`
	$(BIN)/pip install -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check megatron_metis kernels tools tests docker

demo: $(STAMP)
	# three disjoint problem sets: RL prompts + test, the warm-up's easy problems, a triage pool
	HF_HUB_OFFLINE=1 $(BIN)/metis data synth --out $(DEMO)/data --n 1000 --seed 0 --difficulties 1,2 --categories $(DEMO_CATEGORIES)
	HF_HUB_OFFLINE=1 $(BIN)/metis data synth --out $(DEMO)/warm --n 600 --seed 5 --difficulties 1 --categories $(DEMO_CATEGORIES) --test-frac 0 --exclude $(DEMO)/data/train.jsonl $(DEMO)/data/test.jsonl
	HF_HUB_OFFLINE=1 $(BIN)/metis data synth --out $(DEMO)/pool --n 1600 --seed 7 --difficulties 1,2 --categories $(DEMO_CATEGORIES) --test-frac 0 --exclude $(DEMO)/data/train.jsonl $(DEMO)/data/test.jsonl $(DEMO)/warm/train.jsonl
	HF_HUB_OFFLINE=1 $(BIN)/metis pipeline examples/recipes/pipeline-tiny-cpu.yaml

clean:
	rm -rf $(VENV) *.egg-info runs
