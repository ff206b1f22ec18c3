"""MixMIM pretraining (Table 11) on one process or many, from the command line or Python."""

from __future__ import annotations

from typing import Any

import torch

from ..models import build_pretrainer
from ..models.registry import TIMM_DEFAULT_IMG_SIZE, model_family
from .config import PretrainConfig
from .loaders import classification_split, pretrain_transform
from .optim import build_adamw, build_cosine_schedule, scaled_lr
from .runner import RUN_REF  # noqa: F401  (re-exported: the run reference's file name)
from .runner import build_loop, engine_run, save_final, train_data, wrap_model

PRETRAIN_WEIGHTS = "pretrain.pt"
BASELINE_IMAGES = 2048  # training images (a seeded subset when there are more) behind mean_loss_baseline


#: ``unmix`` -> the timm adapters' group restriction (issue 6); other values have no adapter form.
TIMM_UNMIX = {"masked_attention": True, "none": False}


def build_model(cfg: PretrainConfig) -> torch.nn.Module:
    """The registered MixMIM size ``cfg.model``, or MixMIM on the timm encoder of that name."""
    if model_family(cfg.model) == "timm":
        return build_timm_adapter(cfg)
    kwargs: dict[str, Any] = dict(
        mask_ratio=cfg.mask_ratio, range_mask_ratio=cfg.range_mask_ratio, mask_type=cfg.mask_type,
        fill=cfg.fill, dual=cfg.dual, unmix=cfg.unmix, norm_pix_loss=cfg.norm_pix_loss,
        use_checkpoint=cfg.grad_checkpointing,
    )
    if cfg.img_size is not None:
        kwargs["img_size"] = cfg.img_size
    return build_pretrainer(cfg.model, **{**kwargs, **cfg.model_kwargs})


def build_timm_adapter(cfg: PretrainConfig) -> torch.nn.Module:
    """``build_adapter(cfg.model, ...)``: the MixMIM options map onto the adapter's, ``model_kwargs``
    go to the adapter (decoder_*) and to ``timm.create_model``. The encoder is built without a
    classifier (``num_classes=0``) unless ``model_kwargs`` says otherwise: pretraining never
    uses it, and unused parameters would stall DDP."""
    from ..models.adapters import build_adapter

    unmix = cfg.unmix or "masked_attention"
    if unmix not in TIMM_UNMIX:
        raise ValueError(f"unmix={cfg.unmix!r} is not supported for the timm encoder {cfg.model}: its adapter "
                         f"either restricts attention to each image's own group or not; expected one of "
                         f"{sorted(TIMM_UNMIX)}")
    if cfg.fill != "mix":
        raise ValueError(f"fill={cfg.fill!r} is not supported for the timm encoder {cfg.model}: its adapter fills "
                         "an image's masked cells with the other image only; expected fill='mix'")
    kwargs: dict[str, Any] = dict(
        mask_ratio=cfg.mask_ratio, range_mask_ratio=cfg.range_mask_ratio, mask_type=cfg.mask_type,
        dual=True if cfg.dual is None else cfg.dual, norm_pix_loss=cfg.norm_pix_loss,
        restrict=TIMM_UNMIX[unmix], num_classes=0,
    )
    kwargs.update(cfg.model_kwargs)
    img_size = kwargs.pop("img_size", cfg.img_size) or TIMM_DEFAULT_IMG_SIZE
    model = build_adapter(cfg.model, img_size=img_size, **kwargs)
    if cfg.grad_checkpointing:
        if not model.checkpoint_safe:
            raise ValueError(f"grad_checkpointing=true is not supported for the timm encoder {cfg.model} "
                             f"({model.family} adapter): timm's checkpointing would recompute its blocks without "
                             "the group restriction")
        model.encoder.set_grad_checkpointing(True)
    return model


@torch.no_grad()
def mean_loss_baseline(dataset: Any, cell: int, norm_pix: bool, limit: int = BASELINE_IMAGES, seed: int = 0,
                       batch_size: int = 64) -> float:
    """The predict-the-mean loss (:func:`~mixmim.models.pretrainer.mean_colour_loss`) averaged over
    training images as the pretraining sees them (``dataset`` items are ``(image, ...)``)."""
    from ..models.pretrainer import mean_colour_loss
    from ..probes import subset_indices

    indices = subset_indices(len(dataset), limit, seed)
    total = 0.0
    for start in range(0, len(indices), batch_size):
        imgs = torch.stack([dataset[i][0] for i in indices[start:start + batch_size]])
        total += float(mean_colour_loss(imgs, cell, norm_pix).sum())
    return total / len(indices)


def online_knn(cfg: PretrainConfig, img_size: int, device: torch.device) -> Any:
    """The k-NN hook (:class:`mixmim.probes.OnlineKNN`) on the train/val splits of ``knn_dataset`` (default:
    the pretraining dataset), or None when ``knn_every`` is 0."""
    if cfg.knn_every < 0:
        raise ValueError(f"knn_every={cfg.knn_every}; expected 0 (off) or a positive number of epochs")
    if cfg.knn_every == 0:
        return None
    from ..probes import OnlineKNN, eval_transform

    tf = eval_transform(img_size)
    if cfg.knn_dataset and not cfg.knn_data_root:
        raise ValueError(f"knn_dataset={cfg.knn_dataset!r} without knn_data_root; expected the root of that "
                         "labelled dataset (a pipeline stage fills it from roots)")
    name, root = cfg.knn_dataset or cfg.dataset, cfg.knn_data_root or cfg.data_root
    # The pretraining images' class list (ImageNet-100 at mid scale) selects the k-NN's classes too, so the
    # probe reads the classes pretraining saw; another labelled dataset is read whole.
    classes = cfg.class_list if name == cfg.dataset and root == cfg.data_root else None
    return OnlineKNN(classification_split(name, root, "train", tf, cfg.skip_bad_images, classes),
                     classification_split(name, root, "val", tf, cfg.skip_bad_images, classes),
                     cfg.knn_every, cfg.epochs, cfg.knn_k, cfg.knn_temperature, cfg.batch_size, device,
                     cfg.knn_max_train, cfg.seed, cfg.num_workers)


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Run (or resume) a pretraining; returns the epoch history and the run id."""
    with engine_run(cfg) as run:
        info, out = run.info, run.out
        model = run.build(lambda: build_model(cfg))
        img_size = (getattr(model, "img_size", None) or model.encoder.img_size)[0]  # a timm adapter's, or MixMIM's
        dataset = classification_split(cfg.dataset, cfg.data_root, "train",
                                       pretrain_transform(img_size, cfg.crop_scale), cfg.skip_bad_images,
                                       cfg.class_list)
        data = train_data(dataset, cfg, cfg.batch_size, info)
        effective_batch = cfg.batch_size * cfg.accum_iter * info.world_size
        lr = cfg.lr if cfg.lr is not None else scaled_lr(cfg.base_lr, effective_batch)
        optimizer = build_adamw(model, lr, cfg.weight_decay, cfg.betas, kernel=cfg.adamw_kernel)
        total_steps = data.steps_per_epoch * cfg.epochs
        scheduler = build_cosine_schedule(optimizer, total_steps, round(cfg.warmup_epochs * data.steps_per_epoch),
                                          cfg.min_lr)
        train_model = wrap_model(model, cfg, info)

        def loss_fn(m: torch.nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
            return m(batch[0]).loss  # labels are not used

        knn = online_knn(cfg, img_size, info.device)

        def evaluate(m: torch.nn.Module) -> dict[str, float]:
            # labels only here, for the k-NN probe; the epoch is the one the loop is closing
            return knn(m, len(loop.history) + 1) if info.is_main else {}

        tags = {"mixmim.stage": "pretrain", "mixmim.model": cfg.model, "mixmim.dataset": cfg.dataset}
        derived = {"lr": lr, "effective_batch": effective_batch, "world_size": info.world_size,
                   "steps_per_epoch": data.steps_per_epoch, "total_steps": total_steps, "train_images": len(dataset)}
        with run.tracking("pretrain", tags, derived) as tracker:
            loop = build_loop(cfg, model=model, train_model=train_model, optimizer=optimizer, scheduler=scheduler,
                              data=data, info=info, out=out, tracker=tracker, loss_fn=loss_fn, epochs=cfg.epochs,
                              evaluate=evaluate if knn is not None else None)
            history = loop.run()
            extra: dict[str, Any] = {"mask_cells": int(model.num_cells)}
            if info.is_main:
                extra["mean_loss_baseline"] = mean_loss_baseline(data.dataset, model.stride, cfg.norm_pix_loss,
                                                                 seed=cfg.seed)
                tracker.log_metrics({f"final/{k}": v for k, v in extra.items()},
                                    step=history[-1]["step"] if history else 0)
                save_final(model, cfg, out / PRETRAIN_WEIGHTS, "mixmim_pretrain", tracker, info)
                if history:
                    tracker.log_metrics({"final/train_loss": history[-1]["train_loss"]}, step=history[-1]["step"])
            return {"history": history, "run_id": tracker.run_id, "weights": str(out / PRETRAIN_WEIGHTS), **extra}
