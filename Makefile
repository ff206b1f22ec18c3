# One entry point per job. `make setup` is idempotent: it reinstalls only when
# pyproject.toml is newer than the stamp left by the last install.
PY_BOOT ?= python3.11
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

.PHONY: setup test repro clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PY_BOOT) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

test: setup
	$(PY) -m pytest -q

# Until the pipeline issue lands there is no dvc.yaml stage graph; this runs what exists:
# the model summary of every registered size.
repro: setup
	$(VENV)/bin/mixmim info --all

clean:
	rm -rf $(VENV) .pytest_cache
