# One entry point per job. `make setup` is idempotent: it reinstalls only when
# pyproject.toml is newer than the stamp left by the last install.
PY_BOOT ?= python3.11
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

.PHONY: setup test smoke repro ablations backbones report status mlflow-ui mlflow-server dvc clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PY_BOOT) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

test: setup
	$(PY) -m pytest -q

# The report (pipelines/report/dvc.yaml) reads every pipeline's committed results; --single-item
# rebuilds it when they changed without ever running another pipeline's stages upstream.
REPORT := PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/dvc repro --single-item pipelines/report/dvc.yaml:report

# The default pipeline (dvc.yaml, params.yaml) on built-in data, then the report.
repro: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/mixmim pipeline --params params.yaml -- dvc repro
	$(REPORT)

# The ablations of Tables 6-10 at built-in scale, grouped under one parent MLflow run.
ablations: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/mixmim pipeline --params pipelines/ablations/params.yaml \
		-- dvc repro pipelines/ablations/dvc.yaml
	$(REPORT)

# MixMIM on timm encoders (ViT, Swin, PVT v2, ResNet; Tables 3 and 13) at built-in scale, one parent run.
backbones: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/mixmim pipeline --params pipelines/backbones/params.yaml \
		-- dvc repro pipelines/backbones/dvc.yaml
	$(REPORT)

# Only the report, from the results already committed.
report: setup
	$(REPORT)

# `dvc status` per pipeline file, each stage sorted into up to date / never run here / outs not in
# this clone (no DVC remote) / stale, with the make target that updates it (mixmim/pipeline_status.py).
status: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m mixmim.pipeline_status

# Every pipeline's smoke mode (mixmim/smoke.py): its stages on the CPU with tiny budgets, torchrun
# with 2 gloo processes, over stand-ins in the official layouts, in a temporary copy (CI runs it).
smoke: setup
	$(PY) -m mixmim.smoke

# The MLflow UI over the project's store, on loopback only; experiments open on their training runs.
MLFLOW_PORT ?= 5000
STORE   := sqlite:///$(CURDIR)/mlflow.db
mlflow-ui: setup
	$(PY) -c "from mixmim.tracking import mark_training_experiments as m; m('$(STORE)')"
	$(VENV)/bin/mlflow ui --backend-store-uri $(STORE) --host 127.0.0.1 --port $(MLFLOW_PORT)

# A tracking server over the same store, for many concurrent writers (other machines, big queues):
# start it, then `export MIXMIM_TRACKING_URI=http://127.0.0.1:$(MLFLOW_PORT)` before running stages.
mlflow-server: setup
	$(VENV)/bin/mlflow server --backend-store-uri $(STORE) --host 127.0.0.1 --port $(MLFLOW_PORT)

# Any DVC command with the venv's tools on PATH, e.g.
#   make dvc ARGS="exp run --temp -S finetune.datasets.inat2018.epochs=2"
#   make dvc ARGS="exp run --queue -S pretrain.epochs=10"   then   make dvc ARGS="queue start -j 2"
dvc: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/dvc $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
