"""pipelines/paper: every row of the paper is a stage, with its size's values from the paper.

The expected rows come from the paper's tables (shared/paper/*.csv, shipped in
mixmim/report/paper) and the per-size values from recipes.csv (Tables 11/12, section 8),
so a params edit that drops a row or gives a size another size's value fails here.
"""

from __future__ import annotations

import csv
import importlib.resources
import re
from pathlib import Path

import pytest
import yaml

from mixmim.engine.config import FinetuneConfig, PretrainConfig, from_mapping
from mixmim.pipeline import load_params, merged
from mixmim.transfer.dense_config import DetectionConfig, SegmentationConfig, check_config

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "pipelines" / "paper"
SIZES = {"base": ("mixmim_base", "B"), "large": ("mixmim_large", "L"), "huge": ("mixmim_huge", "H")}
# The paper's name of each timm encoder the pipeline runs (PVT v2-b4 stands in for PVT v1-L).
BACKBONES = {"vit_base_patch16_224": "ViT-B", "vit_large_patch16_224": "ViT-L",
             "swin_base_patch4_window7_224": "Swin-B", "swin_large_patch4_window7_224": "Swin-L",
             "pvt_v2_b4": "PVT-L", "resnetv2_50x3_bit": "Res50x3", "resnetv2_101x3_bit": "Res101x3"}


def paper_csv(stem: str) -> list[dict[str, str]]:
    text = importlib.resources.files("mixmim.report").joinpath("paper", f"{stem}.csv").read_text()
    return list(csv.DictReader(text.splitlines()))


def recipe(stage: str, key: str) -> str:
    rows = [r for r in paper_csv("recipes") if (r["stage"], r["key"]) == (stage, key)]
    assert len(rows) == 1, f"recipes.csv has no single {stage}.{key}"
    return rows[0]["value"]


def per_size(text: str) -> dict[str, float]:
    """'0.1 (B), 0.2 (L), 0.3 (H)' or '100 (B), 50 (L/H)' -> {'B': 0.1, ...}."""
    out = {}
    for value, sizes in re.findall(r"([\d.]+) \(([BLH/]+)\)", text):
        for size in sizes.split("/"):
            out[size] = float(value)
    return out


@pytest.fixture(scope="module")
def params():
    return load_params(PAPER / "params.yaml")


@pytest.fixture(scope="module")
def stages():
    """stage name -> {foreach key -> --sections}, from dvc.yaml with DVC's substitutions done here."""
    dvc = yaml.safe_load((PAPER / "dvc.yaml").read_text())["stages"]
    data = yaml.safe_load((PAPER / "params.yaml").read_text())
    out = {}
    for name, stage in dvc.items():
        if "foreach" not in stage:  # the probe stages (matrix of checkpoint x init) train nothing
            continue
        source = stage["foreach"][2:-1]  # "${a.b}" -> "a.b"
        items = data
        for part in source.split("."):
            items = items[part]
        entries = items.items() if isinstance(items, dict) else ((i, i) for i in items)
        out[name] = {}
        for key, item in entries:
            cmd = stage["do"]["cmd"].replace("${key}", str(key))
            if isinstance(item, dict):
                cmd = re.sub(r"\$\{item\.(\w+)\}", lambda m: str(item[m[1]]), cmd)
            else:
                cmd = cmd.replace("${item}", str(item))
            out[name][key] = re.search(r"--sections (.*?) --", cmd)[1].split()
    return out


def config(params, cls, sections):
    cfg = from_mapping(cls, merged(params, sections), where=" + ".join(sections))
    if cls in (DetectionConfig, SegmentationConfig):
        check_config(cfg)
    return cfg


def effective_batch(params, cfg) -> int:
    return cfg.batch_size * cfg.accum_iter * params.get("launch.nproc_per_node")


def test_every_classification_row_is_a_finetuning_stage(params, stages):
    """Tables 2 and 5 and Figure 2: (size, dataset) pairs with a MixMIM row in the paper."""
    expected = {("base", "imagenet"), ("large", "imagenet"), ("huge", "imagenet")}  # Table 2, Figure 2
    columns = ("inat2018", "inat2019", "places205", "places365")
    for row in paper_csv("table5_cls_transfer"):
        if row["method"] == "MixMIM":
            size = {"MixMIM-B": "base", "MixMIM-L": "large"}[row["backbone"]]
            expected |= {(size, c) for c in columns if row[c]}
    runs = params.section("finetune.runs")
    assert {(r["size"], r["dataset"]) for r in runs.values()} == expected
    assert set(stages["finetune"]) == set(runs)
    assert set(stages["pretrain"]) == set(SIZES)
    table4 = {row["backbone"] for row in paper_csv("table4_coco_ade20k") if row["method"] == "MixMIM"}
    assert {SIZES[s][1] for s in params.get("dense_sizes")} == {b[-1] for b in table4}
    assert set(stages["coco"]) == set(stages["ade20k"]) == set(params.get("dense_sizes"))


def test_each_size_gets_its_own_table12_values(params, stages):
    drop_path = per_size(recipe("finetune_in1k", "drop_path"))
    epochs = per_size(recipe("finetune_in1k", "epochs"))
    assert drop_path == {"B": 0.1, "L": 0.2, "H": 0.3} and epochs == {"B": 100, "L": 50, "H": 50}
    runs = params.section("finetune.runs")
    for key, sections in stages["finetune"].items():
        model, letter = SIZES[runs[key]["size"]]
        cfg = config(params, FinetuneConfig, sections)
        assert (cfg.model, cfg.drop_path, cfg.epochs) == (model, drop_path[letter], epochs[letter]), key
        assert cfg.layer_decay == float(recipe("finetune_in1k", "layer_decay").split()[0])
        assert (cfg.base_lr, cfg.weight_decay, cfg.warmup_epochs) == (5e-4, 0.05, 5)
        assert (cfg.mixup, cfg.cutmix, cfg.label_smoothing, cfg.betas) == (0.8, 1.0, 0.1, (0.9, 0.999))
        assert effective_batch(params, cfg) == 1024
        assert cfg.precision == "bf16"


def test_each_size_pretrains_with_table11(params, stages):
    for key, sections in stages["pretrain"].items():
        cfg = config(params, PretrainConfig, sections)
        assert cfg.model == SIZES[key][0] and cfg.epochs == 600  # section 3's default; Tables 4, 5 print 600
        assert (cfg.base_lr, cfg.weight_decay, cfg.betas, cfg.warmup_epochs) == (1.5e-4, 0.05, (0.9, 0.95), 40)
        assert cfg.mask_ratio == 0.5 and effective_batch(params, cfg) == 1024


def test_dense_rows_use_each_sizes_section8_values(params, stages):
    coco_decay = per_size(recipe("coco", "layer_decay"))
    ade_decay = per_size(recipe("ade20k", "layer_decay"))
    coco_epochs = {"B": 55.0, "L": 80.0}
    assert "55 (B) / 80 (L)" in recipe("coco", "schedule")
    for key, sections in stages["coco"].items():
        cfg = config(params, DetectionConfig, sections)
        letter = SIZES[key][1]
        assert (cfg.model, cfg.layer_decay, cfg.epochs) == (SIZES[key][0], coco_decay[letter], coco_epochs[letter])
        assert cfg.img_size == 1024 and cfg.warmup_epochs == 0.25
    for key, sections in stages["ade20k"].items():
        cfg = config(params, SegmentationConfig, sections)
        assert (cfg.model, cfg.layer_decay) == (SIZES[key][0], ade_decay[SIZES[key][1]])
        assert (cfg.max_iters, cfg.batch_size) == (16000, 16)


def test_ablations_cover_tables_6_to_10_at_base_300_epochs(params, stages):
    cfgs = {key: config(params, PretrainConfig, sections) for key, sections in stages["ablation_pretrain"].items()}
    assert set(stages["ablation_finetune"]) == set(stages["ablation_ade20k"]) == set(cfgs)
    assert all(c.model == "mixmim_base" for c in cfgs.values())
    default = cfgs["default"]
    assert (default.epochs, default.fill, default.mask_type, default.mask_ratio) == (300, "mix", "random", 0.5)

    def present(**want) -> bool:
        return any(all(getattr(c, k) == v for k, v in want.items()) for c in cfgs.values())

    for row in paper_csv("table6_filling"):
        assert present(fill=row["fill"], epochs=300), row
    for row in paper_csv("table7_dual"):
        assert present(dual=None if row["dual"] == "true" else False, epochs=300) or row["dual"] == "true", row
    assert present(dual=False, epochs=300)
    for row in paper_csv("table8_masking"):
        assert present(mask_type=row["mask_type"], mask_ratio=float(row["mask_ratio"]),
                       range_mask_ratio=float(row["range_mask_ratio"]), epochs=300), row
    for row in paper_csv("table9_epochs"):
        assert present(epochs=int(row["pretrain_epochs"]), fill="mix", unmix=default.unmix, mask_type="random"), row
    unmix = {"none (w/o unmixing)": "none", "mix embedding": "mix_embedding", "masked self-attention": default.unmix}
    for row in paper_csv("table10_unmixing"):
        for column in ("top1_300ep", "top1_600ep", "top1_900ep"):
            assert present(unmix=unmix[row["approach"]], epochs=int(column[5:8]), fill="mix"), (row, column)
    for key, sections in stages["ablation_finetune"].items():
        ft = config(params, FinetuneConfig, sections)
        assert (ft.model, ft.epochs, ft.drop_path, ft.layer_decay) == ("mixmim_base", 100, 0.1, 0.7), key
    for key, sections in stages["ablation_ade20k"].items():
        seg = config(params, SegmentationConfig, sections)
        assert (seg.model, seg.layer_decay, seg.max_iters) == ("mixmim_base", 0.85, 16000), key


def test_other_encoders_cover_tables_3_and_13(params, stages):
    expected = {r["backbone"]: (int(r["pretrain_epochs"]), int(r["finetune_epochs"]))
                for r in paper_csv("table3_same_encoder") if r["method"] == "MixMIM"}
    expected |= {r["backbone"]: (300, 100) for r in paper_csv("table13_convnets") if r["method"] == "MixMIM"}
    found = {}
    for family, sections in stages["backbones_pretrain"].items():
        pre = config(params, PretrainConfig, sections)
        ft = config(params, FinetuneConfig, stages["backbones_finetune"][family])
        assert pre.model == ft.model and effective_batch(params, pre) == effective_batch(params, ft) == 1024
        assert (pre.img_size, ft.img_size) == (224, 224)
        found[BACKBONES[pre.model]] = (pre.epochs, ft.epochs)
    assert found == expected


def test_values_not_in_the_paper_are_listed_with_their_source(params):
    listed = params.section("not_in_paper")
    assert listed, "not_in_paper is empty"
    for dotted, source in listed.items():
        params.get(dotted)  # raises naming the key if the list points at nothing
        assert isinstance(source, str) and len(source) > 10, dotted
    text = (PAPER / "params.yaml").read_text()
    assert text.count("NOT IN PAPER") >= 10


def test_drop_path_of_the_shared_section_cannot_leak_into_large_sizes(params, stages):
    """Every finetuning of L or H states its own drop path (0.1 in finetune.common is B's)."""
    for size in ("large", "huge"):
        assert params.get(f"sizes.{size}.finetune.drop_path") == {"large": 0.2, "huge": 0.3}[size]
