# The two commands of the README:
#   make demo   set up a fresh machine and run the main job on the built-in default (demo preset)
#   make test   set up a fresh machine and run the whole test suite
VENV ?= .venv
export MLFLOW_DISABLE_TELEMETRY = true
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions

.PHONY: setup demo test
setup:
	bash scripts/setup.sh

demo: setup
	$(VENV)/bin/mcf pretrain

test: setup
	$(VENV)/bin/python -m pytest -q -ra --timeout 1200 tests
