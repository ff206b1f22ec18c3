"""The engines' shared set-up (mixmim.engine.runner.engine_run): process layout, output folder, seeded build."""

from __future__ import annotations

import pytest
import torch

from mixmim.engine.config import PretrainConfig
from mixmim.engine.distributed import DistInfo
from mixmim.engine.runner import EngineRun, engine_run, per_rank_seed


def test_engine_run_makes_the_output_folder_and_describes_one_process(tmp_path):
    out = tmp_path / "run" / "nested"
    with engine_run(PretrainConfig(output_dir=str(out), device="cpu")) as run:
        assert run.out == out and out.is_dir()
        assert (run.info.rank, run.info.world_size, run.info.device.type) == (0, 1, "cpu")


def test_engine_run_without_outputs_writes_nothing(tmp_path):
    out = tmp_path / "never"
    with engine_run(PretrainConfig(output_dir=str(out), device="cpu"), distributed=False, outputs=False) as run:
        with pytest.raises(RuntimeError, match="without an output folder"):
            _ = run.out
    assert not out.exists()


def test_build_is_seeded_the_same_on_every_rank_then_apart():
    """The factory runs under cfg.seed (same weights on every rank); afterwards each rank's RNG is
    seeded with per_rank_seed, so masks and drop path differ between ranks."""
    cfg = PretrainConfig(seed=7)
    draws = {}
    for rank in (0, 1):
        run = EngineRun(cfg, DistInfo(rank=rank, world_size=2), None)
        weights = run.build(lambda: torch.nn.Linear(4, 3).weight.detach().clone())
        after = torch.rand(3)
        torch.manual_seed(per_rank_seed(cfg.seed, run.info))
        assert torch.equal(after, torch.rand(3))  # the RNG left by build is the rank's seed
        draws[rank] = (weights, after)
    assert torch.equal(draws[0][0], draws[1][0])
    assert not torch.equal(draws[0][1], draws[1][1])


def test_close_last_epoch_puts_the_final_evaluation_on_the_last_epoch():
    """The loop does not evaluate the last epoch (the engine evaluates the final weights once, after
    it): the final scores join that epoch's history row and MLflow's epoch/* curves at that epoch."""
    from mixmim.engine.runner import close_last_epoch

    class Recorder:
        def __init__(self):
            self.logged = []

        def log_metrics(self, metrics, step):
            self.logged.append((dict(metrics), step))

    tracker = Recorder()
    history = [{"epoch": 1, "step": 4, "train_loss": 2.0, "val_top1": 10.0}, {"epoch": 2, "step": 8, "train_loss": 1.5}]
    close_last_epoch(history, {"val_top1": 25.0, "val_loss": 1.25}, tracker)
    assert history[-1] == {"epoch": 2, "step": 8, "train_loss": 1.5, "val_top1": 25.0, "val_loss": 1.25}
    assert history[0]["val_top1"] == 10.0
    assert tracker.logged == [({"epoch/val_top1": 25.0, "epoch/val_loss": 1.25}, 2)]
    close_last_epoch([], {"val_top1": 1.0}, tracker)  # no epoch ran (a resumed, finished run): nothing to join
    assert len(tracker.logged) == 1
