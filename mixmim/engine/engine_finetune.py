"""Classification finetuning (Table 12) and linear probing, with per-epoch evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from ..checkpoint import (
    adapt_rel_pos_tables, convert_reference_state_dict, encoder_state_dict, load_checked, load_file, unwrap_state_dict,
)
from ..models import MODEL_SIZES, MixMIMClassifier, build_classifier
from ..models.registry import default_img_size, model_family
from ..models.adapters import create_timm_model
from .config import ConfigError, FinetuneConfig
from .loaders import (
    SeededDataset, ShardSampler, classification_split, finetune_transform, linear_probe_transform, make_loader,
)
from .distributed import DistInfo, all_reduce_sum
from .loop import autocast_dtype
from .optim import build_adamw, build_cosine_schedule, scaled_lr
from .runner import (
    build_loop, close_last_epoch, engine_run, init_tags, periodic, save_final, train_data, wrap_model,
)

FINETUNE_WEIGHTS = "finetune.pt"


def classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Name prefixes of a timm model's classifier head (``head.``, ``head.fc.``, ``fc.``, ...),
    from its pretrained config and its ``get_classifier()`` module."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    names = [names] if isinstance(names, str) else list(names)
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    names += [n for n, m in model.named_modules() if n and head is not None and m is head]
    return tuple(dict.fromkeys(f"{n}." for n in names))


def load_timm_init(model: nn.Module, path: str | Path) -> None:
    """Initialise a plain timm model from a MixMIM adapter pretraining (its ``encoder.*`` weights,
    prefix stripped; the decoder is dropped) or from a checkpoint of the timm model itself.
    Every parameter must match by name and shape except the classifier head, which keeps its
    fresh initialisation."""
    sd = dict(unwrap_state_dict(load_file(path)))
    if any(k.startswith("encoder.") for k in sd):
        sd = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    heads = classifier_prefixes(model)
    load_checked(model, {k: v for k, v in sd.items() if not k.startswith(heads)}, allow_missing=heads)


def load_encoder_init(model: nn.Module, path: str | Path) -> None:
    """Initialise the encoder from this suite's pretraining (or finetuning) checkpoint or an
    original MixMIM release; relative position tables are resized when windows differ.
    A timm model (a non-MixMIM ``model``) is initialised by :func:`load_timm_init`."""
    if not isinstance(model, MixMIMClassifier):
        load_timm_init(model, path)
        return
    sd = dict(unwrap_state_dict(load_file(path)))
    if not any(k.startswith("encoder.") for k in sd):
        sd = convert_reference_state_dict(sd)  # original key names
    enc = adapt_rel_pos_tables(encoder_state_dict(sd), model)
    load_checked(model, enc, allow_missing=("head.",))


def input_size(cfg: FinetuneConfig) -> int:
    """The resolution the run trains at: explicit, else the registered size's (224 for a timm name,
    as in pretraining)."""
    size = cfg.img_size or cfg.model_kwargs.get("img_size")
    return int(size if size is not None else default_img_size(cfg.model))


def build_timm_classifier(cfg: FinetuneConfig, num_classes: int) -> nn.Module:
    """``timm.create_model(cfg.model, num_classes=..., drop_path_rate=..., **model_kwargs)``, with
    ``img_size`` where the family takes it (ViT, Swin); ``init`` loads its encoder weights."""
    if cfg.linear_probe:
        raise ValueError(f"linear_probe=true is not supported for the timm encoder {cfg.model}; "
                         "linear probing is implemented for MixMIM sizes only")
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    if cfg.drop_path is not None:
        kwargs["drop_path_rate"] = cfg.drop_path
    kwargs.update({k: v for k, v in cfg.model_kwargs.items() if k != "img_size"})
    model, _ = create_timm_model(cfg.model, img_size=input_size(cfg), **kwargs)
    if cfg.init:
        load_timm_init(model, cfg.init)
    return model


def build_model(cfg: FinetuneConfig, num_classes: int) -> nn.Module:
    """The registered MixMIM size ``cfg.model`` as a classifier, or the plain timm model of that name."""
    if model_family(cfg.model) == "timm":
        return build_timm_classifier(cfg, num_classes)
    kwargs: dict[str, Any] = {"img_size": input_size(cfg)}
    if cfg.drop_path is not None:
        kwargs["drop_path_rate"] = cfg.drop_path
    else:
        kwargs["drop_path_rate"] = MODEL_SIZES[cfg.model].drop_path_rate
    model = build_classifier(cfg.model, num_classes=num_classes, **{**kwargs, **cfg.model_kwargs})
    if cfg.init:
        load_encoder_init(model, cfg.init)
    if cfg.linear_probe:
        model.to_linear_probe()
    return model


@torch.no_grad()
def evaluate(model: nn.Module, loader: torch.utils.data.DataLoader, info: DistInfo, precision: str,
             records: bool = False) -> dict[str, Any]:
    """Top-1, top-5 (top-k for fewer classes) and cross-entropy on the validation split, over all ranks.

    With ``records`` the result also holds ``val_labels`` and ``val_preds``: every validation
    image's label and top-1 prediction in validation-set order (gathered from all ranks; the
    loader's sampler must list each rank's indices, as :class:`ShardSampler` does).
    """
    was_training = model.training
    model.eval()
    dtype = autocast_dtype(precision, info.device)
    sums = torch.zeros(4, dtype=torch.float64)  # correct@1, correct@5, loss sum, count
    order = list(loader.sampler) if records else []
    rank_labels: list[torch.Tensor] = []
    rank_preds: list[torch.Tensor] = []
    for imgs, labels, _ in loader:
        imgs, labels = imgs.to(info.device), labels.to(info.device)
        with torch.autocast(info.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(imgs)
        logits = logits.float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top.eq(labels[:, None])
        if records:
            rank_labels.append(labels.cpu())
            rank_preds.append(top[:, 0].cpu())
        sums += torch.tensor([hit[:, 0].sum().item(), hit.any(1).sum().item(),
                              nn.functional.cross_entropy(logits, labels, reduction="sum").item(), len(labels)],
                             dtype=torch.float64)
    total = all_reduce_sum(sums, info).cpu()
    model.train(was_training)
    n = max(total[3].item(), 1.0)
    result: dict[str, Any] = {"val_top1": 100.0 * total[0].item() / n, "val_top5": 100.0 * total[1].item() / n,
                              "val_loss": total[2].item() / n}
    if records:
        # each rank fills its own indices (value + 1; 0 = another rank's), summed over ranks
        size = len(loader.dataset)  # type: ignore[arg-type]
        table = torch.zeros(2, size, dtype=torch.int64)
        index = torch.tensor(order, dtype=torch.int64)
        if rank_labels:
            table[0, index] = torch.cat(rank_labels).to(torch.int64) + 1
            table[1, index] = torch.cat(rank_preds).to(torch.int64) + 1
        table = all_reduce_sum(table, info).cpu() - 1
        result.update(val_labels=table[0].tolist(), val_preds=table[1].tolist())
    return result


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Run (or resume) a finetuning; returns the history, final and best accuracy, the run id."""
    if cfg.eval_every < 0:
        raise ConfigError(f"eval_every={cfg.eval_every}: expected 0 (final evaluation only) or a number of epochs")
    with engine_run(cfg) as run:
        info, out = run.info, run.out
        probe = cfg.linear_probe
        img_size = input_size(cfg)
        train_tf = linear_probe_transform(img_size) if probe else finetune_transform(
            img_size, True, cfg.randaug, cfg.reprob, cfg.crop_pct)
        train_set = classification_split(cfg.dataset, cfg.data_root, "train", train_tf, cfg.skip_bad_images,
                                         cfg.class_list)
        val_set = classification_split(cfg.dataset, cfg.data_root, "val",
                                       finetune_transform(img_size, False, None, 0.0, cfg.crop_pct),
                                       cfg.skip_bad_images, cfg.class_list)
        num_classes = train_set.num_classes
        model = run.build(lambda: build_model(cfg, num_classes))
        data = train_data(train_set, cfg, cfg.batch_size, info)
        val_loader = make_loader(SeededDataset(val_set, cfg.seed), ShardSampler(len(val_set), info.rank, info.world_size),
                                 cfg.eval_batch_size or cfg.batch_size, cfg.num_workers,
                                 info.device.type == "cuda", drop_last=False)

        effective_batch = cfg.batch_size * cfg.accum_iter * info.world_size
        lr = cfg.lr if cfg.lr is not None else scaled_lr(cfg.base_lr, effective_batch)
        optimizer = build_adamw(model, lr, cfg.weight_decay, cfg.betas, layer_decay=None if probe else cfg.layer_decay,
                                kernel=cfg.adamw_kernel)
        total_steps = data.steps_per_epoch * cfg.epochs
        scheduler = build_cosine_schedule(optimizer, total_steps, round(cfg.warmup_epochs * data.steps_per_epoch),
                                          cfg.min_lr)
        train_model = wrap_model(model, cfg, info)

        mixup = None
        if not probe and (cfg.mixup > 0 or cfg.cutmix > 0):
            if cfg.batch_size % 2:
                raise ValueError(f"batch_size={cfg.batch_size}: mixup/cutmix pair samples and need an even batch")
            mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                          num_classes=num_classes)
            criterion: nn.Module = SoftTargetCrossEntropy()
        elif cfg.label_smoothing > 0 and not probe:
            criterion = LabelSmoothingCrossEntropy(cfg.label_smoothing)
        else:
            criterion = nn.CrossEntropyLoss()

        def loss_fn(m: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
            imgs, labels = batch
            if mixup is not None:
                imgs, targets = mixup(imgs, labels)
                return criterion(m(imgs), targets)
            return criterion(m(imgs), labels)

        stage = "linear_probe" if probe else "finetune"
        tags = init_tags(cfg, stage, cfg.dataset)
        periodic_evaluate = periodic(lambda m: evaluate(m, val_loader, info, cfg.precision), cfg.eval_every,
                                     cfg.epochs, lambda: loop)

        derived = {"lr": lr, "effective_batch": effective_batch, "world_size": info.world_size,
                   "steps_per_epoch": data.steps_per_epoch, "total_steps": total_steps, "num_classes": num_classes,
                   "train_images": len(train_set), "val_images": len(val_set)}
        with run.tracking(f"{stage}/{cfg.dataset}", tags, derived) as tracker:
            loop = build_loop(cfg, model=model, train_model=train_model, optimizer=optimizer, scheduler=scheduler,
                              data=data, info=info, out=out, tracker=tracker, loss_fn=loss_fn, epochs=cfg.epochs,
                              evaluate=periodic_evaluate)
            history = loop.run()
            final = evaluate(model, val_loader, info, cfg.precision, records=True)
            result = {"top1": final["val_top1"], "top5": final["val_top5"], "val_loss": final["val_loss"],
                      "best_top1": max([h["val_top1"] for h in history if "val_top1" in h] + [final["val_top1"]])}
            close_last_epoch(history, {k: final[k] for k in ("val_top1", "val_top5", "val_loss")}, tracker)
            tracker.log_metrics({f"final/{k}": v for k, v in result.items()}, step=history[-1]["step"] if history else 0)
            save_final(model, cfg, out / FINETUNE_WEIGHTS, f"mixmim_{stage}", tracker, info)
            # the reported epoch is the last one; its per-image records back the report's intervals
            return {"history": history, **result, "run_id": tracker.run_id, "n_val": len(val_set),
                    "val_labels": final["val_labels"], "val_preds": final["val_preds"]}
