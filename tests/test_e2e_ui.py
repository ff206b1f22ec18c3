"""End to end: the default pipeline's smallest path under DVC, then its runs in the MLflow UI.

A temporary copy of the pipeline (dvc.yaml, params.yaml with tiny budgets, stages/, the
mixmim/ package that dvc.yaml lists as deps) is reproduced with ``dvc repro
finetune@imagenet-0`` (seed 0); a second ``dvc repro`` must find nothing to do. Then ``mlflow ui``
serves the copy's store on 127.0.0.1 and headless Chromium must show the runs
``pretrain/default`` and ``finetune/imagenet`` in the experiment's runs table.

The UI test needs Chromium, chromedriver and the ``selenium`` package. Without them it is
skipped, unless ``MIXMIM_E2E_REQUIRED=1`` (set by CI, which installs them): then it fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent  # .venv/bin, unresolved, so `python` there is the venv's
RUN_NAMES = ("pretrain/default", "finetune/imagenet")  # the per-variant group runs: the UI's top level
SEED_RUN_NAMES = ("pretrain/default/s0", "finetune/imagenet/s0")  # their children, one per stage run
REPRO_TIMEOUT_S = 900
SERVER_START_TIMEOUT_S = 60
UI_RENDER_TIMEOUT_S = 60

pytestmark = pytest.mark.slow

TINY = {
    "data": {"image_size": 64, "num_classes": 3, "train_per_class": 8, "val_per_class": 3,
             "dense_train": 2, "dense_val": 2, "dense_image_size": 64},
    "pretrain": {"model": "mixmim_nano", "epochs": 1, "warmup_epochs": 0, "batch_size": 8},
    "finetune.common": {"model": "mixmim_nano", "epochs": 1, "warmup_epochs": 0, "batch_size": 8,
                        "mixup": 0.0, "cutmix": 0.0},
}


# --------------------------------------------------------------------------- helpers
def quiet_env(copy: Path) -> dict[str, str]:
    """The environment of every child: venv first on PATH, the copy's mixmim imported, no phoning home."""
    # PYTHONDONTWRITEBYTECODE goes too: a user's stages write __pycache__/ into the folders that
    # dvc.yaml lists as deps (mixmim/engine, mixmim/models), and a second repro must still do nothing.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")
           and k not in ("MIXMIM_PARENT_RUN_ID", "PYTHONPATH", "PYTHONDONTWRITEBYTECODE")}
    env.update({
        "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        # The stages import the copy's package, as `make repro` imports the checkout's.
        "PYTHONPATH": str(copy),
        "DVC_NO_ANALYTICS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
        "SE_OFFLINE": "true",        # Selenium Manager must never try to download a driver
        "SE_AVOID_STATS": "true",
    })
    return env


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{' '.join(cmd)} did not finish in {timeout:.0f}s\nstdout:\n{err.stdout}\nstderr:\n{err.stderr}")


def shown(proc: subprocess.CompletedProcess[str]) -> str:
    return f"$ {' '.join(proc.args)}  (exit {proc.returncode})\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


def make_copy(dest: Path) -> Path:
    """The pipeline's files in ``dest``, with params.yaml cut to tiny budgets and only ImageNet finetuning."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy2(REPO / name, dest / name)
    for name in ("stages", "mixmim"):
        shutil.copytree(REPO / name, dest / name, ignore=ignore)

    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["data"].update(TINY["data"])
    params["pretrain"].update(TINY["pretrain"])
    params["finetune"]["common"].update(TINY["finetune.common"])
    params["finetune"]["datasets"] = {"imagenet": params["finetune"]["datasets"].get("imagenet") or {}}
    assert params["tracking"]["experiment"] == "default" and params["tracking"]["uri"] == "sqlite:///mlflow.db"
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dest


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_health(url: str, server: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"mlflow ui exited with {server.returncode} before answering:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
                last = f"HTTP {resp.status}"
        except (urllib.error.URLError, OSError) as err:
            last = repr(err)
        time.sleep(0.5)
    pytest.fail(f"{url} did not answer within {timeout:.0f}s ({last}):\n{log.read_text()[-4000:]}")


def stop(server: subprocess.Popen, grace: float = 15.0) -> None:
    """Stop the server and the workers it started (its own process group), bounded."""
    if server.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        try:
            server.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def browser_parts() -> tuple[str, str] | str:
    """(chromium, chromedriver) paths, or why the UI test cannot run here."""
    chromium = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver")
    missing = [name for name, path in (("chromium", chromium), ("chromedriver", driver)) if not path]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium Python package")
    if missing:
        return (f"{' and '.join(missing)} not installed (Debian: apt-get install chromium chromium-driver; "
                f"{VENV_BIN}/pip install selenium)")
    return chromium, driver


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def reproduced(tmp_path_factory) -> dict:
    """The copy after ``dvc repro finetune@imagenet-0``, with the outputs of both repro calls."""
    for tool in ("dvc", "mlflow", "python"):
        assert (VENV_BIN / tool).exists(), f"{VENV_BIN / tool} missing; run the tests with the venv's python"
    copy = make_copy(tmp_path_factory.mktemp("e2e"))
    env = quiet_env(copy)
    init = run([str(VENV_BIN / "dvc"), "init", "--no-scm", "-q"], copy, env, 120)
    assert init.returncode == 0, shown(init)
    shutil.copy2(REPO / ".dvcignore", copy / ".dvcignore")  # init writes its own; keep the repository's

    start = time.monotonic()
    first = run([str(VENV_BIN / "dvc"), "repro", "finetune@imagenet-0"], copy, env, REPRO_TIMEOUT_S)
    first_s = time.monotonic() - start
    second = run([str(VENV_BIN / "dvc"), "repro", "finetune@imagenet-0"], copy, env, 300)
    status = run([str(VENV_BIN / "dvc"), "status", "--with-deps", "finetune@imagenet-0"], copy, env, 300)
    return {"copy": copy, "env": env, "first": first, "first_s": first_s, "second": second, "status": status}


# --------------------------------------------------------------------------- tests
def test_dvc_repro_smallest_path_then_nothing_to_do(reproduced):
    copy, first, second, status = (reproduced[k] for k in ("copy", "first", "second", "status"))
    assert first.returncode == 0, shown(first)
    for stage in ("prepare_data", "pretrain@0", "finetune@imagenet-0"):
        assert f"Running stage '{stage}'" in first.stdout, shown(first)
    assert (copy / "metrics" / "finetune_imagenet_s0.json").is_file(), shown(first)
    assert (copy / "metrics" / "pretrain_s0.json").is_file() and (copy / "dvc.lock").is_file()
    # finished stages keep their outs and delete their resume state
    assert (copy / "runs" / "pretrain" / "s0" / "pretrain.pt").is_file()
    assert not list(copy.glob("runs/**/checkpoint-last.pt")), sorted(copy.glob("runs/**/*"))
    # Only the asked-for path ran: the other finetuning datasets were dropped, scratch not run.
    assert not (copy / "metrics" / "scratch_imagenet_s0.json").exists()

    assert second.returncode == 0, shown(second)
    assert "Running stage" not in second.stdout, (
        f"second repro reran a stage (a usual cause: __pycache__/ that a later stage wrote into a dep "
        f"folder such as mixmim/engine, while .dvcignore does not list __pycache__/):\n{shown(second)}")
    assert "Data and pipelines are up to date" in second.stdout, shown(second)
    assert status.returncode == 0 and "Data and pipelines are up to date" in status.stdout, shown(status)

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{copy / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("default")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted(RUN_NAMES + SEED_RUN_NAMES), \
        "one run per stage (and its group), none from the 2nd repro"
    assert all(r.info.status == "FINISHED" for r in runs)
    print(f"\nfirst dvc repro: {reproduced['first_s']:.1f}s")


def test_mlflow_ui_shows_the_pipeline_runs(reproduced, tmp_path):
    parts = browser_parts()
    if isinstance(parts, str):
        if os.environ.get("MIXMIM_E2E_REQUIRED") == "1":
            pytest.fail(f"MIXMIM_E2E_REQUIRED=1 but {parts}")
        pytest.skip(parts)
    chromium, chromedriver = parts
    assert reproduced["first"].returncode == 0, shown(reproduced["first"])

    from mlflow import MlflowClient
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    copy, env = reproduced["copy"], reproduced["env"]
    store = f"sqlite:///{copy / 'mlflow.db'}"
    client = MlflowClient(store)
    experiment_id = client.get_experiment_by_name("default").experiment_id
    run_ids = {r.info.run_id: r.info.run_name for r in client.search_runs([experiment_id])
               if "mlflow.parentRunId" not in r.data.tags}  # children are folded under their group run
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "mlflow-ui.log"
    screenshot = tmp_path / "mlflow-ui.png"

    with open(log, "w") as log_fh:
        server = subprocess.Popen(
            [str(VENV_BIN / "mlflow"), "ui", "--backend-store-uri", store, "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],  # the default 4 uvicorn workers each import mlflow: ~20 s more on 2 cores
            cwd=copy, env=env, stdout=log_fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group, so stop() also ends its workers
        )
    driver = None
    try:
        started = time.monotonic()
        wait_for_health(f"{base}/health", server, log, SERVER_START_TIMEOUT_S)
        server_up = time.monotonic() - started

        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--disable-dev-shm-usage", "--window-size=1600,1000",
                     f"--user-data-dir={tmp_path / 'chromium-profile'}"):
            options.add_argument(flag)
        service = Service(executable_path=chromedriver, log_output=str(tmp_path / "chromedriver.log"), env=env)
        driver = webdriver.Chrome(options=options, service=service)
        driver.set_page_load_timeout(UI_RENDER_TIMEOUT_S)
        driver.set_script_timeout(UI_RENDER_TIMEOUT_S)

        # MLflow 3.17's UI opens an experiment in its GenAI view (traces overview) unless the
        # workflow type is "machine_learning" (query parameter, or the toggle "Model training",
        # remembered in localStorage); a fresh browser profile has nothing remembered.
        driver.get(f"{base}/#/experiments/{experiment_id}?workflowType=machine_learning")

        def names_on_page(d) -> bool:
            text = d.find_element(By.TAG_NAME, "body").text  # rendered, visible text
            return all(name in text for name in RUN_NAMES)

        try:
            WebDriverWait(driver, UI_RENDER_TIMEOUT_S, poll_frequency=0.5).until(names_on_page)
        except Exception as err:  # TimeoutException, or the page crashed
            driver.save_screenshot(str(screenshot))
            text = driver.find_element(By.TAG_NAME, "body").text
            pytest.fail(f"run names {RUN_NAMES} not shown within {UI_RENDER_TIMEOUT_S}s at {driver.current_url} "
                        f"({err!r}); screenshot {screenshot}; page text:\n{text[:3000]}")
        # Each name is the runs table's link to that very run (the name cell links to #/.../runs/<id>).
        for run_id, name in run_ids.items():
            links = driver.find_elements(By.CSS_SELECTOR, f'a[href*="/runs/{run_id}"]')
            assert name in [a.text.strip() for a in links], f"no link named {name!r} to run {run_id}"
        assert driver.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 0
        print(f"\nUI check: server answered after {server_up:.1f}s, runs shown after "
              f"{time.monotonic() - started:.1f}s; screenshot: {screenshot}")
    finally:
        if driver is not None:
            driver.quit()
        stop(server)
