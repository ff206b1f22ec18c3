"""Representation probes (k-NN, linear), the online k-NN hook, and the pretraining stage's
mask_cells / predict-the-mean metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from mixmim.data.builtin import write_imagenet
from mixmim.engine.config import PretrainConfig, from_mapping
from mixmim.engine.engine_pretrain import mean_loss_baseline, pretrain
from mixmim.models import build_classifier, build_pretrainer
from mixmim.models.pretrainer import mean_colour_loss, pixel_targets, reconstruction_loss
from mixmim.probes import (
    OnlineKNN, extract_features, feature_fn, knn_probe, knn_votes, linear_probe, subset_indices,
)


def clusters(n_per_class: int, num_classes: int, dim: int, spread: float, seed: int):
    """Gaussian clusters around orthogonal-ish random centres (well separated for small spread)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=g) * 3
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    feats = centres[labels] + spread * torch.randn(len(labels), dim, generator=g)
    return feats, labels


# --------------------------------------------------------------------------- k-NN
def test_knn_separates_separable_clusters_perfectly():
    xtr, ytr = clusters(30, 5, 16, 0.1, seed=0)
    xva, yva = clusters(10, 5, 16, 0.1, seed=0)  # same centres (same seed), new noise below
    xva = xva + 0.05 * torch.randn(xva.shape, generator=torch.Generator().manual_seed(9))
    res = knn_probe(xtr, ytr, xva, yva, k=20, temperature=0.07)
    assert res.top1 == 100.0 and res.n == 50
    assert res.correct.dtype == np.bool_ and res.correct.all()


def test_knn_votes_are_exp_cosine_over_temperature():
    q = torch.tensor([[1.0, 0.0]])
    bank = torch.tensor([[2.0, 0.0], [3.0, 0.0], [0.0, 1.0], [0.0, 5.0]])  # cos 1, 1, 0, 0
    labels = torch.tensor([0, 0, 1, 1])
    votes = knn_votes(bank, labels, q, k=4, temperature=0.5, num_classes=3)
    expected = torch.tensor([[2 * math.exp(2.0), 2 * math.exp(0.0), 0.0]])
    torch.testing.assert_close(votes, expected)
    # k = 1: only the nearest (class 0) votes
    assert knn_votes(bank, labels, q, k=1, temperature=0.5, num_classes=3)[0, 1] == 0


def test_temperature_weighting_beats_a_majority_of_farther_neighbours():
    # class 0: one neighbour at cosine 1; class 1: five at cosine 0.8
    q = torch.tensor([[1.0, 0.0]])
    far = torch.tensor([0.8, 0.6])
    bank = torch.stack([torch.tensor([1.0, 0.0])] + [far] * 5)
    labels = torch.tensor([0, 1, 1, 1, 1, 1])
    assert knn_probe(bank, labels, q, torch.tensor([0]), k=20, temperature=0.07).top1 == 100.0
    assert knn_probe(bank, labels, q, torch.tensor([0]), k=20, temperature=1.0).top1 == 0.0  # flat: majority wins


def test_knn_refuses_bad_input():
    x, y = clusters(2, 2, 4, 0.1, 0)
    with pytest.raises(ValueError, match="k=0"):
        knn_probe(x, y, x, y, k=0)
    with pytest.raises(ValueError, match="temperature=-1"):
        knn_probe(x, y, x, y, temperature=-1)
    with pytest.raises(ValueError, match="width 4 and val features of width 3"):
        knn_probe(x, y, x[:, :3], y)
    with pytest.raises(ValueError, match="expected one label per row"):
        knn_probe(x, y[:2], x, y)


# --------------------------------------------------------------------------- linear
def test_linear_probe_learns_a_linearly_separable_problem():
    xtr, ytr = clusters(40, 4, 8, 1.0, seed=1)
    xva, yva = clusters(20, 4, 8, 1.0, seed=1)
    xva = xva + torch.randn(xva.shape, generator=torch.Generator().manual_seed(3)) * 0.1
    res = linear_probe(xtr, ytr, xva, yva, steps=200)
    assert res.top1 >= 97.0
    assert res.preds.shape == (80,) and res.labels.tolist() == yva.tolist()


def test_linear_probe_on_a_rotated_problem_that_knn_cannot_shortcut():
    """Class is the sign of one coordinate among noisy ones: linear, not clustered."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(600, 10, generator=g)
    y = (x[:, 3] > 0).long()
    res = linear_probe(x[:400], y[:400], x[400:], y[400:], steps=300, weight_decay=1e-4)
    assert res.top1 >= 95.0


def test_linear_probe_refuses_bad_settings():
    x, y = clusters(2, 2, 4, 0.1, 0)
    with pytest.raises(ValueError, match="steps=0"):
        linear_probe(x, y, x, y, steps=0)
    with pytest.raises(ValueError, match="NaN or inf"):
        linear_probe(x * float("nan"), y, x, y)


# --------------------------------------------------------------------------- features
def test_feature_fn_pools_the_encoder_of_a_classifier_or_pretrainer():
    torch.manual_seed(0)
    clf = build_classifier("mixmim_nano", num_classes=3).eval()
    pre = build_pretrainer("mixmim_nano").eval()
    pre.encoder.load_state_dict(clf.encoder.state_dict())
    imgs = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(feature_fn(clf)(imgs), clf.forward_features(imgs))
        torch.testing.assert_close(feature_fn(pre)(imgs), clf.forward_features(imgs))
    with pytest.raises(ValueError, match="no frozen-feature path"):
        feature_fn(torch.nn.Linear(2, 2))


def test_extract_features_keeps_dataset_order():
    data = [(torch.full((3, 2, 2), float(i)), i % 3) for i in range(7)]
    feats, labels = extract_features(lambda x: x.flatten(1)[:, :1], data, batch_size=3)
    assert feats[:, 0].tolist() == list(range(7)) and labels.tolist() == [i % 3 for i in range(7)]
    assert subset_indices(10, 4, seed=1) == sorted(subset_indices(10, 4, seed=1)) and len(subset_indices(10, 4)) == 4
    assert subset_indices(3, 10) == [0, 1, 2]


def test_online_knn_runs_on_due_epochs_only():
    xtr, ytr = clusters(5, 2, 3, 0.01, 0)
    train = [(x, int(y)) for x, y in zip(xtr, ytr)]
    hook = OnlineKNN(train, train, every=2, epochs=5, k=3)
    model = torch.nn.Identity()
    model.forward_head = lambda f, pre_logits=True: f  # a stand-in "timm" model whose features are the input
    model.forward_features = lambda x: x
    assert [e for e in range(1, 6) if hook.due(e)] == [2, 4, 5]
    assert hook(model, 1) == {}
    assert hook(model, 2) == {"knn_top1": 100.0}
    with pytest.raises(ValueError, match="knn_every=0"):
        OnlineKNN(train, train, every=0, epochs=5)


# --------------------------------------------------------------------------- predict-the-mean
def test_mean_colour_loss_is_zero_for_flat_cells_and_matches_the_reconstruction_loss():
    flat = torch.zeros(2, 3, 64, 64)
    flat[:, 0, :32] = 1.0  # cells of one flat colour each
    assert torch.allclose(mean_colour_loss(flat, 32), torch.zeros(2))
    imgs = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for norm_pix in (True, False):
        target = pixel_targets(imgs, 32, norm_pix)
        cells = target.reshape(3, 4, 32 * 32, 3)
        pred = cells.mean(dim=2, keepdim=True).expand_as(cells).reshape_as(target)
        everything = torch.ones(1, 4)
        expected = reconstruction_loss(imgs, pred, everything, 32, dual=False, norm_pix=norm_pix)
        torch.testing.assert_close(mean_colour_loss(imgs, 32, norm_pix).mean(), expected)
    # noise: per-cell normalised targets have variance ~1, and a flat cell prediction removes ~none of it
    assert 0.95 < float(mean_colour_loss(imgs, 32).mean()) < 1.0


def test_mean_loss_baseline_averages_over_a_dataset():
    imgs = [torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    data = [(im, 0) for im in imgs]
    direct = mean_colour_loss(torch.stack(imgs), 32).mean().item()
    assert mean_loss_baseline(data, 32, True, batch_size=2) == pytest.approx(direct, rel=1e-6)


# --------------------------------------------------------------------------- engine hook
@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "imagenet"
    write_imagenet(root, seed=0, image_size=64, num_classes=3, train_per_class=6, val_per_class=3)
    return root


def test_pretraining_logs_the_online_knn_curve_and_the_mask_metrics(data_root, tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = from_mapping(PretrainConfig, dict(
        model="mixmim_nano", dataset="imagenet", data_root=str(data_root), batch_size=6, num_workers=0,
        output_dir=str(tmp_path / "pre"), tracking_uri=store, experiment="probe-tests", progress=False,
        epochs=3, warmup_epochs=0, knn_every=2, knn_k=5))
    result = pretrain(cfg)
    assert result["mask_cells"] == 4  # 64 px at stride 32
    assert 0.0 < result["mean_loss_baseline"] < 1.0
    assert [("knn_top1" in h) for h in result["history"]] == [False, True, True]  # epoch 2 and the last
    curve = MlflowClient(store).get_metric_history(result["run_id"], "epoch/knn_top1")
    assert sorted(m.step for m in curve) == [2, 3]
    assert all(0.0 <= m.value <= 100.0 for m in curve)
    final = MlflowClient(store).get_run(result["run_id"]).data.metrics
    assert final["final/mask_cells"] == 4


def test_pretrain_stage_metrics_json_has_mask_cells(data_root, tmp_path, monkeypatch):
    import yaml

    from mixmim.pipeline import PARENT_RUN_ENV, load_params, pretrain_stage

    monkeypatch.setenv(PARENT_RUN_ENV, "")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "roots": {"imagenet": str(data_root)},
        "tracking": {"uri": "sqlite:///mlflow.db", "experiment": "probe-tests", "pipeline": "tests"},
        "pretrain": {"model": "mixmim_nano", "dataset": "imagenet", "epochs": 1, "warmup_epochs": 0,
                     "batch_size": 6, "num_workers": 0, "progress": False, "knn_every": 1},
    }))
    pretrain_stage(load_params(params), ["pretrain"], "default", "runs/pre", str(tmp_path / "m.json"),
                   str(tmp_path / "p.csv"))
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["mask_cells"] == 4 and metrics["mean_loss_baseline"] > 0
    assert (tmp_path / "p.csv").read_text().splitlines()[0] == "epoch,train_loss,knn_top1"

    # the probe stage on the pretrained encoder and on the random-init control
    from mixmim.probes import probe_records_paths, probe_stage

    params_data = yaml.safe_load(params.read_text())
    # no model in the section: the architecture comes from the pretraining checkpoint, for the control too
    params_data["probe"] = {"batch_size": 4, "linear_steps": 50, "progress": False}
    params.write_text(yaml.safe_dump(params_data))
    out = {}
    for init in ("runs/pre/pretrain.pt", None):
        name = "pretrained" if init else "random"
        path = tmp_path / "metrics" / f"probe_{name}.json"
        result = probe_stage(load_params(params), ["probe"], name, "imagenet", init, str(path), seed=0,
                             arch_from="runs/pre/pretrain.pt")
        out[name] = json.loads(path.read_text())
        assert out[name]["n_val"] == 9 and out[name]["n_train"] == 18 and out[name]["init"] == name
        for kind, records_file in probe_records_paths(path).items():
            records = json.loads(records_file.read_text())
            hits = sum(p == y for p, y in zip(records["pred"], records["label"]))
            assert 100.0 * hits / records["n_val"] == pytest.approx(out[name][f"{kind}_top1"])
        tags = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(result["run_id"]).data.tags
        assert tags["mixmim.stage"] == "probe" and ("mixmim.parent_pretrain_run" in tags) == (init is not None)
    assert out["pretrained"]["feature_dim"] == out["random"]["feature_dim"] == 256
    assert out["pretrained"]["model"] == out["random"]["model"] == "mixmim_nano"
    with pytest.raises(ValueError, match="no model given and no checkpoint"):
        probe_stage(load_params(params), ["probe"], "x", "imagenet", None, str(tmp_path / "x.json"), seed=0)


def test_probe_script_needs_a_checkpoint_for_pretrained_weights(capsys):
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "stages" / "probe.py"
    spec = importlib.util.spec_from_file_location("probe_script", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--dataset", "imagenet", "--metrics", "m.json"])
    assert exit_info.value.code == 2 and "--weights pretrained needs --checkpoint" in capsys.readouterr().err


def test_online_knn_on_another_dataset_needs_its_root(data_root):
    from mixmim.engine.engine_pretrain import online_knn

    base = dict(model="mixmim_nano", dataset="imagenet", data_root="/pretraining/data", knn_every=1)
    assert online_knn(from_mapping(PretrainConfig, {**base, "knn_every": 0}), 64, torch.device("cpu")) is None
    with pytest.raises(ValueError, match="knn_dataset='imagenet' without knn_data_root"):
        online_knn(from_mapping(PretrainConfig, {**base, "knn_dataset": "imagenet"}), 64, torch.device("cpu"))
    hook = online_knn(from_mapping(PretrainConfig, {**base, "knn_dataset": "imagenet", "knn_data_root": str(data_root)}),
                      64, torch.device("cpu"))
    assert len(hook.train_set) == 18 and len(hook.val_set) == 9


def test_pretrain_stage_runs_the_online_knn_on_a_labelled_dataset(data_root, tmp_path, monkeypatch):
    import yaml

    from mixmim.engine.config import ConfigError
    from mixmim.pipeline import PARENT_RUN_ENV, load_params, pretrain_stage

    monkeypatch.setenv(PARENT_RUN_ENV, "")
    data = {"roots": {"pretrain": str(data_root), "imagenet": str(data_root)},
            "tracking": {"uri": "sqlite:///mlflow.db", "experiment": "probe-tests", "pipeline": "tests"},
            "pretrain": {"model": "mixmim_nano", "dataset": "imagenet", "epochs": 1, "warmup_epochs": 0,
                         "batch_size": 6, "num_workers": 0, "progress": False, "knn_every": 1}}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="set knn_dataset to a labelled dataset"):
        pretrain_stage(load_params(params), ["pretrain"], "x", "runs/x", str(tmp_path / "x.json"), str(tmp_path / "x.csv"))
    data["pretrain"]["knn_dataset"] = "imagenet"
    params.write_text(yaml.safe_dump(data))
    pretrain_stage(load_params(params), ["pretrain"], "k", "runs/k", str(tmp_path / "k.json"), str(tmp_path / "k.csv"))
    assert 0.0 <= json.loads((tmp_path / "k.json").read_text())["knn_top1"] <= 100.0


@pytest.mark.parametrize("timm_name, kwargs", [
    ("vit_tiny_patch16_224", dict(depth=2, embed_dim=32, num_heads=2)),
    ("resnet18", dict(layers=(1, 1, 1, 1), channels=(8, 16, 32, 64))),
])
def test_probe_reads_a_timm_adapter_pretraining_checkpoint(tmp_path, timm_name, kwargs):
    """A backbones-pipeline checkpoint: the architecture (decoder arguments dropped) and the encoder
    weights come from it; the pretrained and the random encoder give different features."""
    from mixmim.checkpoint import save_atomic
    from mixmim.engine.config import to_dict
    from mixmim.engine.engine_pretrain import build_model
    from mixmim.probes import ProbeConfig, probe_model, resolve_architecture

    cfg = from_mapping(PretrainConfig, {"model": timm_name, "img_size": 64, "model_kwargs": {
        **kwargs, "decoder_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2}})
    torch.manual_seed(0)
    adapter = build_model(cfg)
    save_atomic({"model": adapter.state_dict(), "config": to_dict(cfg), "kind": "mixmim_pretrain"}, tmp_path / "p.pt")
    imgs = torch.randn(2, 3, 64, 64)
    feats = {}
    for init in (str(tmp_path / "p.pt"), None):
        probe = resolve_architecture(from_mapping(ProbeConfig, {"init": init, "arch_from": str(tmp_path / "p.pt"),
                                                                "seed": 1}))
        assert probe.model == timm_name and not any(k.startswith("decoder_") for k in probe.model_kwargs)
        model = probe_model(probe)
        if init is not None:  # every encoder weight is the adapter's
            encoder = adapter.encoder.state_dict()
            shared = [k for k in model.state_dict() if k in encoder]
            assert len(shared) == len(encoder)
            for key in shared:
                torch.testing.assert_close(model.state_dict()[key], encoder[key])
        with torch.no_grad():
            feats[init is None] = feature_fn(model)(imgs)
    assert feats[False].shape == feats[True].shape and not torch.allclose(feats[False], feats[True])


def test_a_class_list_selects_the_classes_of_the_online_knn_and_of_the_probe(data_root, tmp_path):
    """At mid scale pretraining reads ImageNet-100 from an ImageNet-1K root by a class list; the online
    k-NN and the probe stage must read the same classes, not the whole root."""
    from mixmim.engine.engine_pretrain import online_knn
    from mixmim.probes import ProbeConfig, run_probe

    wnids = sorted(p.name for p in (data_root / "train").iterdir())
    assert len(wnids) == 3
    class_list = tmp_path / "two.txt"
    class_list.write_text("\n".join(wnids[:2]) + "\n")
    base = dict(model="mixmim_nano", dataset="imagenet", data_root=str(data_root), knn_every=1)
    whole = online_knn(from_mapping(PretrainConfig, base), 64, torch.device("cpu"))
    two = online_knn(from_mapping(PretrainConfig, {**base, "class_list": str(class_list)}), 64, torch.device("cpu"))
    assert (len(whole.train_set), len(whole.val_set)) == (18, 9)
    assert (len(two.train_set), len(two.val_set)) == (12, 6)
    # a k-NN on another labelled root reads it whole: the class list belongs to the pretraining root
    other_root = tmp_path / "other"
    write_imagenet(other_root, seed=1, image_size=16, num_classes=4, train_per_class=2, val_per_class=1)
    other = online_knn(from_mapping(PretrainConfig, {**base, "class_list": str(class_list), "knn_dataset": "imagenet",
                                                     "knn_data_root": str(other_root)}), 64, torch.device("cpu"))
    assert (len(other.train_set), len(other.val_set)) == (8, 4)

    cfg = from_mapping(ProbeConfig, dict(model="mixmim_nano", dataset="imagenet", data_root=str(data_root),
                                         class_list=str(class_list), batch_size=4, linear_steps=5, progress=False,
                                         tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="probe-tests",
                                         output_dir=str(tmp_path / "probe")))
    result = run_probe(cfg)
    assert (result["n_train"], result["n_val"], result["num_classes"]) == (12, 6, 2)
