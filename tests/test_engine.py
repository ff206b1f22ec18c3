"""Training engines: short CPU runs, resume after SIGKILL, two gloo processes, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from mixmim.checkpoint import load_file
from mixmim.data.builtin import write_imagenet
from mixmim.engine.config import ConfigError, FinetuneConfig, PretrainConfig, from_mapping, load_config
from mixmim.engine.loaders import ResumableSampler
from mixmim.engine.engine_finetune import finetune, load_encoder_init
from mixmim.engine.loop import KILL_AT_STEP_ENV, NonFiniteLossError
from mixmim.engine.optim import build_adamw, build_cosine_schedule
from mixmim.engine.engine_pretrain import pretrain
from mixmim.models import build_classifier
from mixmim.tracking import PRETRAIN_RUN_TAG, TrackingUnavailableError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "imagenet"
    write_imagenet(root, seed=0, image_size=64, num_classes=4, train_per_class=8, val_per_class=4)
    return root


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def common(data_root: Path, store: str, out: Path, **kw) -> dict:
    return dict(model="mixmim_nano", dataset="imagenet", data_root=str(data_root), batch_size=8, num_workers=0,
                output_dir=str(out), tracking_uri=store, experiment="engine-tests", progress=False, **kw)


def pretrain_cfg(data_root, store, out, **kw) -> PretrainConfig:
    return from_mapping(PretrainConfig, common(data_root, store, out, **{"epochs": 2, "warmup_epochs": 1, **kw}))


def quiet_finetune_cfg(data_root, store, out, **kw) -> FinetuneConfig:
    """Finetuning without mixup, label smoothing or stochastic depth (exactly comparable runs)."""
    base = dict(epochs=1, warmup_epochs=0, mixup=0.0, cutmix=0.0, label_smoothing=0.0, randaug=None, reprob=0.0,
                drop_path=0.0)
    return from_mapping(FinetuneConfig, common(data_root, store, out, **{**base, **kw}))


# --------------------------------------------------------------------------- runs
def test_pretrain_then_finetune_with_lineage(data_root, store, tmp_path):
    pre = pretrain(pretrain_cfg(data_root, store, tmp_path / "pre"))
    assert len(pre["history"]) == 2 and all(h["train_loss"] > 0 for h in pre["history"])
    weights = tmp_path / "pre" / "pretrain.pt"
    assert set(load_file(weights)) >= {"model", "config"}

    ft = finetune(from_mapping(FinetuneConfig, common(data_root, store, tmp_path / "ft", epochs=2,
                                                      warmup_epochs=1, init=str(weights))))
    assert 0 <= ft["top1"] <= 100 and ft["top5"] >= ft["top1"]
    assert [h["epoch"] for h in ft["history"]] == [1, 2] and "val_top1" in ft["history"][0]

    client = MlflowClient(store)
    run = client.get_run(ft["run_id"])
    assert run.data.tags[PRETRAIN_RUN_TAG] == pre["run_id"]
    assert run.data.tags["mixmim.stage"] == "finetune"
    assert float(run.data.params["layer_decay"]) == 0.7
    assert "final/top1" in run.data.metrics
    assert client.get_metric_history(pre["run_id"], "train/loss")


def test_linear_probe_trains_only_the_head(data_root, store, tmp_path):
    init = build_classifier("mixmim_nano", num_classes=4)
    path = tmp_path / "init.pt"
    torch.save({"model": init.state_dict()}, path)
    finetune(quiet_finetune_cfg(data_root, store, tmp_path / "lp", linear_probe=True, init=str(path)))
    sd = load_file(tmp_path / "lp" / "finetune.pt")["model"]
    torch.testing.assert_close(sd["encoder.stages.2.blocks.0.attn.qkv.weight"],
                               init.state_dict()["encoder.stages.2.blocks.0.attn.qkv.weight"])
    assert "head.1.weight" in sd and not torch.equal(sd["head.1.weight"], init.state_dict()["head.weight"])


def test_finetune_init_from_an_original_release():
    ref_path = REPO.parent / "shared" / "reference" / "mixmim_reference_small.pt"
    if not ref_path.is_file():
        pytest.skip("reference checkpoint not available")
    ref = torch.load(ref_path, weights_only=True)
    cfg = ref["config"]
    enc_kwargs = {k: cfg[k] for k in ("img_size", "patch_size", "embed_dim", "depths", "num_heads")}
    model = build_classifier(num_classes=3, window_size=(16, 8, 4, 4), **enc_kwargs)  # stage-1 window 8 -> 16
    load_encoder_init(model, ref_path)
    torch.testing.assert_close(model.encoder.norm.weight, ref["state_dict"]["norm.weight"])
    assert model.encoder.stages[0].blocks[0].attn.rel_pos_table.shape == (31 * 31, 1)


# --------------------------------------------------------------------------- resume
def run_cli(args: list[str], env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    env.pop(KILL_AT_STEP_ENV, None) if not env_extra else None
    return subprocess.run([sys.executable, "-m", "mixmim", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=600)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_gives_identical_weights(data_root, store, tmp_path):
    args = ["pretrain", f"data_root={data_root}", "model=mixmim_nano", "batch_size=8", "epochs=2",
            "warmup_epochs=1", "num_workers=0", "ckpt_every_steps=1", f"tracking_uri={store}",
            "experiment=engine-tests", "progress=false"]
    straight = run_cli(args + [f"output_dir={tmp_path / 'a'}"])
    assert straight.returncode == 0, straight.stderr[-2000:]

    killed = run_cli(args + [f"output_dir={tmp_path / 'b'}"], {KILL_AT_STEP_ENV: "3"})
    assert killed.returncode == -9  # SIGKILL, mid-epoch (4 steps per epoch)
    position = load_file(tmp_path / "b" / "checkpoint-last.pt")["position"]
    assert position == {"epoch": 0, "batch": 3, "step": 3}
    resumed = run_cli(args + [f"output_dir={tmp_path / 'b'}"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    a = load_file(tmp_path / "a" / "pretrain.pt")["model"]
    b = load_file(tmp_path / "b" / "pretrain.pt")["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(data_root, store, tmp_path):
    args = ["finetune", f"data_root={data_root}", "model=mixmim_nano", "epochs=1", "warmup_epochs=0",
            "mixup=0.0", "cutmix=0.0", "label_smoothing=0.0", "randaug=null", "reprob=0.0", "drop_path=0.0",
            "num_workers=0", "max_steps_per_epoch=3", f"tracking_uri={store}", "experiment=engine-tests",
            "progress=false", "lr=0.001", "log_every_steps=1"]
    one = run_cli(args + ["batch_size=8", f"output_dir={tmp_path / 'one'}"])
    assert one.returncode == 0, one.stderr[-2000:]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          "29731", "-m", "mixmim", *args, "batch_size=4", f"output_dir={tmp_path / 'two'}"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    client = MlflowClient(store)
    losses = []
    for proc in (one, two):
        run_id = json.loads(proc.stdout.strip().splitlines()[-1])["run_id"]
        history = sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.step)
        losses.append([m.value for m in history])
    assert len(losses[0]) == len(losses[1]) == 3  # three optimiser steps, each logged
    for a, b in zip(*losses):
        assert abs(a - b) <= 1e-5 * abs(a), losses
    # Adam divides by sqrt(v), so the last float bits of a tiny gradient can move a weight
    # by ~lr; weights agree to well inside the 3e-3 that three steps at lr 1e-3 can move them.
    w1 = load_file(tmp_path / "one" / "finetune.pt")["model"]
    w2 = load_file(tmp_path / "two" / "finetune.pt")["model"]
    for key in w1:
        torch.testing.assert_close(w1[key], w2[key], rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- failures
def test_non_finite_loss_names_the_step_and_keeps_the_last_checkpoint(data_root, store, tmp_path):
    cfg = pretrain_cfg(data_root, store, tmp_path / "nan", lr=1e12, warmup_epochs=0, ckpt_every_steps=1)
    with pytest.raises(NonFiniteLossError, match=r"at optimiser step (\d+)") as err:
        pretrain(cfg)
    step = int(err.value.args[0].split("optimiser step ")[1].split()[0])
    saved = load_file(tmp_path / "nan" / "checkpoint-last.pt")
    assert saved["position"]["step"] == step - 1
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())


def test_unreachable_tracking_server_fails_before_training(data_root, tmp_path):
    cfg = pretrain_cfg(data_root, "unused", tmp_path / "x")
    cfg.tracking_uri = "http://127.0.0.1:9"
    with pytest.raises(TrackingUnavailableError, match="127.0.0.1:9"):
        pretrain(cfg)
    assert not (tmp_path / "x" / "checkpoint-last.pt").exists()


def test_corrupt_image_is_named_or_skipped_and_counted(data_root, store, tmp_path):
    import shutil

    root = tmp_path / "imagenet"
    shutil.copytree(data_root, root)
    bad = sorted((root / "train").rglob("*.JPEG"))[0]
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(ValueError, match=bad.name):
        pretrain(pretrain_cfg(root, store, tmp_path / "strict", epochs=1))
    result = pretrain(pretrain_cfg(root, store, tmp_path / "skip", epochs=1, skip_bad_images=True))
    metrics = MlflowClient(store).get_run(result["run_id"]).data.metrics
    assert metrics["data/bad_images"] == 1


def test_missing_data_root_is_named(store, tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        pretrain(pretrain_cfg(tmp_path / "no_such_dir", store, tmp_path / "o"))


@pytest.mark.parametrize("data, match", [
    ({"epochss": 3}, "unknown key 'epochss'"),
    ({"epochs": "three"}, r"epochs='three': expected an integer"),
    ({"betas": [0.9]}, "expected a list of 2 values"),
    ({"resume": "yes"}, "expected true or false"),
])
def test_config_errors_name_the_key(data, match):
    with pytest.raises(ConfigError, match=match):
        from_mapping(PretrainConfig, data)


@pytest.mark.parametrize("value", ["Fused", "foreach", True, 1])
def test_adamw_kernel_names_the_choices(value):
    with pytest.raises(ConfigError, match=r"adamw_kernel=.*expected one of 'default', 'fused'"):
        from_mapping(FinetuneConfig, {"adamw_kernel": value})
    with pytest.raises(ValueError, match=r"adamw_kernel=.*expected one of default, fused"):
        build_adamw(build_classifier("mixmim_nano", num_classes=3), 1e-3, 0.05, (0.9, 0.95), kernel=value)


def test_config_file_errors(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("epochs: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(PretrainConfig, bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(PretrainConfig, tmp_path / "none.yaml")


# --------------------------------------------------------------------------- pieces
def test_layer_decay_groups_order_depths():
    model = build_classifier("mixmim_nano", num_classes=3)
    opt = build_adamw(model, lr=1.0, weight_decay=0.05, betas=(0.9, 0.999), layer_decay=0.5)
    scale_of = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    depth = 6  # patch embed 0, 5 blocks, then norm + head
    assert scale_of[id(named["encoder.patch_embed.proj.weight"])] == pytest.approx(0.5**depth)
    assert scale_of[id(named["encoder.stages.0.blocks.0.attn.qkv.weight"])] == pytest.approx(0.5 ** (depth - 1))
    # a patch merging joins the block it feeds (the authors' util/lr_decay.py), here stage 2's first block
    assert scale_of[id(named["encoder.stages.1.merge.proj.weight"])] == pytest.approx(0.5 ** (depth - 2))
    assert scale_of[id(named["encoder.stages.1.blocks.0.attn.qkv.weight"])] == pytest.approx(0.5 ** (depth - 2))
    assert scale_of[id(named["head.weight"])] == 1.0
    assert decay_of[id(named["encoder.stages.0.blocks.0.attn.rel_pos_table"])] == 0.0
    assert decay_of[id(named["encoder.stages.0.blocks.0.norm1.weight"])] == 0.0
    assert decay_of[id(named["head.weight"])] == 0.05


def test_cosine_schedule_warms_up_then_decays():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [p], "lr_scale": 1.0}], lr=1.0)
    sched = build_cosine_schedule(opt, total_steps=20, warmup_steps=5, min_lr=0.0)
    lrs = []
    for step in range(21):
        sched.step_update(step)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:5], lrs[1:6]))
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:])) and lrs[20] == pytest.approx(0.0, abs=1e-9)


def test_sampler_shards_global_batches_and_resumes():
    one = ResumableSampler(20, 4, seed=1)
    ranks = [ResumableSampler(20, 2, seed=1, rank=r, world_size=2) for r in range(2)]
    for s in (one, *ranks):
        s.set_epoch(3)
    order = list(one)
    parts = [list(s) for s in ranks]
    for k in range(5):
        assert sorted(parts[0][2 * k:2 * k + 2] + parts[1][2 * k:2 * k + 2]) == sorted(order[4 * k:4 * k + 4])
    one.set_epoch(3, start_batch=2)
    assert list(one) == order[8:]


def test_resume_only_from_an_unfinished_run_of_the_same_config():
    from mixmim.engine.loop import resume_blocker

    cfg = {"epochs": 3, "lr": 0.1, "num_workers": 2}
    assert resume_blocker(cfg, {**cfg, "num_workers": 0}, finished=False) is None
    assert "lr=0.1" in resume_blocker(cfg, {**cfg, "lr": 0.2}, finished=False)
    assert "finished" in resume_blocker(cfg, cfg, finished=True)


def test_bf16_autocast_and_channels_last_run_on_cpu(data_root, store, tmp_path):
    result = pretrain(pretrain_cfg(data_root, store, tmp_path / "bf16", epochs=1, precision="bf16",
                                   channels_last=True, max_steps_per_epoch=2))
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in result["history"])


def test_pretraining_with_the_fused_adamw_kernel(data_root, store, tmp_path):
    """The config's ``adamw_kernel`` reaches the optimizer the engine trains and checkpoints with."""
    out = tmp_path / "fused"
    result = pretrain(pretrain_cfg(data_root, store, out, epochs=1, max_steps_per_epoch=2, adamw_kernel="fused"))
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in result["history"])
    state = load_file(out / "checkpoint-last.pt")
    assert state["config"]["adamw_kernel"] == "fused"
    assert all(group["fused"] is True for group in state["optimizer"]["param_groups"])


def test_fp16_needs_a_gpu(data_root, store, tmp_path):
    from mixmim.engine.loop import autocast_dtype

    with pytest.raises(ValueError, match="fp16.*CUDA"):
        autocast_dtype("fp16", torch.device("cpu"))
    with pytest.raises(ValueError, match="precision='fp8'"):
        autocast_dtype("fp8", torch.device("cpu"))


def test_adamw_kernels_agree_up_to_rounding():
    """``fused`` builds PyTorch's fused kernel over the same groups; ``default`` leaves PyTorch's choice
    (on the CPU its per-parameter loop). Three updates with the same gradients agree to rounding."""
    torch.manual_seed(0)
    model = build_classifier("mixmim_nano", num_classes=3)
    twin = build_classifier("mixmim_nano", num_classes=3)
    twin.load_state_dict(model.state_dict())
    loop = build_adamw(model, 1e-3, 0.05, (0.9, 0.95), layer_decay=0.5)
    fused = build_adamw(twin, 1e-3, 0.05, (0.9, 0.95), layer_decay=0.5, kernel="fused")
    assert loop.defaults["fused"] is None and fused.defaults["fused"] is True
    assert [g["lr_scale"] for g in loop.param_groups] == [g["lr_scale"] for g in fused.param_groups]
    start = [p.detach().clone() for p in model.parameters()]
    for step in range(3):
        grads = [torch.randn_like(p, generator=torch.Generator().manual_seed(10 * step + i))
                 for i, p in enumerate(model.parameters())]
        for m in (model, twin):
            for p, g in zip(m.parameters(), grads):
                p.grad = g.clone()
        loop.step()
        fused.step()
    assert all(not torch.equal(a, b) for a, b in zip(model.parameters(), start))  # both kernels updated
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_scheduled_lr_applies_layer_decay_once():
    model = build_classifier("mixmim_nano", num_classes=3)
    opt = build_adamw(model, lr=1.0, weight_decay=0.05, betas=(0.9, 0.999), layer_decay=0.5)
    sched = build_cosine_schedule(opt, total_steps=10, warmup_steps=0, min_lr=0.0)
    sched.step_update(0)
    for group in opt.param_groups:
        assert group["lr"] == pytest.approx(group["lr_scale"])  # lr 1.0 at step 0, times the scale once
