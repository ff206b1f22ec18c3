"""The held-out reconstruction measurement: the exact colour/structure split of the error, the stage that
writes it, and the report table that tests "beyond the cell mean"."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from mixmim.data.builtin import write_imagenet
from mixmim.models import build_pretrainer
from mixmim.models.pretrainer import mean_colour_loss, pixel_targets
from mixmim.reconstruction_error import ErrorSplit, split_reconstruction_error


class Oracle(nn.Module):
    """A stand-in pretrainer that predicts every cell of the target from the answer (for the split's maths)."""

    def __init__(self, mode: str, cell: int = 32) -> None:
        super().__init__()
        self.stride, self.norm_pix_loss, self.mode = cell, True, mode

    def forward(self, imgs: torch.Tensor, mask: torch.Tensor) -> SimpleNamespace:
        t = pixel_targets(imgs, self.stride, True)
        b, n, _ = t.shape
        cells = t.reshape(b, n, -1, imgs.shape[1])
        means = cells.mean(dim=2, keepdim=True)
        if self.mode == "exact":
            pred = t
        elif self.mode == "flat":  # each cell drawn flat in its own mean colour
            pred = means.expand_as(cells).reshape_as(t)
        else:  # "shifted": the right structure in the wrong colour
            pred = (cells + 0.5).reshape_as(t)
        return SimpleNamespace(pred=pred, mask=mask)


def test_the_split_of_the_answer_the_flat_cells_and_a_colour_error():
    imgs = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    exact = split_reconstruction_error(Oracle("exact"), imgs, mask)
    assert np.allclose(exact.loss, 0.0, atol=1e-10)
    flat = split_reconstruction_error(Oracle("flat"), imgs, mask)
    assert np.allclose(flat.colour, 0.0, atol=1e-10)
    assert np.allclose(flat.structure, flat.flat)  # flat cells: the whole inner variation is missed
    shifted = split_reconstruction_error(Oracle("shifted"), imgs, mask)
    assert np.allclose(shifted.structure, 0.0, atol=1e-10) and np.allclose(shifted.colour, 0.25)


def test_the_split_adds_up_to_the_models_own_loss_dual_and_single():
    torch.manual_seed(0)
    imgs = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    for kwargs in ({}, {"fill": "zero", "dual": False}):
        model = build_pretrainer("mixmim_nano", **kwargs).eval()
        mask = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
        split = split_reconstruction_error(model, imgs, mask)
        with torch.no_grad():
            loss = float(model(imgs, mask).loss)
        assert split.loss.mean() == pytest.approx(loss, rel=1e-5), kwargs
        assert (split.colour > 0).all() and (split.structure > 0).all()
    # with every cell predicted (dual), the reference equals the pretraining's predict-the-mean loss
    dual = split_reconstruction_error(build_pretrainer("mixmim_nano").eval(), imgs, torch.tensor([[1.0, 0, 0, 1]]))
    np.testing.assert_allclose(dual.flat, mean_colour_loss(imgs, 32).double().numpy(), rtol=1e-5)


def test_the_split_refuses_a_model_without_per_cell_normalisation():
    model = build_pretrainer("mixmim_nano", norm_pix_loss=False).eval()
    with pytest.raises(ValueError, match="norm_pix_loss"):
        split_reconstruction_error(model, torch.randn(2, 3, 64, 64), torch.tensor([[1.0, 0, 0, 1]]))


# --------------------------------------------------------------------------- the stage
@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "imagenet"
    write_imagenet(root, seed=0, image_size=64, num_classes=3, train_per_class=4, val_per_class=4)
    return root


def test_stage_writes_per_domain_metrics_and_per_image_values(data_root, tmp_path, monkeypatch):
    import yaml

    from mixmim.pipeline import PARENT_RUN_ENV, load_params
    from mixmim.reconstruction_error import reconstruction_stage
    from mixmim.records import records_path

    monkeypatch.setenv(PARENT_RUN_ENV, "")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    from mixmim.engine.config import PretrainConfig, to_dict

    torch.save({"model": build_pretrainer("mixmim_nano").state_dict(),
                "config": to_dict(PretrainConfig(model="mixmim_nano"))}, tmp_path / "pretrain.pt")
    params = tmp_path / "params.yaml"
    section = {"images": {"val": "imagenet/val", "train": "imagenet/train"}, "limit": 9, "progress": False}
    params.write_text(yaml.safe_dump({
        "roots": {"imagenet": str(data_root)},
        "tracking": {"uri": "sqlite:///mlflow.db", "experiment": "reconstruction-tests", "pipeline": "tests"},
        "reconstruction": section}))
    path = tmp_path / "metrics" / "reconstruction_s0.json"
    result = reconstruction_stage(load_params(params), ["reconstruction"], "pretrain.pt", str(path), seed=0)
    metrics = json.loads(path.read_text())
    assert metrics["val"]["n"] == 8 and metrics["train"]["n"] == 8  # 12 images, 9 picked, paired: 8
    assert metrics["all"]["n"] == 16 and metrics["model"] == "mixmim_nano"
    per_image = json.loads(records_path(path).read_text())
    assert len(per_image["val"]["images"]) == 8 and len(set(per_image["val"]["images"])) == 8
    for domain in ("val", "train"):
        parts = {k: np.asarray(per_image[domain][k]) for k in ("colour", "structure", "flat")}
        assert metrics[domain]["loss"] == pytest.approx(float((parts["colour"] + parts["structure"]).mean()))
    assert metrics["all"]["flat"] == pytest.approx(result["all"]["flat"])
    # a folder that does not exist under its root is named
    bad = {**section, "images": {"x": "imagenet/nothing"}}
    params.write_text(yaml.safe_dump({**yaml.safe_load(params.read_text()), "reconstruction": bad}))
    with pytest.raises(FileNotFoundError, match="reconstruction.images.x='imagenet/nothing'"):
        reconstruction_stage(load_params(params), ["reconstruction"], "pretrain.pt", str(tmp_path / "x.json"), seed=0)
    for bad, match in (({**section, "images": {"all": "imagenet/val"}}, "'all' is taken"),
                       ({**section, "limit": 1}, "limit=1")):
        params.write_text(yaml.safe_dump({**yaml.safe_load(params.read_text()), "reconstruction": bad}))
        with pytest.raises(ValueError, match=match):
            reconstruction_stage(load_params(params), ["reconstruction"], "pretrain.pt", str(tmp_path / "y.json"),
                                 seed=0)
    assert not (tmp_path / "y.json").exists()


# --------------------------------------------------------------------------- the report table
def _write(folder: Path, seed: int, splits: dict[str, ErrorSplit]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    metrics = {d: {"n": len(s.flat)} for d, s in splits.items()}
    (folder / f"reconstruction_s{seed}.json").write_text(json.dumps(
        {**metrics, "model": "m", "fill": "mix", "mask_type": "random", "mask_ratio": 0.5, "seed": seed}))
    (folder / f"reconstruction_s{seed}_preds.json").write_text(json.dumps(
        {d: {"images": [str(i) for i in range(len(s.flat))], "colour": s.colour.tolist(),
             "structure": s.structure.tolist(), "flat": s.flat.tolist()} for d, s in splits.items()}))


def _table(folder: Path) -> pd.DataFrame:
    from mixmim.report.build import build_tables_from

    tables, _ = build_tables_from({"default": str(folder)}, resamples=1000)
    table = next(t for t in tables if t.key == "reconstruction")
    return table.frame.set_index("domain")


def test_report_table_calls_structure_beyond_the_cell_mean_only_when_the_test_says_so(tmp_path):
    rng = np.random.default_rng(0)
    flat = rng.uniform(0.3, 0.5, 40)
    learnt = ErrorSplit(colour=np.full(40, 0.05), structure=flat * 0.8 + rng.normal(0, 0.01, 40), flat=flat)
    none = ErrorSplit(colour=np.full(40, 0.2), structure=flat + rng.normal(0, 0.02, 40), flat=flat)
    _write(tmp_path / "one", 0, {"textures": learnt, "shapes": none})
    frame = _table(tmp_path / "one")
    assert frame.loc["textures", "beyond_cell_mean"] == "yes"
    assert float(frame.loc["textures", "structure_explained_pct"]) == pytest.approx(20.0, abs=1.0)
    assert frame.loc["shapes", "beyond_cell_mean"] == "no"
    assert frame.loc["all", "n_images"] == "80" and "over 80 images" in frame.loc["all", "test"]
    assert float(frame.loc["textures", "loss"]) == pytest.approx(float((learnt.colour + learnt.structure).mean()),
                                                                   abs=1e-3)
    # with several seeds the unit of replication is the seed
    _write(tmp_path / "three", 0, {"textures": learnt})
    for seed, scale in ((1, 0.82), (2, 0.79)):
        _write(tmp_path / "three", seed, {"textures": ErrorSplit(learnt.colour, flat * scale, flat)})
    frame = _table(tmp_path / "three")
    assert frame.loc["textures", "n_seeds"] == "3" and "over 3 seeds" in frame.loc["textures", "test"]
    assert frame.loc["textures", "beyond_cell_mean"] == "yes"


def test_report_table_without_the_stage_says_why(tmp_path):
    (tmp_path / "m").mkdir()
    frame = _table(tmp_path / "m").reset_index()
    assert "no results of the default pipeline" in frame.loc[0, "loss"]
    (tmp_path / "m" / "pretrain_s0.json").write_text(json.dumps({"train_loss": 0.5, "seed": 0}))
    frame = _table(tmp_path / "m").reset_index()
    assert "no reconstruction_s*.json in the default pipeline's metrics" in frame.loc[0, "loss"]
