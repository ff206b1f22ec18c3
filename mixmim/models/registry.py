"""Registered model sizes and the two builders everything else goes through.

The paper's sizes (section 2.2) plus two small ones for CPU work. A builder takes a
registered name with overrides, or the explicit arguments of the original
constructor (img_size, patch_size, embed_dim, depths, num_heads, window_size,
decoder_dim, decoder_depth, decoder_num_heads, mlp_ratio, norm_pix_loss, ...).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .classifier import MixMIMClassifier
from .pretrainer import MixMIMPretrainer


@dataclass(frozen=True)
class ModelSize:
    """Architecture of one registered size; ``drop_path_rate`` is the finetuning value."""

    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    window_size: tuple[int, ...] = (14, 14, 14, 7)
    img_size: int = 224
    patch_size: int = 4
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    drop_path_rate: float = 0.1
    notes: str = field(default="", compare=False)


MODEL_SIZES: dict[str, ModelSize] = {
    "mixmim_base": ModelSize(128, (2, 2, 18, 2), (4, 8, 16, 32), drop_path_rate=0.1, notes="MixMIM-B, paper"),
    "mixmim_large": ModelSize(192, (2, 2, 18, 2), (6, 12, 24, 48), drop_path_rate=0.2, notes="MixMIM-L, paper"),
    "mixmim_huge": ModelSize(352, (2, 2, 18, 2), (11, 22, 44, 88), drop_path_rate=0.3, notes="MixMIM-H, paper"),
    # Small sizes for CPU runs on the built-in data (64 px images, stride 32 -> a 2x2 mask grid).
    "mixmim_tiny": ModelSize(64, (1, 1, 3, 1), (2, 4, 8, 16), window_size=(8, 8, 4, 2), img_size=64,
                             decoder_dim=128, decoder_depth=2, decoder_num_heads=4, drop_path_rate=0.1,
                             notes="CPU size"),
    "mixmim_nano": ModelSize(32, (1, 1, 2, 1), (1, 2, 4, 8), window_size=(8, 8, 4, 2), img_size=64,
                             decoder_dim=64, decoder_depth=2, decoder_num_heads=4, drop_path_rate=0.0,
                             notes="CPU size; the architecture of the reference test model"),
    # The built-in pipeline's size: the mixing mechanism needs the paper's 7x7 mask grid, which
    # the stride-32 sizes only reach at 224 px. Patch 1 and an empty first stage (patch
    # embedding, then merging) give stride 8, so 56 px images have 7x7 = 49 cells of 8x8
    # pixels; windows of 7 divide every grid (28, 14, 7) and the last stage is global, as
    # in the paper. Differs from the paper's shape: patch 1 (paper 4), no blocks in stage 1,
    # C=24, depths 0-1-2-1, 56 px input (paper 224), a 2-block decoder of width 96.
    "mixmim_micro": ModelSize(24, (0, 1, 2, 1), (1, 2, 4, 8), window_size=(7, 7, 7, 7), img_size=56,
                              patch_size=1, decoder_dim=96, decoder_depth=2, decoder_num_heads=4,
                              drop_path_rate=0.0, notes="CPU size of the built-in pipeline; stride 8, 7x7 mask grid"),
}

_PRETRAIN_ONLY = ("decoder_dim", "decoder_depth", "decoder_num_heads")


def _resolve(name: str | None, overrides: dict[str, Any], keep_decoder: bool) -> dict[str, Any]:
    if name is None:
        return dict(overrides)
    if name not in MODEL_SIZES:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODEL_SIZES)}")
    kwargs = {k: v for k, v in asdict(MODEL_SIZES[name]).items() if k != "notes"}
    if not keep_decoder:
        for key in _PRETRAIN_ONLY:
            kwargs.pop(key)
    kwargs.update(overrides)
    return kwargs


def build_pretrainer(name: str | None = None, **kwargs: Any) -> MixMIMPretrainer:
    """``build_pretrainer("mixmim_base", fill="zero", dual=False)`` or ``build_pretrainer(embed_dim=..., ...)``.

    Pretraining uses no stochastic depth by default (the registry's drop path is the
    finetuning value); pass ``drop_path_rate`` to change that.
    """
    resolved = _resolve(name, kwargs, keep_decoder=True)
    if name is not None and "drop_path_rate" not in kwargs:
        resolved["drop_path_rate"] = 0.0
    return MixMIMPretrainer(**resolved)


def build_classifier(name: str | None = None, num_classes: int = 1000, **kwargs: Any) -> MixMIMClassifier:
    """``build_classifier("mixmim_base", num_classes=10)`` or with explicit encoder arguments."""
    resolved = _resolve(name, kwargs, keep_decoder=False)
    for key in _PRETRAIN_ONLY + ("norm_pix_loss",):
        resolved.pop(key, None)
    return MixMIMClassifier(num_classes=num_classes, **resolved)


# --------------------------------------------------------------------------- one factory
#: Input size of a timm encoder unless told otherwise (the engines, ``mixmim info``).
TIMM_DEFAULT_IMG_SIZE = 224
ROLES = ("classifier", "pretrainer")


def model_family(name: str) -> str:
    """``"mixmim"`` for a registered size, ``"timm"`` for a timm model name: the one place that
    decides which, so every caller refuses an unknown name with the same message."""
    if name in MODEL_SIZES:
        return "mixmim"
    import timm

    if isinstance(name, str) and timm.is_model(name):
        return "timm"
    raise ValueError(f"model={name!r} is neither a MixMIM size ({', '.join(sorted(MODEL_SIZES))}) "
                     "nor a timm model name")


def default_img_size(name: str) -> int:
    """The resolution a model trains at unless a config says otherwise."""
    return MODEL_SIZES[name].img_size if model_family(name) == "mixmim" else TIMM_DEFAULT_IMG_SIZE


def create_model(name: str, role: str = "classifier", **overrides: Any) -> Any:
    """A model by name, of either family, in either role.

    * ``"classifier"``: a MixMIM size's :class:`MixMIMClassifier` (``num_classes`` and
      encoder overrides), or the plain timm model (``timm.create_model`` arguments, with
      ``img_size`` where the model takes one);
    * ``"pretrainer"``: a MixMIM size's :class:`MixMIMPretrainer`, or MixMIM on the timm
      encoder (:func:`mixmim.models.adapters.build_adapter`).
    """
    if role not in ROLES:
        raise ValueError(f"role={role!r}; expected one of {ROLES}")
    family = model_family(name)
    if family == "mixmim":
        return build_classifier(name, **overrides) if role == "classifier" else build_pretrainer(name, **overrides)
    from .adapters import build_adapter, create_timm_model

    img_size = overrides.pop("img_size", None)
    if role == "pretrainer":
        return build_adapter(name, img_size=img_size or TIMM_DEFAULT_IMG_SIZE, **overrides)
    return create_timm_model(name, img_size, **overrides)[0]
