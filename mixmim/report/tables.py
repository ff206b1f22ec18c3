"""The paper's tables, each row with the paper's value and this suite's measured value side by side.

Every builder takes a :class:`~mixmim.report.runs.RunIndex` and returns a :class:`Table`
of display strings, so what a reader sees in Markdown, CSV and LaTeX is the same. The
conventions, chosen so a table can never overstate what was run:

* ``X (paper)`` is the paper's number as printed (``mixmim/report/paper/*.csv``);
  ``X (ours)`` is the measured value, or ``— (reason)`` saying why there is none.
* Our run is placed on the paper row it stands in for: the row whose backbone matches
  the model that ran (``mixmim_base`` -> MixMIM-B), else the family's first row (the
  smallest model, e.g. MixMIM-B for a ``mixmim_tiny`` run at built-in scale). The
  ``scale (ours)`` column says what actually ran, so a stand-in is never mistaken for
  the paper's configuration.
* Classification values are ``final/top1`` (percent). COCO AP and ADE20K mIoU are
  logged as fractions and shown as percent, as the paper prints them.
"""

from __future__ import annotations

import importlib.resources
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

from .runs import Run, RunIndex

__all__ = [
    "PAPER_TABLES", "Table", "build_tables", "missing", "paper_backbone", "paper_table", "scale_label",
]

DASH = "—"
NOT_IN_PAPER = f"{DASH} (not in the paper)"

#: The paper's tables this report regenerates: file stem -> (title, one-line description).
PAPER_TABLES: dict[str, tuple[str, str]] = {
    "table2_in1k_mim": ("Table 2: ImageNet-1K finetuning after MIM pretraining",
                        "top-1 of the MixMIM-pretrained encoder finetuned on the ImageNet-1K stand-in"),
    "table3_same_encoder": ("Table 3: MixMIM on other encoders",
                            "per encoder family, top-1 after MixMIM pretraining vs supervised from scratch"),
    "table4_coco_ade20k": ("Table 4: COCO detection/instance segmentation and ADE20K semantic segmentation",
                           "COCO AP box/mask and ADE20K mIoU of the MixMIM-pretrained backbone"),
    "table5_cls_transfer": ("Table 5: transfer to iNaturalist 2018/2019 and Places205/365",
                            "top-1 of the MixMIM-pretrained encoder finetuned on each classification set"),
    "table6_filling": ("Table 6: filling the masked tokens",
                       "ablation of what fills an image's masked cells (top-1, mIoU)"),
    "table7_dual": ("Table 7: dual reconstruction", "reconstructing both mixed images vs only one"),
    "table8_masking": ("Table 8: masking strategy", "random vs block masks and random mask-ratio ranges"),
    "table9_epochs": ("Table 9: pretraining epochs", "top-1 and mIoU as pretraining gets longer"),
    "table10_unmixing": ("Table 10: unmixing the two images in the encoder",
                         "masked self-attention vs mix embedding vs no unmixing"),
    "table13_convnets": ("Table 13: MixMIM on convolutional networks",
                         "BiT-style ResNets: MixMIM pretraining vs supervised training"),
}

PRETRAINED_VS_SCRATCH = ("pretrained_vs_scratch", "Pretrained vs from scratch (default pipeline)",
                         "the same encoder finetuned with the same budget, from MixMIM pretraining and from "
                         "random initialisation")

CLS_TRANSFER = (("inat2018", "iNat18"), ("inat2019", "iNat19"), ("places205", "Places205"),
                ("places365", "Places365"))
CLS_DATASETS = ("imagenet",) + tuple(name for name, _ in CLS_TRANSFER)


@dataclass(frozen=True)
class Table:
    """A finished table: the file stem it is written under, its title and README line."""

    key: str
    title: str
    description: str
    frame: pd.DataFrame


# --------------------------------------------------------------------------- paper data


def paper_table(stem: str) -> pd.DataFrame:
    """A transcribed paper table as strings exactly as printed (blank cells stay '')."""
    resource = importlib.resources.files(__package__).joinpath("paper", f"{stem}.csv")
    with resource.open("r", encoding="utf-8") as handle:
        return pd.read_csv(handle, dtype=str, keep_default_na=False)


# --------------------------------------------------------------------------- cells


def missing(reason: str) -> str:
    """The cell of a value that was not measured, saying why."""
    return f"{DASH} ({reason})"


def percent(value: float | None, reason: str, scale: float = 1.0) -> str:
    """A measured percentage with one decimal, as the paper prints them, or a missing cell."""
    if value is None or math.isnan(value):
        return missing(reason)
    return f"{value * scale:.1f}"


def _magnitude(value: Any) -> str:
    """A size (GFLOPs, M params) with the precision its magnitude needs: 701, 35.8, 0.0873."""
    v = float(value)
    if abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.1f}" if abs(v) >= 1 else f"{v:.3g}"


def _same(a: str, b: float | None, tol: float = 1e-6) -> bool:
    """Whether a printed paper number equals a logged one (both as floats)."""
    try:
        return b is not None and abs(float(a) - b) <= tol
    except ValueError:
        return False


# --------------------------------------------------------------------------- scale


_SCALE_DATA = {"builtin": "built-in data", "paper": "paper data"}
_SCALE_PHRASE = {"builtin": "built-in scale", "paper": "paper scale"}


def scale_phrase(run: Run | None) -> str:
    """'built-in scale' / 'paper scale': the words for why a bigger model is absent."""
    if run is None:
        return "this suite's scale"
    return _SCALE_PHRASE.get(run.scale, f"{run.scale} scale" if run.scale else "this suite's scale")


def image_size(run: Run) -> int | None:
    """The input side a run used: its ``img_size`` param, else its registered size's default."""
    size = run.number("img_size")
    if size is not None:
        return int(size)
    from ..models.registry import MODEL_SIZES

    registered = MODEL_SIZES.get(run.model)
    return registered.img_size if registered is not None else None


def _count(value: float | None) -> str | None:
    return None if value is None else f"{value:g}"


_BUDGET_WORD = {"finetune": "finetune", "linear_probe": "probe", "coco": "transfer", "ade20k": "transfer"}


def _epochs_text(run: Run, index: RunIndex) -> str | None:
    """The training budget behind a number: pretraining plus this stage's epochs (or iterations)."""
    epochs = _count(run.number("epochs"))
    if run.stage == "pretrain":
        return f"{epochs} pretrain epochs" if epochs else None
    if run.stage == "scratch":
        return f"{epochs} epochs from scratch" if epochs else "from scratch"
    if epochs:
        own = f"{epochs} {_BUDGET_WORD.get(run.stage, run.stage)} epochs"
    else:
        iters = next((_count(run.number(k)) for k in ("max_iters", "iters", "iterations", "max_steps")
                      if run.number(k) is not None), None)
        own = f"{iters} {_BUDGET_WORD.get(run.stage, run.stage)} iterations" if iters else None
    parent = index.pretrain_for(run)
    pre = _count(parent.number("epochs")) if parent is not None else None
    if pre and own:
        return f"{pre} pretrain + {own}"
    return own or (f"{pre} pretrain epochs" if pre else None)


def model_overrides(run: Run) -> str:
    """The encoder arguments a run changed from its named model (``embed_dim=48, depths=[2, 2]``).

    MLflow stores ``model_kwargs`` flattened (``model_kwargs.depths.0``); lists are put back
    together here. The decoder's arguments are left out: they do not change the encoder
    that the table's numbers belong to.
    """
    values: dict[str, Any] = {}
    for key in sorted(run.params):
        if not key.startswith("model_kwargs."):
            continue
        name, _, index = key[len("model_kwargs."):].partition(".")
        if name.startswith("decoder_"):
            continue
        value = run.params[key]
        if index.isdigit():
            values.setdefault(name, {})[int(index)] = value
        else:
            values[name] = value
    words = []
    for name, value in values.items():
        if isinstance(value, dict):
            value = "[" + ", ".join(value[i] for i in sorted(value)) + "]"
        words.append(f"{name}={value}")
    return ", ".join(words)


def scale_label(run: Run | None, index: RunIndex, note: str = "") -> str:
    """What ran, in one cell: data, model, input size and budget (``''`` when nothing ran)."""
    if run is None:
        return ""
    parts = [_SCALE_DATA.get(run.scale, f"{run.scale} data" if run.scale else "data scale unknown")]
    if run.model:
        overrides = model_overrides(run)
        parts.append(f"{run.model} ({overrides})" if overrides else run.model)
    size = image_size(run)
    if size is not None:
        parts.append(f"{size} px")
    epochs = _epochs_text(run, index)
    if epochs:
        parts.append(epochs)
    text = ", ".join(parts)
    return f"{text} ({note})" if note else text


# --------------------------------------------------------------------------- backbones

_MIXMIM_NAMES = {"mixmim_base": "MixMIM-B", "mixmim_large": "MixMIM-L", "mixmim_huge": "MixMIM-H"}
_FAMILY_PREFIX = (("vit", "ViT"), ("swin", "Swin"), ("pvt", "PVT"))
_SIZE_LETTER = {"base": "B", "large": "L", "huge": "H"}


def paper_backbone(model: str) -> str | None:
    """The paper's name for a model that ran (``mixmim_base`` -> MixMIM-B, a BiT R50x3 -> Res50x3).

    None when the model has no counterpart in the paper (the CPU sizes, tiny timm models).
    """
    if model in _MIXMIM_NAMES:
        return _MIXMIM_NAMES[model]
    name = model.lower()
    if name.startswith("resnet"):
        match = re.search(r"(\d+)x(\d+)", name)
        return f"Res{match[1]}x{match[2]}" if match else None
    size = re.search(r"(?:^|_)(base|large|huge)(?:_|$)", name)
    for prefix, label in _FAMILY_PREFIX:
        if name.startswith(prefix) and size:
            return f"{label}-{_SIZE_LETTER[size[1]]}"
    return None


def backbone_family(backbone: str) -> str:
    """The adapter family of a paper backbone name (ViT-B -> vit, Res50x3 -> resnet)."""
    name = backbone.lower()
    if name.startswith("res"):
        return "resnet"
    if name.startswith("pvt"):
        return "pvt_v2"
    return name.split("-")[0]


def _same_family(variant: str, family: str) -> bool:
    v, f = variant.lower(), family.lower()
    return bool(v) and (v == f or v.startswith(f) or f.startswith(v))


def _family_run(index: RunIndex, family: str, stage: str) -> Run | None:
    found = [r for r in index.select("backbones", stage) if _same_family(r.variant, family)]
    return found[0] if found else None


def _stand_in(rows: list[tuple[int, str]], run: Run | None, default: int | None = None) -> int | None:
    """Which of ``rows`` ((row index, backbone)) shows ``run``: the matching backbone, else ``default``/the first."""
    if run is None or not rows:
        return None
    name = paper_backbone(run.model)
    for i, backbone in rows:
        if backbone == name:
            return i
    return default if default is not None else rows[0][0]


def _not_run(what: str, run: Run | None) -> str:
    return missing(f"{what} not run at {scale_phrase(run)}")


def _not_reproduced(method: str) -> str:
    return missing(f"{method} not reproduced")


# --------------------------------------------------------------------------- Table 2


def table2(index: RunIndex) -> pd.DataFrame:
    """ImageNet stand-in top-1 of the default pipeline on the MixMIM row matching our model and budget.

    The row is the matching backbone's (any MixMIM row for a CPU size) with our pretraining
    epochs, else the paper's default budget (600 epochs), else the first.
    """
    paper = paper_table("table2_in1k_mim")
    run = index.find("default", "finetune", dataset="imagenet")
    target = None
    if run is not None:
        parent = index.pretrain_for(run)
        epochs = parent.number("epochs") if parent is not None else None
        mixmim = [(i, r.backbone) for i, r in paper.iterrows() if r.method == "MixMIM"]
        candidates = [i for i, b in mixmim if b == paper_backbone(run.model)] or [i for i, _ in mixmim]
        target = next((i for i in candidates if _same(paper.at[i, "pretrain_epochs"], epochs)),
                      next((i for i in candidates if paper.at[i, "pretrain_epochs"] == "600"), candidates[0]))
    reason = index.reason("default", "finetune", dataset="imagenet")
    rows = []
    for i, r in paper.iterrows():
        if r.method != "MixMIM":
            ours = _not_reproduced(r.method)
        elif run is None:
            ours = missing(reason)
        elif i == target:
            ours = percent(run.metric("final/top1"), "no final/top1 logged")
        else:
            ours = _not_run(f"{r.backbone}, {r.pretrain_epochs} epochs", run)
        rows.append({
            "method": r.method, "backbone": r.backbone, "GFLOPs": r.flops_g, "params (M)": r.params_m,
            "supervision": r.supervision, "pretrain epochs": r.pretrain_epochs,
            "top1 (paper)": r.top1, "top1 (ours)": ours,
            "scale (ours)": scale_label(run, index) if i == target else "",
        })
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- Tables 3 and 13


def _encoder_table(paper: pd.DataFrame, index: RunIndex, stage_of_method: Callable[[str], str | None],
                   keep: Mapping[str, str], not_run_why: Callable[[str], str]) -> pd.DataFrame:
    """Rows of a same-encoder table: MixMIM rows from finetune runs, supervised rows from scratch runs.

    ``stage_of_method`` maps a paper method to the stage that measures it here (None: not
    reproduced); the run of each (family, stage) is placed on one row of that group.
    """
    placed: dict[int, Run] = {}
    groups: dict[tuple[str, str], list[tuple[int, str]]] = {}
    for i, r in paper.iterrows():
        stage = stage_of_method(r.method)
        if stage is not None:
            groups.setdefault((backbone_family(r.backbone), stage), []).append((i, r.backbone))
    for (family, stage), members in groups.items():
        run = _family_run(index, family, stage)
        target = _stand_in(members, run)
        if target is not None and run is not None:
            placed[target] = run
    rows = []
    for i, r in paper.iterrows():
        stage = stage_of_method(r.method)
        family = backbone_family(r.backbone)
        if stage is None:
            ours = not_run_why(r.method)
        elif i in placed:
            ours = percent(placed[i].metric("final/top1"), "no final/top1 logged")
        elif _family_run(index, family, stage) is None:
            ours = missing(index.reason("backbones", stage, variant=family))
        else:
            ours = _not_run(r.backbone, _family_run(index, family, stage))
        row = {label: r[column] for column, label in keep.items()}
        row.update({"top1 (paper)": r.top1, "top1 (ours)": ours,
                    "scale (ours)": scale_label(placed[i], index) if i in placed else ""})
        rows.append(row)
    return pd.DataFrame(rows)


def table3(index: RunIndex) -> pd.DataFrame:
    """Backbones pipeline: MixMIM-pretrained vs supervised-from-scratch top-1 per encoder family."""
    stages = {"MixMIM": "finetune", "Supervised": "scratch"}
    keep = {"method": "method", "backbone": "backbone", "pretrain_epochs": "pretrain epochs",
            "finetune_epochs": "finetune epochs"}
    return _encoder_table(paper_table("table3_same_encoder"), index, stages.get, keep, _not_reproduced)


def table13(index: RunIndex) -> pd.DataFrame:
    """Backbones pipeline's ResNet runs: BiT-S rows get the supervised-from-scratch run."""
    stages = {"MixMIM": "finetune", "BiT-S": "scratch"}
    keep = {"method": "method", "backbone": "backbone", "input_size": "input size", "pretrain_data": "pretrain data"}

    def why(method: str) -> str:
        return missing("needs ImageNet-21K labels") if method == "BiT-M" else _not_reproduced(method)

    return _encoder_table(paper_table("table13_convnets"), index, stages.get, keep, why)


# --------------------------------------------------------------------------- Table 4


def _cost(run: Run | None, key: str, why: str) -> str:
    """A dense model's size as its run logged it (``model/gflops``, ``model/params_m``)."""
    if run is None:
        return missing(why)
    value = run.metric(key)
    return _magnitude(value) if value is not None else missing(f"{key} not logged by run {run.run_id}")


def table4(index: RunIndex) -> pd.DataFrame:
    """COCO AP box/mask and ADE20K mIoU of the default pipeline on the matching MixMIM row.

    Our GFLOPs/params cells are those of the detector and segmentor each run trained, at
    the run's input size, as the dense engines count and log them
    (:func:`mixmim.transfer.train.dense_complexity`).
    """
    paper = paper_table("table4_coco_ade20k")
    coco = index.find("default", "coco")
    ade = index.find("default", "ade20k")
    anchor = coco or ade
    mixmim = [(i, r.backbone) for i, r in paper.iterrows() if r.method == "MixMIM"]
    target = _stand_in(mixmim, anchor)
    coco_why = index.reason("default", "coco")
    ade_why = index.reason("default", "ade20k")
    rows = []
    for i, r in paper.iterrows():
        if r.method != "MixMIM":
            cell = _not_reproduced(r.method)
            ours = dict.fromkeys(("cf", "cp", "box", "mask", "af", "ap", "miou", "base"), cell)
        elif i != target:
            cell = _not_run(r.backbone, anchor) if anchor is not None else missing(coco_why)
            ours = dict.fromkeys(("cf", "cp", "box", "mask", "af", "ap", "miou", "base"), cell)
        else:
            ours = {
                "cf": _cost(coco, "model/gflops", coco_why), "cp": _cost(coco, "model/params_m", coco_why),
                "box": percent(coco.metric("final/ap_box") if coco else None, coco_why, 100),
                "mask": percent(coco.metric("final/ap_mask") if coco else None, coco_why, 100),
                "af": _cost(ade, "model/gflops", ade_why), "ap": _cost(ade, "model/params_m", ade_why),
                "miou": percent(ade.metric("final/miou") if ade else None, ade_why, 100),
                "base": percent(ade.metric("final/baseline_miou") if ade else None, ade_why, 100),
            }
        scale = ""
        if i == target:
            labels = dict.fromkeys(label for label in (scale_label(coco, index), scale_label(ade, index)) if label)
            scale = "; ".join(labels)
        rows.append({
            "method": r.method, "backbone": r.backbone, "pretrain epochs": r.pretrain_epochs,
            "COCO GFLOPs (paper)": r.coco_flops_g, "COCO GFLOPs (ours)": ours["cf"],
            "COCO params M (paper)": r.coco_params_m, "COCO params M (ours)": ours["cp"],
            "AP box (paper)": r.ap_box, "AP box (ours)": ours["box"],
            "AP mask (paper)": r.ap_mask, "AP mask (ours)": ours["mask"],
            "ADE GFLOPs (paper)": r.ade_flops_g, "ADE GFLOPs (ours)": ours["af"],
            "ADE params M (paper)": r.ade_params_m, "ADE params M (ours)": ours["ap"],
            "mIoU (paper)": r.miou, "mIoU (ours)": ours["miou"],
            "mIoU most-frequent-class baseline (ours)": ours["base"],
            "scale (ours)": scale, "note": r.note,
        })
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- Table 5


def table5(index: RunIndex) -> pd.DataFrame:
    """Default pipeline's finetunes on the iNaturalist and Places stand-ins, on the matching MixMIM row."""
    paper = paper_table("table5_cls_transfer")
    runs = {name: index.find("default", "finetune", dataset=name) for name, _ in CLS_TRANSFER}
    anchor = next((run for run in runs.values() if run is not None), None)
    mixmim = [(i, r.backbone) for i, r in paper.iterrows() if r.method == "MixMIM"]
    target = _stand_in(mixmim, anchor)
    rows = []
    for i, r in paper.iterrows():
        row: dict[str, str] = {"method": r.method, "backbone": r.backbone, "GFLOPs": r.flops_g,
                               "params (M)": r.params_m}
        values: list[float] = []
        for name, label in CLS_TRANSFER:
            run = runs[name]
            if r.method != "MixMIM":
                ours = _not_reproduced(r.method)
            elif run is None:
                ours = missing(index.reason("default", "finetune", dataset=name))
            elif i != target:
                ours = _not_run(r.backbone, run)
            else:
                top1 = run.metric("final/top1")
                ours = percent(top1, "no final/top1 logged")
                if top1 is not None:
                    values.append(top1)
            row[f"{label} (paper)"] = r[name]
            row[f"{label} (ours)"] = ours
        if r.method != "MixMIM":
            average = _not_reproduced(r.method)
        elif i != target:
            average = _not_run(r.backbone, anchor) if anchor is not None else missing("no transfer runs")
        elif len(values) == len(CLS_TRANSFER):
            average = f"{sum(values) / len(values):.1f}"
        else:
            average = missing(f"{len(CLS_TRANSFER) - len(values)} of {len(CLS_TRANSFER)} datasets not run")
        row["average (paper)"] = r.average
        row["average (ours)"] = average
        labels = dict.fromkeys(scale_label(run, index) for run in runs.values() if run is not None)
        row["scale (ours)"] = "; ".join(labels) if i == target else ""
        rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- ablations (Tables 6-10)


@dataclass(frozen=True)
class Ablation:
    """The runs of one ablation variant: its pretraining, ImageNet finetune and ADE20K transfer."""

    variant: str
    pretrain: Run | None
    finetune: Run | None
    ade: Run | None
    note: str = ""

    @property
    def ran(self) -> bool:
        return any(run is not None for run in (self.pretrain, self.finetune, self.ade))


def ablation(index: RunIndex, variant: str) -> Ablation:
    """Runs of ``variant`` in the ablations pipeline.

    The ``default`` variant falls back to the default pipeline's runs when the ablations
    pipeline did not repeat them (it is the same configuration), and says so.
    """
    found = Ablation(variant, index.find("ablations", "pretrain", variant=variant),
                     index.find("ablations", "finetune", variant=variant, dataset="imagenet"),
                     index.find("ablations", "ade20k", variant=variant))
    if variant != "default" or found.finetune is not None or found.ade is not None:
        return found
    fallback = Ablation(variant, index.find("default", "pretrain", variant="default") or found.pretrain,
                        index.find("default", "finetune", dataset="imagenet"), index.find("default", "ade20k"),
                        note="default pipeline's runs")
    return fallback if fallback.finetune is not None or fallback.ade is not None else found


def _ablation_cells(index: RunIndex, result: Ablation | None, paper_top1: str, paper_miou: str | None,
                    want_miou: bool = True) -> dict[str, str]:
    """top1/mIoU paper-and-ours cells plus the variant and scale of one ablation row."""
    if result is None:
        top1 = miou = missing("not run")
        variant = scale = ""
    else:
        v = result.variant
        role = "default" if result.note else "ablations"
        top1 = (percent(result.finetune.metric("final/top1"), "no final/top1 logged") if result.finetune
                else missing(index.reason(role, "finetune", variant=None if result.note else v)))
        miou = (percent(result.ade.metric("final/miou"), "no final/miou logged", 100) if result.ade
                else missing(index.reason(role, "ade20k", variant=None if result.note else v)))
        variant = v
        # the finetune and the ADE20K transfer can differ in input size and budget: name both
        runs = [r for r in (result.finetune, result.ade) if r is not None] or [result.pretrain]
        scale = "; ".join(dict.fromkeys(scale_label(r, index) for r in runs))
        scale = f"{scale} ({result.note})" if result.note and scale else scale
    cells = {"top1 (paper)": paper_top1, "top1 (ours)": top1}
    if want_miou:
        cells.update({"mIoU (paper)": paper_miou or "", "mIoU (ours)": miou})
    cells.update({"variant (ours)": variant, "scale (ours)": scale})
    return cells


def _extra_variants(index: RunIndex, prefix: str, placed: Iterable[str]) -> list[str]:
    """Ablation variants with ``prefix`` that ran but have no row in the paper's table."""
    done = set(placed)
    return [v for v in index.variants("ablations") if v.startswith(prefix) and v not in done]


def _named_ablation_table(index: RunIndex, stem: str, key: str, label: str,
                          variant_of: Callable[[str], str], prefix: str) -> pd.DataFrame:
    """Tables 6 and 7: each paper row is one named variant; extra variants of the prefix follow."""
    paper = paper_table(stem)
    rows, placed = [], []
    for _, r in paper.iterrows():
        variant = variant_of(r[key])
        result = ablation(index, variant)
        placed.append(variant)
        cells = _ablation_cells(index, result, r.top1, r.miou)
        if not result.ran:
            cells["variant (ours)"] = variant
        rows.append({label: r[key], **cells})
    for variant in _extra_variants(index, prefix, placed):
        rows.append({label: variant[len(prefix):], **_ablation_cells(index, ablation(index, variant),
                                                                       NOT_IN_PAPER, NOT_IN_PAPER)})
    return pd.DataFrame(rows)


def table6(index: RunIndex) -> pd.DataFrame:
    """Fill: ``mix`` is the default variant, the others ``fill-<name>``."""
    return _named_ablation_table(index, "table6_filling", "fill", "fill",
                                 lambda fill: "default" if fill == "mix" else f"fill-{fill}", "fill-")


def table7(index: RunIndex) -> pd.DataFrame:
    """Dual reconstruction: on is the default variant, off is ``dual-off``."""
    return _named_ablation_table(index, "table7_dual", "dual", "dual",
                                 lambda dual: "default" if dual == "true" else "dual-off", "dual-")


def _mask_params(result: Ablation) -> tuple[str, float | None, float | None]:
    """(mask type, ratio, range) a variant pretrained with, from its pretraining run's params."""
    run = result.pretrain
    if run is None:
        return "", None, None
    return run.param("mask_type") or "random", run.number("mask_ratio"), run.number("range_mask_ratio") or 0.0


def _mask_matches(result: Ablation, mask_type: str, ratio: str, spread: str) -> bool:
    kind, own_ratio, own_spread = _mask_params(result)
    return kind == mask_type and _same(ratio, own_ratio) and _same(spread, own_spread)


def table8(index: RunIndex) -> pd.DataFrame:
    """Masking: random 0.5 is the default, ``mask-block`` the block row; ranged ratios match by params."""
    paper = paper_table("table8_masking")
    ranged = [ablation(index, v) for v in index.variants("ablations")
              if v.startswith("mask-") and v != "mask-block"]
    rows, placed = [], ["mask-block"]
    for _, r in paper.iterrows():
        if float(r.range_mask_ratio) == 0.0:
            result: Ablation | None = ablation(index, "default" if r.mask_type == "random" else "mask-block")
        else:
            result = next((a for a in ranged if _mask_matches(a, r.mask_type, r.mask_ratio, r.range_mask_ratio)),
                          None)
        cells = _ablation_cells(index, result, r.top1, r.miou)
        if result is not None:
            placed.append(result.variant)
        elif float(r.range_mask_ratio) > 0:
            cells["top1 (ours)"] = cells["mIoU (ours)"] = missing(
                f"no ablation pretrained with ratio {r.mask_ratio} + U(0, {r.range_mask_ratio})")
        rows.append({"mask type": r.mask_type, "mask ratio": r.mask_ratio, "range mask ratio": r.range_mask_ratio,
                     **cells})
    for variant in _extra_variants(index, "mask-", placed):
        result = ablation(index, variant)
        kind, ratio, spread = _mask_params(result)
        rows.append({"mask type": kind or "?", "mask ratio": _count(ratio) or "?",
                     "range mask ratio": _count(spread) or "?",
                     **_ablation_cells(index, result, NOT_IN_PAPER, NOT_IN_PAPER)})
    return pd.DataFrame(rows)


def _variant_epochs(index: RunIndex, result: Ablation) -> int | None:
    """Pretraining epochs of a variant: ``epochs-<n>`` names them, else its pretraining run's params."""
    match = re.fullmatch(r"epochs-(\d+)", result.variant)
    if match:
        return int(match[1])
    run = result.pretrain or (index.pretrain_for(result.finetune) if result.finetune else None)
    epochs = run.number("epochs") if run is not None else None
    return None if epochs is None else int(epochs)


def table9(index: RunIndex) -> pd.DataFrame:
    """Pretraining epochs: our sweep (default + ``epochs-<n>``) next to the paper's 300/600/900.

    Our budgets are the paper's only at paper scale. At a smaller scale the sweep keeps
    the paper's shape (e.g. 1x, 2x, 3x), so when none of our budgets equals a paper row,
    the i-th shortest of ours is shown on the i-th paper row, with its epochs spelled out.
    """
    paper = paper_table("table9_epochs")
    sweep: dict[int, Ablation] = {}
    for variant in ["default"] + [v for v in index.variants("ablations") if v.startswith("epochs-")]:
        result = ablation(index, variant)
        epochs = _variant_epochs(index, result) if result.ran else None
        if epochs is not None and epochs not in sweep:
            sweep[epochs] = result
    paper_epochs = [int(e) for e in paper.pretrain_epochs]
    exact = {e: sweep[e] for e in paper_epochs if e in sweep}
    if exact:
        assignment = exact
    else:  # a scaled-down sweep: pair by rank
        assignment = dict(zip(paper_epochs, (sweep[e] for e in sorted(sweep))))
    placed = {id(a) for a in assignment.values()}
    rows = []
    for _, r in paper.iterrows():
        result = assignment.get(int(r.pretrain_epochs))
        ours_epochs = _variant_epochs(index, result) if result is not None else None
        cells = _ablation_cells(index, result, r.top1, r.miou)
        if result is None:
            cells["top1 (ours)"] = cells["mIoU (ours)"] = missing(
                f"no {r.pretrain_epochs}-epoch run" if exact else f"our sweep has {len(sweep)} budget(s)")
        rows.append({"pretrain epochs (paper)": r.pretrain_epochs,
                     "pretrain epochs (ours)": str(ours_epochs) if ours_epochs is not None else "", **cells})
    for epochs in sorted(sweep):
        if id(sweep[epochs]) not in placed:
            rows.append({"pretrain epochs (paper)": NOT_IN_PAPER, "pretrain epochs (ours)": str(epochs),
                         **_ablation_cells(index, sweep[epochs], NOT_IN_PAPER, NOT_IN_PAPER)})
    return pd.DataFrame(rows)


_UNMIX_VARIANTS = {"none (w/o unmixing)": "unmix-none", "mix embedding": "unmix-mix_embedding",
                   "masked self-attention": "default"}


def table10(index: RunIndex) -> pd.DataFrame:
    """Unmixing: ``unmix-none``, ``unmix-mix_embedding`` and masked attention (the default)."""
    paper = paper_table("table10_unmixing")
    rows, placed = [], []
    for _, r in paper.iterrows():
        variant = _UNMIX_VARIANTS.get(r.approach, "")
        result = ablation(index, variant) if variant else None
        placed.append(variant)
        cells = _ablation_cells(index, result, "", None, want_miou=False)
        cells.pop("top1 (paper)")
        epochs = _variant_epochs(index, result) if result is not None and result.ran else None
        if result is not None and not result.ran:
            cells["variant (ours)"] = variant
        rows.append({"approach": r.approach, "GFLOPs": r.flops_g, "params (M)": r.params_m,
                     "top1 300 ep (paper)": r.top1_300ep, "top1 600 ep (paper)": r.top1_600ep,
                     "top1 900 ep (paper)": r.top1_900ep, "top1 (ours)": cells.pop("top1 (ours)"),
                     "pretrain epochs (ours)": str(epochs) if epochs is not None else "", **cells})
    for variant in _extra_variants(index, "unmix-", placed):
        result = ablation(index, variant)
        cells = _ablation_cells(index, result, "", None, want_miou=False)
        cells.pop("top1 (paper)")
        rows.append({"approach": variant[len("unmix-"):], "GFLOPs": NOT_IN_PAPER, "params (M)": NOT_IN_PAPER,
                     "top1 300 ep (paper)": NOT_IN_PAPER, "top1 600 ep (paper)": NOT_IN_PAPER,
                     "top1 900 ep (paper)": NOT_IN_PAPER, "top1 (ours)": cells.pop("top1 (ours)"),
                     "pretrain epochs (ours)": str(_variant_epochs(index, result) or ""), **cells})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- pretrained vs scratch


def pretrained_vs_scratch(index: RunIndex) -> pd.DataFrame:
    """The default pipeline's key result: the same encoder and budget, MixMIM-pretrained vs from scratch.

    One row per classification set with a finetune or scratch run (ImageNet always). The
    gain is only computed when both ran; unequal finetuning budgets are flagged because
    they would make the comparison unfair.
    """
    rows = []
    for dataset in CLS_DATASETS:
        pre = index.find("default", "finetune", dataset=dataset)
        scratch = index.find("default", "scratch", dataset=dataset)
        probe = index.find("default", "linear_probe", dataset=dataset)
        if dataset != "imagenet" and pre is None and scratch is None:
            continue
        a = pre.metric("final/top1") if pre else None
        b = scratch.metric("final/top1") if scratch else None
        gain = f"{a - b:+.1f}" if a is not None and b is not None else missing("needs both runs")
        budgets = [_count(run.number("epochs")) if run else None for run in (pre, scratch)]
        budget = " / ".join(e or "?" for e in budgets)
        if budgets[0] and budgets[1] and budgets[0] != budgets[1]:
            budget += " (budgets differ)"
        rows.append({
            "dataset": dataset,
            "top1 MixMIM-pretrained (ours)": percent(a, index.reason("default", "finetune", dataset=dataset)),
            "top1 from scratch (ours)": percent(b, index.reason("default", "scratch", dataset=dataset)),
            "gain (points)": gain,
            "top1 linear probe (ours)": percent(probe.metric("final/top1") if probe else None,
                                                index.reason("default", "linear_probe", dataset=dataset)),
            "finetune epochs (pretrained / scratch)": budget,
            "scale (ours)": scale_label(pre or scratch, index),
        })
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- all


def build_tables(index: RunIndex) -> list[Table]:
    """Every table of the report, in the paper's order, the pretrained-vs-scratch table first."""
    builders: dict[str, Callable[[RunIndex], pd.DataFrame]] = {
        "table2_in1k_mim": table2, "table3_same_encoder": table3,
        "table4_coco_ade20k": table4, "table5_cls_transfer": table5,
        "table6_filling": table6, "table7_dual": table7, "table8_masking": table8, "table9_epochs": table9,
        "table10_unmixing": table10, "table13_convnets": table13,
    }
    key, title, description = PRETRAINED_VS_SCRATCH
    tables = [Table(key, title, description, pretrained_vs_scratch(index))]
    for stem, build in builders.items():
        title, description = PAPER_TABLES[stem]
        tables.append(Table(stem, title, description, build(index)))
    return tables
