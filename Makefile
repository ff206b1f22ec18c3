# One entry point per job. `make setup` is idempotent: it reinstalls only when
# pyproject.toml is newer than the stamp left by the last install.
PY_BOOT ?= python3.11
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

.PHONY: setup test repro ablations backbones mlflow-ui clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PY_BOOT) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

test: setup
	$(PY) -m pytest -q

# The default pipeline (dvc.yaml, params.yaml) on built-in data.
repro: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/mixmim pipeline --params params.yaml -- dvc repro

# The ablations of Tables 6-10 at built-in scale, grouped under one parent MLflow run.
ablations: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/mixmim pipeline --params pipelines/ablations/params.yaml \
		-- dvc repro pipelines/ablations/dvc.yaml

# MixMIM on timm encoders (ViT, Swin, PVT v2, ResNet; Tables 3 and 13) at built-in scale, one parent run.
backbones: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/mixmim pipeline --params pipelines/backbones/params.yaml \
		-- dvc repro pipelines/backbones/dvc.yaml

# The MLflow UI over the default store, on loopback only.
MLFLOW_PORT ?= 5000
mlflow-ui: setup
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port $(MLFLOW_PORT)

clean:
	rm -rf $(VENV) .pytest_cache
