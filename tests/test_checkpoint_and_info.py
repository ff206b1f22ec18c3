"""Checkpoint safety and the `mixmim info` figures of the paper."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from mixmim.checkpoint import UnsafeCheckpointError, load_checked, load_file, save_atomic
from mixmim.cli import main
from mixmim.flops import model_info
from mixmim.models import build_classifier, build_pretrainer


class Custom:  # a class that only pickle code execution could rebuild
    def __init__(self):
        self.x = 1


def test_pickle_checkpoints_are_refused(tmp_path: Path):
    path = tmp_path / "evil.pt"
    torch.save({"model": OrderedDict(), "extra": Custom()}, path)
    with pytest.raises(UnsafeCheckpointError, match="weights_only=True"):
        load_file(path)


def test_missing_checkpoint_is_named(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_file(tmp_path / "nope.pt")


def test_save_atomic_round_trips_and_leaves_no_temporary(tmp_path: Path):
    model = build_pretrainer("mixmim_nano")
    path = save_atomic({"model": model.state_dict(), "epoch": 2}, tmp_path / "ckpt" / "last.pt")
    loaded = load_file(path)
    assert loaded["epoch"] == 2
    load_checked(build_pretrainer("mixmim_nano"), loaded["model"])
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]


def test_failed_save_keeps_the_previous_file(tmp_path: Path):
    path = save_atomic({"v": torch.ones(2)}, tmp_path / "last.pt")
    with pytest.raises(Exception, match="pickle"):
        save_atomic({"v": lambda: 1}, path)  # fails midway through writing
    assert torch.equal(load_file(path)["v"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_checkpoint_of_another_size_is_named():
    nano = build_pretrainer("mixmim_nano").state_dict()
    with pytest.raises(ValueError, match=r"encoder\.patch_embed\.proj\.weight.*\(32, 3, 4, 4\).*\(64, 3, 4, 4\)"):
        load_checked(build_pretrainer("mixmim_tiny"), nano)


def test_classifier_starts_from_a_pretraining_checkpoint():
    pre = build_pretrainer("mixmim_nano")
    clf = build_classifier("mixmim_nano", num_classes=5)
    load_checked(clf, pre.state_dict(), allow_missing=("head.",), ignore_unexpected=("decoder.",))
    torch.testing.assert_close(clf.encoder.norm.weight, pre.encoder.norm.weight)


@pytest.mark.parametrize("name, params, gflops", [
    ("mixmim_base", 88.3, 16.35), ("mixmim_large", 197.4, 35.86), ("mixmim_huge", 659.3, 117.67),
])
def test_paper_figures_within_one_percent(name, params, gflops):
    info = model_info(name)
    assert info.img_size == 224
    assert abs(info.params_m - params) / params < 0.01
    assert abs(info.gflops - gflops) / gflops < 0.01


def test_info_cli_prints_json(capsys):
    assert main(["info", "mixmim_base", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"model", "img_size", "params_m", "gflops"}
    assert out["model"] == "mixmim_base" and out["img_size"] == 224


def test_info_cli_rejects_a_size_the_stride_does_not_divide(capsys):
    assert main(["info", "mixmim_base", "--img-size", "200"]) == 2
    assert "not divisible by the encoder stride 32" in capsys.readouterr().err


def test_console_script_is_installed():
    exe = Path(sys.executable).with_name("mixmim")
    if not exe.exists():
        pytest.skip("package not installed (run through `make test`)")
    out = subprocess.run([str(exe), "info", "mixmim_nano", "--json"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["model"] == "mixmim_nano"


def test_rel_pos_tables_are_resized_for_another_window():
    from mixmim.checkpoint import adapt_rel_pos_tables

    src = build_classifier("mixmim_nano", num_classes=2)  # stage-1 window 8 on a 16x16 map
    dst = build_classifier("mixmim_nano", num_classes=2, window_size=(4, 8, 4, 2))
    sd = src.state_dict()
    with pytest.raises(ValueError, match=r"encoder\.stages\.0\.blocks\.0\.attn\.rel_pos_table"):
        load_checked(dst, sd)
    with torch.no_grad():
        sd["encoder.stages.0.blocks.0.attn.rel_pos_table"].fill_(0.25)
    load_checked(dst, adapt_rel_pos_tables(sd, dst))
    table = dst.encoder.stages[0].blocks[0].attn.rel_pos_table
    assert table.shape == (49, 1)
    torch.testing.assert_close(table, torch.full_like(table, 0.25))


def test_coinciding_windows_give_the_same_output():
    # On a 2x2 last-stage map, windows 2 and 7 are both global attention over the map.
    a = build_classifier("mixmim_nano", num_classes=3).eval()
    b = build_classifier("mixmim_nano", num_classes=3, window_size=(8, 8, 4, 7)).eval()
    load_checked(b, a.state_dict())
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(a(x), b(x))


def test_per_block_windows():
    model = build_classifier("mixmim_nano", num_classes=3, window_size=(8, 8, [2, 4], 2))
    assert [blk.window for blk in model.encoder.stages[2].blocks] == [(2, 2), (4, 4)]
    pre = build_pretrainer("mixmim_nano", window_size=(8, 8, [2, 4], 2))
    assert pre(torch.randn(2, 3, 64, 64)).pred.shape[0] == 4
    with pytest.raises(ValueError, match="lists 3 sizes; expected one per block"):
        build_classifier("mixmim_nano", window_size=(8, 8, [2, 4, 4], 2))
