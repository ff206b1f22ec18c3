"""Representation probes on frozen encoder features: weighted k-NN and a linear classifier.

Both read pooled features (one vector per image) of a frozen encoder and say how much
class information the pretraining put there, without the noise of a finetuning run.

* :func:`knn_probe`: cosine similarity to every training feature, the ``k`` nearest
  neighbours vote for their class with weight ``exp(similarity / T)`` (the protocol of
  instance discrimination (Wu et al. 2018) and DINO: k = 20, T = 0.07).
* :func:`linear_probe`: a linear layer on standardised features (the mean and std of the
  training features, as the affine-free BatchNorm of MAE's linear probe), trained full
  batch with L-BFGS on the cross-entropy plus an L2 penalty.

Both return a :class:`ProbeResult` with the top-1 accuracy and every validation image's
prediction, so two probes on the same split can be compared image by image.
:func:`extract_features` and :func:`feature_fn` turn a model and a dataset into the
feature matrices; :class:`OnlineKNN` is the pretraining engine's per-epoch hook.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .engine.config import RuntimeConfig

FeatureFn = Callable[[Tensor], Tensor]


@dataclass
class ProbeResult:
    """Top-1 (percent) and the per-image predictions, labels and correctness (validation order)."""

    top1: float
    preds: np.ndarray
    labels: np.ndarray

    @property
    def correct(self) -> np.ndarray:
        return self.preds == self.labels

    @property
    def n(self) -> int:
        return int(self.labels.shape[0])


def _result(preds: Tensor, labels: Tensor) -> ProbeResult:
    p = preds.cpu().numpy().astype(np.int64)
    y = labels.cpu().numpy().astype(np.int64)
    return ProbeResult(float((p == y).mean() * 100.0), p, y)


def _check_features(name: str, feats: Tensor, labels: Tensor) -> None:
    if feats.ndim != 2:
        raise ValueError(f"{name} features of shape {tuple(feats.shape)}; expected (N, D)")
    if labels.ndim != 1 or labels.shape[0] != feats.shape[0]:
        raise ValueError(f"{name}: {feats.shape[0]} feature rows and labels of shape {tuple(labels.shape)}; "
                         "expected one label per row")
    if feats.shape[0] == 0:
        raise ValueError(f"{name}: no features; expected at least one image")
    if not torch.isfinite(feats).all():
        raise ValueError(f"{name} features hold NaN or inf values")


def knn_votes(train_feats: Tensor, train_labels: Tensor, query: Tensor, k: int = 20, temperature: float = 0.07,
              num_classes: int | None = None) -> Tensor:
    """Class scores (Q, num_classes): the sum of ``exp(cos / T)`` over the ``k`` most similar training items
    of each class. ``k`` larger than the training set uses every item."""
    if k < 1:
        raise ValueError(f"knn k={k}; expected a positive number of neighbours")
    if temperature <= 0:
        raise ValueError(f"knn temperature={temperature}; expected a positive temperature")
    num_classes = int(train_labels.max()) + 1 if num_classes is None else num_classes
    bank = F.normalize(train_feats.float(), dim=1)
    q = F.normalize(query.float(), dim=1)
    sims = q @ bank.T
    top, idx = sims.topk(min(k, bank.shape[0]), dim=1)
    weights = (top / temperature).exp()
    votes = torch.zeros(q.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
    return votes.scatter_add_(1, train_labels.to(weights.device)[idx], weights)


def knn_probe(train_feats: Tensor, train_labels: Tensor, val_feats: Tensor, val_labels: Tensor, k: int = 20,
              temperature: float = 0.07, num_classes: int | None = None, chunk: int = 1024) -> ProbeResult:
    """Weighted k-NN top-1 of the validation features against the training features."""
    _check_features("knn train", train_feats, train_labels)
    _check_features("knn val", val_feats, val_labels)
    if train_feats.shape[1] != val_feats.shape[1]:
        raise ValueError(f"train features of width {train_feats.shape[1]} and val features of width "
                         f"{val_feats.shape[1]}; expected the same encoder's features")
    if num_classes is None:
        num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    preds = torch.cat([knn_votes(train_feats, train_labels, val_feats[i:i + chunk], k, temperature,
                                 num_classes).argmax(dim=1) for i in range(0, val_feats.shape[0], chunk)])
    return _result(preds, val_labels)


def linear_probe(train_feats: Tensor, train_labels: Tensor, val_feats: Tensor, val_labels: Tensor,
                 num_classes: int | None = None, steps: int = 300, weight_decay: float = 1e-3,
                 seed: int = 0) -> ProbeResult:
    """Train ``nn.Linear`` on standardised training features (full batch, L-BFGS, ``steps`` iterations,
    loss = cross-entropy + weight_decay * ||W||^2) and score the validation features."""
    _check_features("linear train", train_feats, train_labels)
    _check_features("linear val", val_feats, val_labels)
    if steps < 1:
        raise ValueError(f"linear probe steps={steps}; expected at least 1")
    if weight_decay < 0:
        raise ValueError(f"linear probe weight_decay={weight_decay}; expected >= 0")
    if num_classes is None:
        num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    x = train_feats.double()
    mean, std = x.mean(dim=0), x.std(dim=0, unbiased=False).clamp(min=1e-6)
    x = (x - mean) / std
    y = train_labels.long()
    gen = torch.Generator().manual_seed(seed)
    head = nn.Linear(x.shape[1], num_classes).double()
    with torch.no_grad():
        head.weight.normal_(0.0, 0.01, generator=gen)
        head.bias.zero_()
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=steps, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(head(x), y) + weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        preds = head((val_feats.double() - mean) / std).argmax(dim=1)
    return _result(preds, val_labels)


# --------------------------------------------------------------------------- features
def feature_fn(model: nn.Module) -> FeatureFn:
    """Images (B, 3, H, W) -> pooled features (B, C) of the frozen encoder inside ``model``.

    A MixMIM classifier or pretrainer: the encoder's final-norm tokens averaged (the
    classifier's ``forward_features``); a timm MixMIM adapter: its unmixed encoder output
    averaged; a plain timm model: ``forward_head(..., pre_logits=True)``.
    """
    from .models.encoder import MixMIMEncoder

    encoder = getattr(model, "encoder", None)
    if isinstance(encoder, MixMIMEncoder):
        return lambda imgs: encoder(imgs).mean(dim=1)
    if hasattr(model, "encode") and hasattr(model, "mask_grid"):  # a timm adapter (pretraining form)
        return lambda imgs: model.encode(imgs, None).mean(dim=1)
    if hasattr(model, "forward_head") and hasattr(model, "forward_features"):
        return lambda imgs: model.forward_head(model.forward_features(imgs), pre_logits=True)
    raise ValueError(f"{type(model).__name__}: no frozen-feature path; expected a MixMIM classifier or "
                     "pretrainer, a timm MixMIM adapter or a timm classifier")


def eval_transform(img_size: int, crop_pct: float = 0.875) -> Any:
    """Resize, centre crop and normalise: the finetuning evaluation transform, no augmentation."""
    from .engine.loaders import finetune_transform

    return finetune_transform(img_size, False, None, 0.0, crop_pct)


def subset_indices(n: int, limit: int | None, seed: int = 0) -> list[int]:
    """All of ``range(n)``, or a seeded random ``limit`` of them in increasing order."""
    if limit is None or limit >= n:
        return list(range(n))
    if limit < 1:
        raise ValueError(f"subset of {limit} images; expected a positive count or None")
    return sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit].tolist())


def _image_label(items: list[Any]) -> tuple[Tensor, Tensor]:
    return torch.stack([it[0] for it in items]), torch.tensor([int(it[1]) for it in items], dtype=torch.long)


@torch.no_grad()
def extract_features(fn: FeatureFn, dataset: Any, batch_size: int = 64, device: torch.device | str = "cpu",
                     indices: Sequence[int] | None = None, num_workers: int = 0) -> tuple[Tensor, Tensor]:
    """Features (N, C) and labels (N,) of ``dataset`` items (``(image, label, ...)``) in order, in eval
    mode; ``num_workers`` loader processes decode the images (a real dataset's train split is large)."""
    from torch.utils.data import DataLoader, Subset

    indices = list(range(len(dataset))) if indices is None else list(indices)
    if not indices:
        raise ValueError("no images to extract features from; the dataset is empty")
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=_image_label)
    feats, labels = [], []
    for imgs, batch_labels in loader:
        feats.append(fn(imgs.to(device)).float().cpu())
        labels.append(batch_labels)
    return torch.cat(feats), torch.cat(labels)


@dataclass
class OnlineKNN:
    """The pretraining engine's evaluation hook: k-NN top-1 every ``every`` epochs.

    ``train_set`` and ``val_set`` are a labelled dataset's splits (the pretraining dataset's
    or ``knn_dataset``'s) with an evaluation transform; their labels are used here only,
    never by the pretraining loss. Called
    with the model and the 1-based epoch number; returns ``{"knn_top1": ...}`` on the
    epochs it runs (a multiple of ``every`` or the last one) and ``{}`` otherwise.
    """

    train_set: Any
    val_set: Any
    every: int
    epochs: int
    k: int = 20
    temperature: float = 0.07
    batch_size: int = 64
    device: torch.device | str = "cpu"
    max_train: int | None = None
    seed: int = 0
    num_workers: int = 0
    train_indices: list[int] = field(init=False)

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"knn_every={self.every}; expected a positive number of epochs (0 turns the hook off)")
        self.train_indices = subset_indices(len(self.train_set), self.max_train, self.seed)

    def due(self, epoch: int) -> bool:
        return epoch % self.every == 0 or epoch == self.epochs

    def __call__(self, model: nn.Module, epoch: int) -> dict[str, float]:
        if not self.due(epoch):
            return {}
        was_training = model.training
        model.eval()
        try:
            fn = feature_fn(model)
            xtr, ytr = extract_features(fn, self.train_set, self.batch_size, self.device, self.train_indices,
                                        self.num_workers)
            xva, yva = extract_features(fn, self.val_set, self.batch_size, self.device, num_workers=self.num_workers)
        finally:
            model.train(was_training)
        return {"knn_top1": knn_probe(xtr, ytr, xva, yva, self.k, self.temperature).top1}


# --------------------------------------------------------------------------- the probe stage
@dataclass
class ProbeConfig(RuntimeConfig):
    """k-NN and linear probe of one encoder (``init``: a checkpoint, or None for a random-init control)."""

    model: str | None = None  # None: the architecture of arch_from (default: init), a pretraining checkpoint
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    img_size: int | None = None
    init: str | None = None
    arch_from: str | None = None  # checkpoint whose saved config gives model/model_kwargs/img_size (not weights)
    dataset: str = "imagenet"
    data_root: str = ""
    class_list: str | None = None  # file of ImageNet class folders to read (e.g. ImageNet-100); default: all
    crop_pct: float = 0.875
    batch_size: int = 64
    max_train: int | None = None  # cap on the training features (a seeded subset); None: the whole split
    knn_k: int = 20
    knn_temperature: float = 0.07
    linear_steps: int = 300
    linear_weight_decay: float = 1e-3


def resolve_architecture(cfg: ProbeConfig) -> ProbeConfig:
    """``cfg`` with ``model``/``model_kwargs``/``img_size`` taken from the pretraining config saved in
    ``arch_from`` (default: ``init``) when ``model`` is not set, so a random-init control is built
    exactly like the pretrained encoder it controls. Decoder arguments are dropped."""
    import dataclasses

    from .checkpoint import load_file

    if cfg.model is not None:
        return cfg
    source = cfg.arch_from or cfg.init
    if source is None:
        raise ValueError("probe: no model given and no checkpoint to take the architecture from; set model, "
                         "or arch_from / init to a pretraining checkpoint of this suite")
    saved = load_file(source)
    config = saved.get("config") if isinstance(saved, dict) else None
    if not isinstance(config, dict) or not config.get("model"):
        raise ValueError(f"probe: {source} holds no saved training config with a model name; set model explicitly")
    kwargs = {k: v for k, v in (config.get("model_kwargs") or {}).items() if not k.startswith("decoder_")}
    return dataclasses.replace(cfg, model=config["model"], model_kwargs={**kwargs, **cfg.model_kwargs},
                               img_size=cfg.img_size if cfg.img_size is not None else config.get("img_size"))


def probe_model(cfg: ProbeConfig) -> nn.Module:
    """The encoder to probe, built as the finetuning engine builds a classifier (same checkpoint
    loading: this suite's pretraining, an original release or a timm model's weights; checkpoints
    are read with ``weights_only=True``), from ``init`` or randomly initialised under ``seed``."""
    from .engine.config import FinetuneConfig
    from .engine.engine_finetune import build_model
    from .engine.runner import seed_everything

    ft = FinetuneConfig(model=cfg.model, model_kwargs=dict(cfg.model_kwargs), img_size=cfg.img_size, init=cfg.init,
                        dataset=cfg.dataset, drop_path=0.0)
    seed_everything(cfg.seed)
    return build_model(ft, num_classes=1).eval()  # the head is never used


def run_probe(cfg: ProbeConfig) -> dict[str, Any]:
    """Features of the train and val splits, k-NN and linear probe; one MLflow run with the results."""
    from .engine.config import FinetuneConfig
    from .engine.loaders import classification_split
    from .engine.engine_finetune import input_size
    from .engine.runner import engine_run, init_tags

    if cfg.batch_size < 1:
        raise ValueError(f"batch_size={cfg.batch_size}; expected a positive batch size")
    cfg = resolve_architecture(cfg)
    with engine_run(cfg, distributed=False, outputs=False) as run:  # one process; nothing written but MLflow
        device = run.info.device
        model = probe_model(cfg).to(device)
        size = input_size(FinetuneConfig(model=cfg.model, model_kwargs=dict(cfg.model_kwargs), img_size=cfg.img_size))
        tf = eval_transform(size, cfg.crop_pct)
        train = classification_split(cfg.dataset, cfg.data_root, "train", tf, cfg.skip_bad_images, cfg.class_list)
        val = classification_split(cfg.dataset, cfg.data_root, "val", tf, cfg.skip_bad_images, cfg.class_list)
        fn = feature_fn(model)
        xtr, ytr = extract_features(fn, train, cfg.batch_size, device,
                                    subset_indices(len(train), cfg.max_train, cfg.seed), cfg.num_workers)
        xva, yva = extract_features(fn, val, cfg.batch_size, device, num_workers=cfg.num_workers)
        num_classes = int(max(ytr.max(), yva.max())) + 1
        knn = knn_probe(xtr, ytr, xva, yva, cfg.knn_k, cfg.knn_temperature, num_classes)
        lin = linear_probe(xtr, ytr, xva, yva, num_classes, cfg.linear_steps, cfg.linear_weight_decay, cfg.seed)

        result = {"knn_top1": knn.top1, "linear_top1": lin.top1, "n_val": knn.n, "n_train": int(ytr.shape[0]),
                  "feature_dim": int(xtr.shape[1]), "num_classes": num_classes}
        tags = {**init_tags(cfg, "probe", cfg.dataset), "mixmim.init": cfg.init or "random"}
        with run.tracking(f"probe/{cfg.dataset}", tags, {"img_size": size}) as tracker:
            tracker.log_metrics({f"final/{k}": v for k, v in result.items()}, step=0)
    return {**result, "knn": knn, "linear": lin, "run_id": tracker.run_id, "model": cfg.model}


def probe_records_paths(metrics_path: str | Any) -> dict[str, Any]:
    """``metrics/probe_x.json`` -> ``{"knn": metrics/probe_x_knn_preds.json, "linear": ..._linear_preds.json}``."""
    from pathlib import Path

    from .records import RECORDS_SUFFIX

    path = Path(metrics_path)
    return {name: path.with_name(f"{path.stem}_{name}{RECORDS_SUFFIX}.json") for name in ("knn", "linear")}


def probe_stage(params: Any, sections: Sequence[str], variant: str, dataset: str, init: str | None,
                metrics_path: str, seed: int | None = None, run_dir: str | None = None,
                arch_from: str | None = None) -> dict[str, Any]:
    """DVC stage: probe the encoder of ``init`` (None: random initialisation, the control, built like
    ``arch_from``) on ``dataset`` and write the metrics JSON and the two per-image records files beside
    it (all atomically)."""
    from .pipeline import is_main_process, stage_config, write_metrics
    from .records import write_classification_records

    owned = {"dataset": dataset, "init": params.resolve_path(init) if init else None,
             "arch_from": params.resolve_path(arch_from) if arch_from else None}
    cfg = stage_config(ProbeConfig, params, sections, "probe", variant, dataset,
                       run_dir or f"runs/probe/{variant}", seed, owned)
    result = run_probe(cfg)
    if not is_main_process():
        return result
    for name, path in probe_records_paths(metrics_path).items():
        write_classification_records(path, result[name].labels.tolist(), result[name].preds.tolist())
    keys = ("knn_top1", "linear_top1", "n_val", "n_train", "feature_dim", "num_classes", "run_id")
    write_metrics(metrics_path, {**{k: result[k] for k in keys}, "dataset": dataset,
                                 "init": "pretrained" if init else "random", "model": result["model"], "seed": cfg.seed,
                                 "knn_k": cfg.knn_k, "knn_temperature": cfg.knn_temperature})
    return result


__all__ = [
    "OnlineKNN", "ProbeConfig", "ProbeResult", "eval_transform", "extract_features", "feature_fn", "knn_probe",
    "knn_votes", "linear_probe", "probe_model", "probe_records_paths", "probe_stage", "resolve_architecture",
    "run_probe", "subset_indices",
]
