"""The paper's tables, each row with the paper's value and this suite's measured value side by side.

Every builder is a pure function of the committed results (:class:`~.results.Results`:
metrics JSON and per-image records of every pipeline) and returns a :class:`Table` whose
CSV columns are machine-readable and whose Markdown/LaTeX merge each value with its
interval. Conventions, applied the same way in every table:

* ``<m>_paper`` is the paper's number as printed (``mixmim/report/paper/*.csv``);
  ``<m>_ours`` is the suite's value (mean over seeds, or the single run's value) with its
  95% interval in ``<m>_ours_ci_low`` / ``<m>_ours_ci_high`` and the sample behind it in
  ``<m>_n_val`` (validation images) and ``<m>_n_seeds``; a missing value is ``— (reason)``.
* ``<m>_chance`` is the chance level of that value (most frequent validation class for top-1,
  majority-class mIoU for ADE20K, 0 for COCO AP).
* Every comparison a table makes (ablation vs the default variant, pretrained vs scratch,
  backbone vs its scratch) has ``<m>_diff_vs_<ref>``, ``<m>_p_vs_<ref>`` (paired test on the
  shared validation images), ``<m>_p_seeds_vs_<ref>`` (paired t over shared seeds, blank with
  fewer than two) and ``<m>_resolved_vs_<ref>`` (yes/no at 5%, by both tests when both exist).
* Runs stand beside paper rows by one rule (:func:`place_budget`, listed in the
  ``run_mapping`` table): same configuration, and budgets matched by their ratio to the
  setting's default (ours: the pipeline's default pretraining budget; the paper's: 600
  epochs for the main results, section 3; 300 for the ablations, section 5).
* Reported values are the last epoch's (never the best epoch's).
* Size columns say whose count they show (``GFLOPs (paper's model)`` vs ``GFLOPs (our model)``).
"""

from __future__ import annotations

import functools
import importlib.resources
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from ..stats import DEFAULT_RESAMPLES
from .results import (MEASURES, Comparison, Estimate, Measure, Result, Results, chance_level, compare, estimate,
                      scale_name)

__all__ = [
    "DASH", "PAPER_TABLES", "Context", "Table", "build_tables", "missing", "paper_backbone", "paper_table",
    "place_budget",
]

DASH = "—"
NOT_IN_PAPER = f"{DASH} (not in the paper)"

#: The paper's tables this report regenerates: file stem -> (title, one-line description).
PAPER_TABLES: dict[str, tuple[str, str]] = {
    "table2_in1k_mim": ("Table 2: ImageNet-1K finetuning after MIM pretraining",
                        "top-1 of the MixMIM-pretrained encoder finetuned on ImageNet-1K (or its stand-in at built-in scale)"),
    "table3_same_encoder": ("Table 3: MixMIM on other encoders",
                            "per encoder family, top-1 after MixMIM pretraining vs supervised from scratch"),
    "table4_coco_ade20k": ("Table 4: COCO detection/instance segmentation and ADE20K semantic segmentation",
                           "COCO AP box/mask and ADE20K mIoU of the MixMIM-pretrained backbone"),
    "table5_cls_transfer": ("Table 5: transfer to iNaturalist 2018/2019 and Places205/365",
                            "top-1 of the MixMIM-pretrained encoder finetuned on each classification set"),
    "table6_filling": ("Table 6: filling the masked tokens",
                       "ablation of what fills an image's masked cells"),
    "table7_dual": ("Table 7: dual reconstruction", "reconstructing both mixed images vs only one"),
    "table8_masking": ("Table 8: masking strategy", "random vs block masks and random mask-ratio ranges"),
    "table9_epochs": ("Table 9: pretraining epochs", "results as pretraining gets longer"),
    "table10_unmixing": ("Table 10: unmixing the two images in the encoder",
                         "masked self-attention vs mix embedding vs no unmixing"),
    "table13_convnets": ("Table 13: MixMIM on convolutional networks",
                         "BiT-style ResNets: MixMIM pretraining vs supervised training"),
}

CLS_TRANSFER = (("inat2018", "iNat18"), ("inat2019", "iNat19"), ("places205", "Places205"),
                ("places365", "Places365"))

#: The paper's default pretraining budget per setting (main results: section 3; ablations: section 5).
PAPER_DEFAULT_EPOCHS = {"main": 600, "ablations": 300}

#: Roles whose folders hold the default pipeline's names for one model size each (the paper pipeline's
#: metrics/<size>/): ``default`` stands beside the paper row of its model (a CPU-size model: the smallest
#: MixMIM row), ``large`` and ``huge`` beside the MixMIM-L and MixMIM-H rows.
SIZE_ROLES = ("default", "large", "huge")
ROLE_BACKBONE = {"large": "MixMIM-L", "huge": "MixMIM-H"}


@dataclass(frozen=True)
class Table:
    """A finished table: file stem, title, README line, the CSV frame and notes (n, chance, tests)."""

    key: str
    title: str
    description: str
    frame: pd.DataFrame
    notes: tuple[str, ...] = ()


@dataclass
class Context:
    """The results every table reads, the bootstrap size, and the run -> paper row mapping collected."""

    results: Results
    resamples: int = DEFAULT_RESAMPLES
    mapping: list[dict[str, str]] = field(default_factory=list)

    @functools.cached_property
    def _cache(self) -> dict[Any, Any]:
        return {}

    def estimate(self, group: list[Result], measure: Measure) -> Estimate | None:
        key = ("e", tuple(str(r.path) for r in group), measure.key)
        if key not in self._cache:
            self._cache[key] = estimate(group, measure, self.resamples)
        return self._cache[key]

    def compare(self, a: list[Result], b: list[Result], measure: Measure) -> Comparison:
        key = ("c", tuple(str(r.path) for r in a), tuple(str(r.path) for r in b), measure.key)
        if key not in self._cache:
            self._cache[key] = compare(a, b, measure, self.resamples)
        return self._cache[key]

    def record(self, table: str, role: str, run: str, group: list[Result], budget: str, row: str, why: str) -> None:
        seeds = ",".join(str(r.seed) for r in group) if group else ""
        entry = {"table": table, "pipeline": role, "run": run, "seeds": seeds, "budget (ours)": budget,
                 "paper row": row, "why": why}
        if entry not in self.mapping:
            self.mapping.append(entry)


# --------------------------------------------------------------------------- paper data


def paper_table(stem: str) -> pd.DataFrame:
    """A transcribed paper table as strings exactly as printed (blank cells stay '')."""
    resource = importlib.resources.files(__package__).joinpath("paper", f"{stem}.csv")
    with resource.open("r", encoding="utf-8") as handle:
        return pd.read_csv(handle, dtype=str, keep_default_na=False)


def missing(reason: str) -> str:
    """The cell of a value that was not measured, saying why."""
    return f"{DASH} ({reason})"


def _fmt(value: float | None, digits: int = 1) -> str:
    return "" if value is None or math.isnan(value) else f"{value:.{digits}f}"


# --------------------------------------------------------------------------- cells


def ours_cells(ctx: Context, prefix: str, group: list[Result], measure: Measure, why: str) -> dict[str, str]:
    """``<prefix>_ours``, its interval, n_val and n_seeds (``— (why)`` when the variant did not run)."""
    est = ctx.estimate(group, measure) if group else None
    if est is None:
        reason = why if not group else f"no {measure.key} in {group[0].path.name}"
        return {f"{prefix}_ours": missing(reason), f"{prefix}_ours_ci_low": "", f"{prefix}_ours_ci_high": "",
                f"{prefix}_n_val": "", f"{prefix}_n_seeds": "", f"{prefix}_chance": ""}
    chance = chance_level(group, measure)
    return {f"{prefix}_ours": est.cell(), f"{prefix}_ours_ci_low": _fmt(est.low, est.digits),
            f"{prefix}_ours_ci_high": _fmt(est.high, est.digits), f"{prefix}_n_val": str(est.n_val or ""),
            f"{prefix}_n_seeds": str(est.n_seeds), f"{prefix}_chance": _fmt(chance, est.digits)}


def versus_cells(ctx: Context, prefix: str, ref: str, a: list[Result], b: list[Result],
                 measure: Measure) -> dict[str, str]:
    """Difference, paired-test p-value and resolved flag of ``a`` against ``b`` (``ref`` names ``b``)."""
    test = ctx.compare(a, b, measure)
    cells = {f"{prefix}_diff_vs_{ref}": test.diff_cell(), f"{prefix}_p_vs_{ref}": test.p_cell()}
    if measure.per_image:
        cells[f"{prefix}_p_seeds_vs_{ref}"] = test.p_seeds_cell()
    return {**cells, f"{prefix}_resolved_vs_{ref}": test.resolved}


def reference_cells(prefix: str, ref: str, p_text: str = "") -> dict[str, str]:
    """The comparison cells of a row that has none (the reference itself, or no counterpart), with the
    same columns :func:`versus_cells` writes for that measure."""
    cells = {f"{prefix}_diff_vs_{ref}": "", f"{prefix}_p_vs_{ref}": p_text}
    if prefix not in MEASURES or MEASURES[prefix].per_image:
        cells[f"{prefix}_p_seeds_vs_{ref}"] = ""
    return {**cells, f"{prefix}_resolved_vs_{ref}": ""}


def blank_cells(prefix: str, text: str, ref: str | None = None) -> dict[str, str]:
    cells = {f"{prefix}_ours": text, f"{prefix}_ours_ci_low": "", f"{prefix}_ours_ci_high": "",
             f"{prefix}_n_val": "", f"{prefix}_n_seeds": "", f"{prefix}_chance": ""}
    if ref:
        cells.update(reference_cells(prefix, ref))
    return cells


# --------------------------------------------------------------------------- scale and budget


def _num(result: Result | None, key: str) -> float | None:
    return None if result is None else result.value(key)


def _count(value: float | None) -> str:
    return "?" if value is None else f"{value:g}"


def pretrain_group(results: Results, role: str, key: str) -> list[Result]:
    """The pretraining a result started from: the same variant's in ablations/backbones, the size's otherwise."""
    return results.group(role, "pretrain", "" if role in SIZE_ROLES else key)


def pretrain_epochs(results: Results, role: str, key: str) -> float | None:
    group = pretrain_group(results, role, key)
    return _num(group[0], "epochs") if group else None


def scale_label(results: Results, group: list[Result], pretrained: bool = True) -> str:
    """What ran, in one cell: the scale, model, input size and budget (from the metrics JSON and pipeline)."""
    if not group:
        return ""
    r = group[0]
    scale = results.scale_of(group)
    parts = [(f"{scale_name(scale)}: " if scale else "") + str(r.metrics.get("model") or "model ?")]
    overrides = r.metrics.get("model_kwargs")
    if isinstance(overrides, Mapping) and overrides:  # encoder arguments the run changed (decoder's left out)
        words = [f"{k}={overrides[k]}" for k in sorted(overrides) if not str(k).startswith("decoder_")]
        parts[0] += f" ({', '.join(words)})" if words else ""
    if r.value("img_size") is not None:
        parts.append(f"{_count(r.value('img_size'))} px")
    own = (f"{_count(r.value('epochs'))} {'finetune' if r.stage in ('finetune', 'scratch') else 'transfer'} epochs"
           if r.value("epochs") is not None else
           f"{_count(r.value('max_iters'))} transfer iterations" if r.value("max_iters") is not None else "budget ?")
    if pretrained and r.stage not in ("scratch",) and r.metrics.get("init") != "scratch":
        pre = pretrain_epochs(results, r.role, r.key)
        parts.append(f"{_count(pre)} pretrain + {own}")
    else:
        parts.append(f"{own} from scratch")
    return ", ".join(parts)


def place_budget(ours_epochs: float | None, default_epochs: float | None, paper_default: int,
                 paper_budgets: Sequence[int]) -> tuple[int | None, str]:
    """The paper budget a run stands beside: the same ratio to the setting's default (None: no such row)."""
    if ours_epochs is None or default_epochs is None or default_epochs <= 0:
        return None, "pretraining budget unknown"
    ratio = ours_epochs / default_epochs
    target = paper_default * ratio
    why = (f"{ours_epochs:g} ep = {ratio:g}x our default {default_epochs:g} ep -> {ratio:g}x the paper's "
           f"default {paper_default} ep = {target:g}")
    for budget in paper_budgets:
        if abs(budget - target) < 1e-6:
            return budget, why
    return None, why + " (no such paper row)"


# --------------------------------------------------------------------------- backbones

_MIXMIM_NAMES = {"mixmim_base": "MixMIM-B", "mixmim_large": "MixMIM-L", "mixmim_huge": "MixMIM-H"}


def paper_backbone(model: str) -> str | None:
    """The paper's name for a model that ran (``mixmim_base`` -> MixMIM-B); None for the CPU sizes."""
    if model in _MIXMIM_NAMES:
        return _MIXMIM_NAMES[model]
    name = model.lower()
    if name.startswith("resnet"):
        match = re.search(r"(\d+)x(\d+)", name)
        return f"Res{match[1]}x{match[2]}" if match else None
    size = re.search(r"(?:^|_)(base|large|huge)(?:_|$)", name)
    for prefix, label in (("vit", "ViT"), ("swin", "Swin"), ("pvt", "PVT")):
        if name.startswith(prefix) and size:
            return f"{label}-{ {'base': 'B', 'large': 'L', 'huge': 'H'}[size[1]] }"
    return None


def backbone_family(backbone: str) -> str:
    """The backbones pipeline's variant name for a paper backbone (ViT-B -> vit, Res50x3 -> resnet)."""
    name = backbone.lower()
    if name.startswith("res"):
        return "resnet"
    return "pvt" if name.startswith("pvt") else name.split("-")[0]


def _stand_in_row(rows: list[tuple[int, str]], model: str) -> int:
    """Of a configuration's rows (index, backbone): the matching backbone, else the smallest (first)."""
    name = paper_backbone(model)
    return next((i for i, backbone in rows if backbone == name), rows[0][0])


def size_rows(res: Results, rows: list[tuple[int, str]], groups_of: Callable[[str], Sequence[list[Result]]],
              budget_ok: Callable[[str], bool]) -> dict[int, str]:
    """Paper row index -> the size role (:data:`SIZE_ROLES`) whose results stand beside it.

    ``rows`` are the MixMIM rows (index, backbone); ``groups_of(role)`` the role's result groups of the
    table. A role with results takes the row of :data:`ROLE_BACKBONE` (large, huge) or of its model
    (default; a CPU-size model: the smallest row), if the budget rule places it and no earlier role took it.
    """
    placed: dict[int, str] = {}
    for role in SIZE_ROLES:
        anchor = next((g for g in groups_of(role) if g), None)
        if anchor is None or not budget_ok(role):
            continue
        if role in ROLE_BACKBONE:
            target = next((i for i, backbone in rows if backbone == ROLE_BACKBONE[role]), None)
        else:
            target = _stand_in_row(rows, str(anchor[0].metrics.get("model", "")))
        if target is not None and target not in placed:
            placed[target] = role
    return placed


def unrun_cell(res: Results, backbone: str, role: str = "default") -> str:
    """The cell of a paper model this suite did not run, naming the scale of the report's results."""
    return missing(f"{backbone} not run at {res.scale_label(role=role)}")


@functools.lru_cache(maxsize=None)
def _gflops(model: str, img_size: int | None) -> float | None:
    from ..flops import model_info

    try:
        return model_info(model, img_size).gflops
    except (ValueError, RuntimeError, NotImplementedError, TypeError, KeyError):
        return None


def _size(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.1f}" if abs(value) >= 1 else f"{value:.3g}"


# --------------------------------------------------------------------------- notes


def _n_note(ctx: Context, groups: Sequence[list[Result]], measure: Measure, why: str = "") -> str:
    ests = [ctx.estimate(g, measure) for g in groups if g]
    ests = [e for e in ests if e is not None]
    if not ests:
        return f"{measure.label}: no result of ours" + (f" ({why})" if why else "")
    n_val = sorted({e.n_val for e in ests if e.n_val})
    seeds = sorted({e.n_seeds for e in ests})
    bare = sorted({e.method for e in ests if math.isnan(e.low) or math.isnan(e.high)})
    chance = next((c for g in groups if g for c in [chance_level(g, measure)] if c is not None), None)
    chance_txt = "unknown (no per-image records)" if chance is None else f"{chance:.{measure.digits}f}"
    if measure.kind == "loss":
        return (f"{measure.label}: the last epoch's mean reconstruction loss on each variant's own masked cells, "
                f"{', '.join(map(str, seeds))} seed(s) per variant, compared by a paired t test over seeds (same "
                f"seed = same initialisation, data order and mask draws); the predict-the-mean level (every masked "
                f"cell its true mean colour) = {chance_txt} (the *_chance column). Variants that change the task "
                "(fill, mask ratio, one or two reconstructions) are not compared on it as encoders: a lower loss "
                "there is an easier task (section 5 reads shuffle and zoom-in that way)."
                + (f"; values shown with 'no interval': {', '.join(bare)}" if bare else ""))
    if measure.kind == "heldout":
        return (f"{measure.label}: per variant, 1 - structure error / the predict-the-mean reference's, pooled over "
                f"the held-out images of every domain (stages/reconstruction.py: the labelled stand-ins, images "
                f"pretraining never read, one fixed mask per batch), {', '.join(map(str, seeds))} seed(s) per "
                "variant, compared by a paired t test over seeds; the reference scores 0 (the *_chance column). "
                "It measures the pretext task on unseen images, so fills that leak the hidden cells (shuffle, "
                "zoom-in) can score higher without a better encoder."
                + (f"; values shown with 'no interval': {', '.join(bare)}" if bare else ""))
    what = {"classification": "most frequent validation class", "segmentation": "majority-class mIoU",
            }.get(measure.kind, "a detector without signal")
    return (f"{measure.label}: n = {', '.join(map(str, n_val)) or '?'} validation images, "
            f"{', '.join(map(str, seeds))} seed(s) per variant; chance level ({what}) = {chance_txt}"
            + (f"; values shown with 'no interval': {', '.join(bare)}" if bare else ""))


def standard_note(ctx: Context) -> str:
    """How every interval and test of the report was computed."""
    return ("Intervals: 95%, Student t over seeds when >= 2 seeds, else percentile bootstrap over validation "
            f"images ({ctx.resamples} resamples, metric recomputed per resample). Tests: exact McNemar (one seed "
            "each, top-1), else paired bootstrap over the shared validation images of the seed-averaged metric "
            "(that test sees the validation sample, not training randomness, so with two or more shared seeds a "
            "paired t test over the per-seed values is added, *_p_seeds_vs_*, and resolved needs both below 0.05); "
            "a value with no per-image records (the pretraining loss) is compared by a paired t test over shared "
            "seeds alone; resolved = p < 0.05. Values are "
            "the last epoch's. Which paper row each run stands beside: run_mapping.")


# --------------------------------------------------------------------------- Table 2


def table2(ctx: Context) -> Table:
    res = ctx.results
    paper = paper_table("table2_in1k_mim")
    group = res.group("default", "finetune", "imagenet")
    scratch = res.group("default", "scratch", "imagenet")
    mixmim = [int(p) for p in paper.loc[paper.method == "MixMIM", "pretrain_epochs"]]
    pre = pretrain_epochs(res, "default", "imagenet")
    budget, why = place_budget(pre, pre, PAPER_DEFAULT_EPOCHS["main"], mixmim)
    rows = []
    placed = False
    model = str(group[0].metrics.get("model", "")) if group else ""
    for _, r in paper.iterrows():
        row = {"method": r.method, "backbone": r.backbone, "GFLOPs (paper's model)": r.flops_g,
               "params M (paper's model)": r.params_m, "supervision": r.supervision,
               "pretrain_epochs_paper": r.pretrain_epochs, "top1_paper": r.top1}
        here = r.method == "MixMIM" and budget is not None and int(r.pretrain_epochs) == budget and not placed
        if here:
            placed = True
            img = group[0].value("img_size") if group else None
            row["GFLOPs (our model)"] = _size(_gflops(model, int(img) if img else None)) if group else ""
            row.update(ours_cells(ctx, "top1", group, MEASURES["top1"], res.reason("default", "finetune", "imagenet")))
            row.update(versus_cells(ctx, "top1", "scratch", group, scratch, MEASURES["top1"]))
            row["scale_ours"] = scale_label(res, group)
        else:
            text = (missing(f"{r.method} not reproduced") if r.method != "MixMIM"
                    else missing(f"no run of ours at {int(r.pretrain_epochs) / 600:g}x the paper's default budget"))
            row["GFLOPs (our model)"] = ""
            row.update(blank_cells("top1", text, "scratch"))
            row["scale_ours"] = ""
        rows.append(row)
    if group:
        ctx.record("table2", "default", "finetune_imagenet", group, f"{_count(pre)} pretrain epochs",
                   f"MixMIM-B, {budget} epochs" if budget else "none", why)
    notes = (_n_note(ctx, [group, scratch], MEASURES["top1"]),
             "top1_*_vs_scratch: the same encoder and finetuning budget from random initialisation "
             "(metrics/scratch_imagenet).", standard_note(ctx))
    return Table("table2_in1k_mim", *PAPER_TABLES["table2_in1k_mim"], pd.DataFrame(rows), notes)


# --------------------------------------------------------------------------- Tables 3 and 13


def _encoder_table(ctx: Context, stem: str, keep: Mapping[str, str], stage_of: Mapping[str, str],
                   not_run: Callable[[str], str]) -> Table:
    """MixMIM rows from the backbones pipeline's finetune runs, supervised rows from its scratch runs."""
    res = ctx.results
    paper = paper_table(stem)
    placed: dict[int, tuple[str, list[Result]]] = {}
    groups: dict[tuple[str, str], list[tuple[int, str]]] = {}
    for i, r in paper.iterrows():
        if r.method in stage_of:
            groups.setdefault((backbone_family(r.backbone), stage_of[r.method]), []).append((int(i), r.backbone))
    for (family, stage), members in groups.items():
        group = res.group("backbones", stage, family)
        if group:
            target = _stand_in_row(members, str(group[0].metrics.get("model", "")))
            placed[target] = (family, group)
            row = paper.loc[target]
            ctx.record(stem.split("_")[0], "backbones", f"{stage}_{family}", group,
                       f"{_count(pretrain_epochs(res, 'backbones', family))} pretrain epochs" if stage == "finetune"
                       else "from scratch", f"{row.method} {row.backbone}",
                       "same encoder family; our tiny model stands beside the family's smallest paper model "
                       "at that row's own budget")
    rows = []
    top1 = MEASURES["top1"]
    for i, r in paper.iterrows():
        row = {label: r[column] for column, label in keep.items()}
        row["top1_paper"] = r.top1
        stage = stage_of.get(r.method)
        family = backbone_family(r.backbone)
        if int(i) in placed:
            fam, group = placed[int(i)]
            row.update(ours_cells(ctx, "top1", group, top1, ""))
            if stage == "finetune":
                row.update(versus_cells(ctx, "top1", "scratch", group, res.group("backbones", "scratch", fam), top1))
            else:
                row.update(reference_cells("top1", "scratch"))
            row.update(_probe_cells(ctx, fam if stage == "finetune" else None))
            row["scale_ours"] = scale_label(res, group)
        else:
            if stage is None:
                text = not_run(r.method)
            elif not res.group("backbones", stage, family):
                text = missing(res.reason("backbones", stage, family))
            else:
                text = unrun_cell(res, r.backbone, "backbones")
            row.update(blank_cells("top1", text, "scratch"))
            row.update(_probe_cells(ctx, None, text))
            row["scale_ours"] = ""
        rows.append(row)
    fams = sorted({f for f, _ in groups})
    notes = (_n_note(ctx, [res.group("backbones", s, f) for f in fams for s in ("finetune", "scratch")], top1,
                     res.absent("backbones")),
             "top1_*_vs_scratch (MixMIM rows): the same encoder trained from scratch with the same finetuning "
             "budget (pipelines/backbones). knn_top1_* / linear_top1_* (MixMIM rows): k-NN (k=20) and linear "
             "probe on the frozen features of the pretrained encoder, *_vs_random against a random init of the "
             "same encoder (probe@<family>-random).", standard_note(ctx))
    return Table(stem, *PAPER_TABLES[stem], pd.DataFrame(rows), notes)


def _probe_cells(ctx: Context, family: str | None, text: str = "") -> dict[str, str]:
    """k-NN and linear-probe cells of a MixMIM row (``family``: its backbones family); a row without
    probes gets ``text`` (why its results are missing, or nothing for a from-scratch row)."""
    res = ctx.results
    cells: dict[str, str] = {}
    for key in ("knn_top1", "linear_top1"):
        if family is None:
            cells.update(blank_cells(key, text, "random"))
            continue
        measure = MEASURES[key]
        pre = res.group("backbones", "probe", f"{family}_pretrained")
        rnd = res.group("backbones", "probe", f"{family}_random")
        if not pre:
            cells.update(blank_cells(key, missing(res.reason("backbones", "probe", f"{family}_pretrained")), "random"))
            continue
        cells.update(ours_cells(ctx, key, pre, measure, ""))
        cells.update(versus_cells(ctx, key, "random", pre, rnd, measure) if rnd else reference_cells(key, "random"))
    return cells


def table3(ctx: Context) -> Table:
    keep = {"method": "method", "backbone": "backbone", "pretrain_epochs": "pretrain_epochs_paper",
            "finetune_epochs": "finetune_epochs_paper"}
    return _encoder_table(ctx, "table3_same_encoder", keep, {"MixMIM": "finetune", "Supervised": "scratch"},
                          lambda m: missing(f"{m} not reproduced"))


def table13(ctx: Context) -> Table:
    keep = {"method": "method", "backbone": "backbone", "input_size": "input_size_paper",
            "pretrain_data": "pretrain_data_paper"}

    def why(method: str) -> str:
        return missing("needs ImageNet-21K labels") if method == "BiT-M" else missing(f"{method} not reproduced")

    return _encoder_table(ctx, "table13_convnets", keep, {"MixMIM": "finetune", "BiT-S": "scratch"}, why)


# --------------------------------------------------------------------------- Table 4


def _main_budget(res: Results, role: str) -> tuple[int | None, str]:
    """The paper budget a size role's runs stand beside: its own pretraining is its default (1x -> 600)."""
    pre = pretrain_epochs(res, role, "")
    return place_budget(pre, pre, PAPER_DEFAULT_EPOCHS["main"], [PAPER_DEFAULT_EPOCHS["main"]])


def table4(ctx: Context) -> Table:
    res = ctx.results
    paper = paper_table("table4_coco_ade20k")
    mixmim = [(int(i), r.backbone) for i, r in paper.iterrows() if r.method == "MixMIM"]
    targets = size_rows(res, mixmim, lambda role: (res.group(role, "coco"), res.group(role, "ade20k")),
                        lambda role: _main_budget(res, role)[0] is not None)
    rows = []
    for i, r in paper.iterrows():
        row = {"method": r.method, "backbone": r.backbone, "pretrain_epochs_paper": r.pretrain_epochs,
               "COCO GFLOPs (paper's model)": r.coco_flops_g, "COCO params M (paper's model)": r.coco_params_m,
               "ADE GFLOPs (paper's model)": r.ade_flops_g, "ADE params M (paper's model)": r.ade_params_m,
               "ap_box_paper": r.ap_box, "ap_mask_paper": r.ap_mask, "miou_paper": r.miou}
        role = targets.get(int(i))
        if role is not None:
            coco, ade = res.group(role, "coco"), res.group(role, "ade20k")
            coco_s, ade_s = res.group(role, "scratch", "coco"), res.group(role, "scratch", "ade20k")
            for prefix, group, other in (("ap_box", coco, coco_s), ("ap_mask", coco, coco_s), ("miou", ade, ade_s)):
                stage = "coco" if prefix != "miou" else "ade20k"
                row.update(ours_cells(ctx, prefix, group, MEASURES[prefix], res.reason(role, stage)))
                row.update(versus_cells(ctx, prefix, "scratch", group, other, MEASURES[prefix]))
            row["COCO GFLOPs (our model)"] = _size(_num(coco[0] if coco else None, "model_gflops"))
            row["COCO params M (our model)"] = _size(_num(coco[0] if coco else None, "model_params_m"))
            row["ADE GFLOPs (our model)"] = _size(_num(ade[0] if ade else None, "model_gflops"))
            row["ADE params M (our model)"] = _size(_num(ade[0] if ade else None, "model_params_m"))
            row["scale_ours"] = "; ".join(dict.fromkeys(s for s in (scale_label(res, coco), scale_label(res, ade)) if s))
            budget, why = _main_budget(res, role)
            for name, group in (("coco", coco), ("ade20k", ade)):
                if group:
                    ctx.record("table4", role, name, group, f"{_count(pretrain_epochs(res, role, ''))} pretrain epochs",
                               f"{r.backbone}, {budget} epochs", why)
        else:
            text = missing(f"{r.method} not reproduced") if r.method != "MixMIM" else (
                unrun_cell(res, r.backbone) if targets else missing(res.reason("default", "coco")))
            for prefix in ("ap_box", "ap_mask", "miou"):
                row.update(blank_cells(prefix, text, "scratch"))
            for name in ("COCO GFLOPs", "COCO params M", "ADE GFLOPs", "ADE params M"):
                row[f"{name} (our model)"] = ""
            row["scale_ours"] = ""
        rows.append(row)
    shown = [targets[i] for i in sorted(targets)] or ["default"]
    coco_groups = [g for role in shown for g in (res.group(role, "coco"), res.group(role, "scratch", "coco"))]
    ade_groups = [g for role in shown for g in (res.group(role, "ade20k"), res.group(role, "scratch", "ade20k"))]
    notes = (_n_note(ctx, coco_groups, MEASURES["ap_box"]), _n_note(ctx, ade_groups, MEASURES["miou"]),
             "*_vs_scratch: the same detector/segmentor from random initialisation (metrics/scratch_coco, "
             "metrics/scratch_ade20k). Our GFLOPs/params: the dense model each run trained, at its input size, "
             "as the run counted it (model_gflops/model_params_m in its metrics JSON).", standard_note(ctx))
    return Table("table4_coco_ade20k", *PAPER_TABLES["table4_coco_ade20k"], pd.DataFrame(rows), notes)


# --------------------------------------------------------------------------- Table 5


def _at_chance(ctx: Context, group: list[Result], measure: Measure) -> bool:
    """Whether a result cannot be told from chance: its interval (or value) reaches the chance level."""
    est = ctx.estimate(group, measure)
    chance = chance_level(group, measure)
    if est is None or chance is None:
        return False
    low = est.low if not math.isnan(est.low) else est.value
    return low <= chance


def _average_cell(ctx: Context, groups: Mapping[str, list[Result]], measure: Measure) -> str:
    """Mean of a row's "ours" values, leaving out (and naming) any at or below chance or without a value."""
    values: list[float] = []
    excluded, unknown, absent = [], [], []
    for name, group in groups.items():
        est = ctx.estimate(group, measure) if group else None
        if est is None:
            absent.append(name)
        elif _at_chance(ctx, group, measure):
            excluded.append(name)
        else:
            values.append(est.value)
            if chance_level(group, measure) is None:
                unknown.append(name)
    if not values:
        return missing("no transfer result above chance")
    cell = f"{sum(values) / len(values):.1f}"
    if excluded:
        cell += f" (excludes {', '.join(excluded)}: at or below chance)"
    if absent:
        cell += f" (excludes {', '.join(absent)}: not run)"
    if unknown:
        cell += f" (includes {', '.join(unknown)}: chance level unknown, no per-image records)"
    return cell


def table5(ctx: Context) -> Table:
    res = ctx.results
    top1 = MEASURES["top1"]
    paper = paper_table("table5_cls_transfer")
    mixmim = [(int(i), r.backbone) for i, r in paper.iterrows() if r.method == "MixMIM"]

    def groups_of(role: str) -> dict[str, list[Result]]:
        return {name: res.group(role, "finetune", name) for name, _ in CLS_TRANSFER}

    targets = size_rows(res, mixmim, lambda role: list(groups_of(role).values()),
                        lambda role: _main_budget(res, role)[0] is not None)
    rows = []
    for i, r in paper.iterrows():
        row: dict[str, str] = {"method": r.method, "backbone": r.backbone, "GFLOPs (paper's model)": r.flops_g,
                               "params M (paper's model)": r.params_m}
        role = targets.get(int(i))
        groups = groups_of(role) if role is not None else {}
        for name, label in CLS_TRANSFER:
            row[f"{name}_paper"] = r[name]
            if role is not None:
                group = groups[name]
                row.update(ours_cells(ctx, name, group, top1, res.reason(role, "finetune", name)))
                row.update(versus_cells(ctx, name, "scratch", group, res.group(role, "scratch", name), top1))
            else:
                text = missing(f"{r.method} not reproduced") if r.method != "MixMIM" else (
                    unrun_cell(res, r.backbone) if targets else missing(res.reason("default", "finetune", name)))
                row.update(blank_cells(name, text, "scratch"))
        row["average_paper"] = r.average
        row["average_ours"] = _average_cell(ctx, groups, top1) if role is not None else row["inat2018_ours"]
        row["scale_ours"] = "; ".join(dict.fromkeys(scale_label(res, g) for g in groups.values() if g))
        rows.append(row)
        if role is not None:
            budget, why = _main_budget(res, role)
            for name, group in groups.items():
                if group:
                    ctx.record("table5", role, f"finetune_{name}", group,
                               f"{_count(pretrain_epochs(res, role, ''))} pretrain epochs",
                               f"{r.backbone}, {budget} epochs", why)
    shown = [targets[i] for i in sorted(targets)] or ["default"]
    notes = (_n_note(ctx, [res.group(role, "finetune", n) for role in shown for n, _ in CLS_TRANSFER], top1),
             "average_ours excludes any dataset whose interval reaches its chance level (or that did not run) "
             "and names it.",
             "*_vs_scratch: the same encoder and budget from random initialisation (metrics/scratch_<dataset>).",
             standard_note(ctx))
    return Table("table5_cls_transfer", *PAPER_TABLES["table5_cls_transfer"], pd.DataFrame(rows), notes)


# --------------------------------------------------------------------------- ablations (Tables 6-10)

#: measure -> the ablations pipeline's stage that produces it
ABLATION_MEASURES = (("top1", "finetune"), ("miou", "ade20k"), ("knn_top1", "probe"), ("linear_top1", "probe"),
                     ("pretrain_loss", "pretrain"), ("structure_explained", "reconstruction"))


def _ablation_measures(res: Results) -> list[tuple[str, str]]:
    """Measures with at least one result in the ablations pipeline (top-1 and mIoU always shown)."""
    return [(m, s) for m, s in ABLATION_MEASURES if m in ("top1", "miou") or res.keys("ablations", s)]


def _ablation_cells(ctx: Context, variant: str | None, paper: Mapping[str, str], table: str, row_name: str,
                    why_missing: str = "") -> dict[str, str]:
    """Ours and vs-default cells of one ablation variant (every measure), and the mapping entry."""
    res = ctx.results
    cells: dict[str, str] = {}
    for measure, stage in _ablation_measures(res):
        if measure in paper:
            cells[f"{measure}_paper"] = paper[measure]
        if variant is None:
            cells.update(blank_cells(measure, missing(why_missing or "not run"), "default"))
            continue
        group = res.group("ablations", stage, variant)
        cells.update(ours_cells(ctx, measure, group, MEASURES[measure], res.reason("ablations", stage, variant)))
        if variant == "default":
            cells.update(reference_cells(measure, "default", "(reference)"))
        else:
            cells.update(versus_cells(ctx, measure, "default", group, res.group("ablations", stage, "default"),
                                      MEASURES[measure]))
    cells["variant_ours"] = variant or ""
    group = res.group("ablations", "finetune", variant) if variant else []
    cells["scale_ours"] = scale_label(res, group) if group else ""
    if variant is not None and any(res.group("ablations", s, variant) for _, s in ABLATION_MEASURES):
        pre = pretrain_epochs(res, "ablations", variant)
        default = pretrain_epochs(res, "ablations", "default")
        _, why = place_budget(pre, default, PAPER_DEFAULT_EPOCHS["ablations"], [300, 600, 900])
        ctx.record(table, "ablations", variant, res.group("ablations", "pretrain", variant),
                   f"{_count(pre)} pretrain epochs", row_name, "same configuration; " + why)
    return cells


def _ablation_notes(ctx: Context, variants: Sequence[str]) -> tuple[str, ...]:
    res = ctx.results
    notes = [_n_note(ctx, [res.group("ablations", s, v) for v in variants], MEASURES[m], res.absent("ablations"))
             for m, s in _ablation_measures(res)]
    notes += ["*_vs_default: each variant against the ablations pipeline's default variant on the same "
              "validation images.", standard_note(ctx)]
    return tuple(notes)


def _extra(res: Results, prefix: str, placed: Sequence[str]) -> list[str]:
    keys = sorted({r.key for r in res.all if r.role == "ablations" and r.stage != "pretrain"})
    return [k for k in keys if k.startswith(prefix) and k not in placed]


def _named_ablation(ctx: Context, stem: str, column: str, variant_of: Callable[[str], str], prefix: str) -> Table:
    paper = paper_table(stem)
    rows, placed = [], []
    for _, r in paper.iterrows():
        variant = variant_of(r[column])
        placed.append(variant)
        rows.append({column: r[column], **_ablation_cells(ctx, variant, r, stem.split("_")[0],
                                                          f"{column}={r[column]}")})
    for variant in _extra(ctx.results, prefix, placed):
        rows.append({column: variant[len(prefix):],
                     **_ablation_cells(ctx, variant, {"top1": NOT_IN_PAPER, "miou": NOT_IN_PAPER},
                                       stem.split("_")[0], "none (not in the paper)")})
    return Table(stem, *PAPER_TABLES[stem], pd.DataFrame(rows), _ablation_notes(ctx, placed))


def table6(ctx: Context) -> Table:
    return _named_ablation(ctx, "table6_filling", "fill", lambda f: "default" if f == "mix" else f"fill-{f}", "fill-")


def table7(ctx: Context) -> Table:
    return _named_ablation(ctx, "table7_dual", "dual", lambda d: "default" if d == "true" else "dual-off", "dual-")


def _mask_variant(mask_type: str, ratio: str, spread: str) -> str:
    if float(spread) == 0.0:
        return "default" if mask_type == "random" else f"mask-{mask_type}"
    return f"mask-range-{round(float(ratio) * 100)}-{round(float(spread) * 100)}"


def table8(ctx: Context) -> Table:
    paper = paper_table("table8_masking")
    rows, placed = [], []
    for _, r in paper.iterrows():
        variant = _mask_variant(r.mask_type, r.mask_ratio, r.range_mask_ratio)
        placed.append(variant)
        rows.append({"mask_type": r.mask_type, "mask_ratio": r.mask_ratio, "range_mask_ratio": r.range_mask_ratio,
                     **_ablation_cells(ctx, variant, r, "table8", f"{r.mask_type} {r.mask_ratio} + U(0, "
                                       f"{r.range_mask_ratio})")})
    for variant in _extra(ctx.results, "mask-", placed):
        match = re.fullmatch(r"mask-range-(\d+)-(\d+)", variant)
        kind, ratio, spread = ("random", f"{int(match[1]) / 100:g}", f"{int(match[2]) / 100:g}") if match else (
            variant[5:], "?", "?")
        rows.append({"mask_type": kind, "mask_ratio": ratio, "range_mask_ratio": spread,
                     **_ablation_cells(ctx, variant, {"top1": NOT_IN_PAPER, "miou": NOT_IN_PAPER}, "table8",
                                       "none (not in the paper)")})
    return Table("table8_masking", *PAPER_TABLES["table8_masking"], pd.DataFrame(rows), _ablation_notes(ctx, placed))


def table9(ctx: Context) -> Table:
    """Pretraining epochs: each variant on the paper row of the same ratio to the setting's default budget."""
    res = ctx.results
    paper = paper_table("table9_epochs")
    budgets = [int(e) for e in paper.pretrain_epochs]
    default = pretrain_epochs(res, "ablations", "default")
    sweep = ["default"] + [k for k in _extra(res, "epochs-", []) if k != "default"]
    assigned: dict[int, str] = {}
    unplaced = []
    for variant in sweep:
        epochs = pretrain_epochs(res, "ablations", variant)
        if epochs is None:
            match = re.fullmatch(r"epochs-(\d+)", variant)
            epochs = float(match[1]) if match else None
        budget, _ = place_budget(epochs, default, PAPER_DEFAULT_EPOCHS["ablations"], budgets)
        if budget is not None and budget not in assigned and any(res.group("ablations", s, variant)
                                                                 for _, s in ABLATION_MEASURES):
            assigned[budget] = variant
        elif any(res.group("ablations", s, variant) for _, s in ABLATION_MEASURES):
            unplaced.append((epochs, variant))
    rows = []
    for _, r in paper.iterrows():
        variant = assigned.get(int(r.pretrain_epochs))
        epochs = pretrain_epochs(res, "ablations", variant) if variant else None
        why = (f"no variant at {int(r.pretrain_epochs) / PAPER_DEFAULT_EPOCHS['ablations']:g}x our default budget"
               if not res.absent("ablations") else res.absent("ablations"))
        rows.append({"pretrain_epochs_paper": r.pretrain_epochs, "pretrain_epochs_ours": _count(epochs)
                     if variant else "", **_ablation_cells(ctx, variant, r, "table9",
                                                           f"{r.pretrain_epochs} epochs", why)})
    for epochs, variant in sorted(unplaced, key=lambda x: (x[0] is None, x[0] or 0)):
        rows.append({"pretrain_epochs_paper": NOT_IN_PAPER, "pretrain_epochs_ours": _count(epochs),
                     **_ablation_cells(ctx, variant, {"top1": NOT_IN_PAPER, "miou": NOT_IN_PAPER}, "table9",
                                       "none (no paper row at this budget ratio)")})
    return Table("table9_epochs", *PAPER_TABLES["table9_epochs"], pd.DataFrame(rows),
                 _ablation_notes(ctx, list(assigned.values()) + [v for _, v in unplaced]))


_UNMIX = {"none (w/o unmixing)": "unmix-none", "mix embedding": "unmix-mix_embedding",
          "masked self-attention": "default"}


def table10(ctx: Context) -> Table:
    """Unmixing: our default-budget runs stand beside the paper's 300-epoch column (its ablation default)."""
    paper = paper_table("table10_unmixing")
    rows, placed = [], []
    for _, r in paper.iterrows():
        variant = _UNMIX.get(r.approach)
        placed.append(variant or "")
        cells = _ablation_cells(ctx, variant, {"top1": r.top1_300ep}, "table10", f"{r.approach}, 300-epoch column",
                                "no such variant")
        rows.append({"approach": r.approach, "GFLOPs (paper's model)": r.flops_g, "params M (paper's model)": r.params_m,
                     "top1_600ep_paper": r.top1_600ep, "top1_900ep_paper": r.top1_900ep, **cells})
    for variant in _extra(ctx.results, "unmix-", placed):
        rows.append({"approach": variant[len("unmix-"):], "GFLOPs (paper's model)": NOT_IN_PAPER,
                     "params M (paper's model)": NOT_IN_PAPER, "top1_600ep_paper": NOT_IN_PAPER,
                     "top1_900ep_paper": NOT_IN_PAPER,
                     **_ablation_cells(ctx, variant, {"top1": NOT_IN_PAPER}, "table10", "none (not in the paper)")})
    frame = pd.DataFrame(rows).rename(columns={"top1_paper": "top1_300ep_paper"})
    return Table("table10_unmixing", *PAPER_TABLES["table10_unmixing"], frame, _ablation_notes(ctx, placed))


# --------------------------------------------------------------------------- mapping


MAPPING = ("run_mapping", "Which paper row each run stands beside",
           "every run of ours shown in a table, its budget, the paper row beside it and why")

MAPPING_RULE = (
    "One rule for every table: a run stands beside the paper row of the same configuration (method, variant, "
    "encoder family; a CPU-size model beside the family's smallest paper model), and budgets are matched by "
    "their ratio to the setting's default: our pipeline's default pretraining budget stands for the paper's "
    "default, which is 600 epochs for the main results (Tables 2, 4, 5; paper section 3) and 300 for the "
    "ablations (Tables 6-10; section 5). A variant with twice our default budget stands beside twice the "
    "paper's default, and where the paper has no such row the run gets its own row. Tables 3 and 13 compare "
    "encoder families at each paper row's own budget. Values are always the last epoch's.")


def mapping_table(ctx: Context) -> Table:
    frame = pd.DataFrame(ctx.mapping, columns=["table", "pipeline", "run", "seeds", "budget (ours)", "paper row",
                                               "why"])
    return Table(MAPPING[0], MAPPING[1], MAPPING[2], frame, (MAPPING_RULE,))


# --------------------------------------------------------------------------- all


BUILDERS: dict[str, Callable[[Context], Table]] = {
    "table2_in1k_mim": table2, "table3_same_encoder": table3, "table4_coco_ade20k": table4,
    "table5_cls_transfer": table5, "table6_filling": table6, "table7_dual": table7, "table8_masking": table8,
    "table9_epochs": table9, "table10_unmixing": table10, "table13_convnets": table13,
}


def build_tables(results: Results, resamples: int = DEFAULT_RESAMPLES,
                 extra: Sequence[Callable[[Context], Table]] = ()) -> list[Table]:
    """Every table of the report in the paper's order, then ``extra`` builders, then the run mapping."""
    ctx = Context(results, resamples)
    tables = [build(ctx) for build in BUILDERS.values()]
    tables += [build(ctx) for build in extra]
    tables.append(mapping_table(ctx))
    return tables
