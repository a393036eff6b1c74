# The two commands of the README:
#   make train   set up, then train the default CPU preset with AdamW on the embedded corpus
#   make test    set up, then run the tests and the linter
.PHONY: setup train test lint

VENV ?= .venv

setup:
	@bash scripts/setup.sh

train: setup
	$(VENV)/bin/lmopt train --run-name default --overwrite

test: setup
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/python -m pytest -q

lint: setup
	$(VENV)/bin/ruff check src tests
