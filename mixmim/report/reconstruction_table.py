"""The reconstruction table: does the pretrained model reconstruct more than each hidden cell's mean?

Read from the ``reconstruction`` stage's results (``metrics/reconstruction_s<seed>.json`` and
the per-image values beside it, :mod:`mixmim.reconstruction_error`): per domain of held-out
images, the loss split into the hidden cells' colour and their inner structure, against the
predict-the-mean reference. "Beyond the cell mean" is a paired test of the structure error
against the reference's: over images with one seed, over seeds with several.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from ..records import RECORDS_SUFFIX
from ..stats import paired_t_test, t_interval
from .results import Result
from .tables import Context, Table, missing

__all__ = ["TITLE", "reconstruction_table"]

TITLE = ("reconstruction", "Reconstruction beyond the cell mean (held-out images)",
         "the pretrained model's reconstruction error on images pretraining never read, split into the hidden "
         "cells' colour and their inner structure, against the predict-the-mean reference, per domain")
PARTS = ("loss", "flat", "colour", "structure")


def _per_image(result: Result) -> dict[str, dict[str, np.ndarray]]:
    """``{domain: {part: (n,) values}}`` from the per-image file beside ``result``."""
    path = result.path.with_name(f"{result.path.stem}{RECORDS_SUFFIX}.json")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the per-image values of {result.path.name} are missing")
    raw = json.loads(path.read_text(encoding="utf-8"))
    out = {}
    for domain, values in raw.items():
        parts = {k: np.asarray(values[k], dtype=np.float64) for k in ("colour", "structure", "flat")}
        parts["loss"] = parts["colour"] + parts["structure"]
        out[domain] = parts
    return out


def _explained(parts: dict[str, np.ndarray]) -> np.ndarray:
    return 100.0 * (1.0 - parts["structure"] / parts["flat"])


def _row(domain: str, seeds: list[dict[str, np.ndarray]]) -> dict[str, str]:
    """One domain: per image with one seed, per seed (each seed's mean over images) with several."""
    if len(seeds) == 1:
        values, unit = {**seeds[0], "explained": _explained(seeds[0])}, "images"
    else:
        values = {k: np.array([s[k].mean() for s in seeds]) for k in PARTS}
        values["explained"] = np.array([_explained(s).mean() for s in seeds])
        unit = "seeds"
    row = {"domain": domain, "n_images": str(len(seeds[0]["flat"])), "n_seeds": str(len(seeds))}
    for name, key, digits in (*((p, p, 3) for p in PARTS), ("structure_explained_pct", "explained", 1)):
        est = t_interval(values[key], unit=unit)
        row.update({name: f"{est.value:.{digits}f}", f"{name}_ci_low": f"{est.low:.{digits}f}",
                    f"{name}_ci_high": f"{est.high:.{digits}f}"})
    test = paired_t_test(values["structure"], values["flat"], unit=unit)
    row.update({"structure_minus_flat": f"{test.diff:+.4f}", "structure_minus_flat_ci_low": f"{test.low:+.4f}",
                "structure_minus_flat_ci_high": f"{test.high:+.4f}", "p_value": f"{test.p_value:.2g}",
                "beyond_cell_mean": "yes" if test.diff < 0 and test.resolved() else "no", "test": test.method})
    return row


def reconstruction_table(ctx: Context) -> Table:
    """One row per domain and one pooled over domains, for the default pipeline's pretraining."""
    results = ctx.results.group("default", "reconstruction")
    if not results:
        rows = [{"domain": "", "loss": missing(ctx.results.reason("default", "reconstruction"))}]
        return Table(*TITLE, pd.DataFrame(rows))
    seeds = [_per_image(r) for r in results]
    domains = list(seeds[0])
    for r, s in zip(results, seeds):
        if list(s) != domains:
            raise ValueError(f"{r.path.name}: domains {list(s)} differ from {results[0].path.name}'s {domains}")
    pooled = [{k: np.concatenate([s[d][k] for d in domains]) for k in ("colour", "structure", "flat", "loss")}
              for s in seeds]
    rows = [_row(d, [s[d] for s in seeds]) for d in domains] + [_row("all", pooled)]
    first = results[0].metrics
    notes = (f"Model {first.get('model')} (fill={first.get('fill')}, mask={first.get('mask_type')} "
             f"{first.get('mask_ratio')}), the default pipeline's pretraining, on held-out images: the labelled "
             "stand-ins, one folder per domain of the unlabeled pretraining set (params.yaml, reconstruction), "
             "centre crops, a mask per batch of 16. Per image the error is averaged over the cells the model "
             "predicted, in the units of the pretraining loss (per-cell normalised pixels): loss = colour + "
             "structure exactly; colour is the error of the predicted cells' per-channel means, structure that of "
             "the deviations from them. flat: each predicted cell drawn flat in its own true mean colour (the "
             "predict-the-mean reference; colour error 0). structure_explained_pct: per image, 1 - structure / "
             "flat in % (0 for flat cells, negative for wrong structure). beyond_cell_mean = yes when the structure "
             "error is below the reference's, paired t at 5% (over images with one seed, over seeds with more). "
             "Intervals: 95%, Student t over the same unit.",)
    return Table(*TITLE, pd.DataFrame(rows), notes)
