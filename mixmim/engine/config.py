"""Run configurations of the training engines, checked before any work starts.

A config is a dataclass; ``from_mapping`` builds one from a params.yaml section or a
YAML file and refuses an unknown key, a value of the wrong type or a missing required
value with a message naming the key and what was expected, so that a typo fails the
run at once rather than silently falling back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")

#: PyTorch's AdamW implementations a run may choose; ``mixmim.engine.optim.ADAMW_KERNELS`` says what each does.
AdamWKernel = Literal["default", "fused"]


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


# --------------------------------------------------------------------------- #
@dataclass
class RuntimeConfig:
    """Fields shared by every engine: devices, precision, checkpoints, tracking."""

    output_dir: str = "outputs/run"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16: CUDA only, with a gradient scaler)
    channels_last: bool = False
    compile: bool = False
    num_workers: int = 2
    log_every_steps: int = 10
    ckpt_every_steps: int = 0  # 0: checkpoint at the end of every epoch only
    resume: bool = True  # continue from output_dir/checkpoint-last.pt when it exists
    clip_grad: float | None = None
    accum_iter: int = 1
    max_steps_per_epoch: int | None = None  # cap an epoch (short CPU budgets)
    skip_bad_images: bool = False
    tracking_uri: str | None = None  # default: sqlite:///<cwd>/mlflow.db
    experiment: str = "mixmim"
    run_name: str | None = None
    parent_run_id: str | None = None  # MLflow parent (a pipeline invocation's run)
    tags: dict[str, str] = field(default_factory=dict)
    progress: bool = True


@dataclass
class PretrainConfig(RuntimeConfig):
    """Pretraining (Table 11); every ablation switch of the model is here too."""

    model: str = "mixmim_base"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    img_size: int | None = None
    mask_ratio: float = 0.5
    range_mask_ratio: float = 0.0
    mask_type: str = "random"
    fill: str = "mix"
    dual: bool | None = None
    unmix: str | None = None  # default: masked_attention for fill=mix, none for the other fills
    norm_pix_loss: bool = True
    grad_checkpointing: bool = False
    dataset: str = "imagenet"
    data_root: str = ""
    class_list: str | None = None  # file of ImageNet class folders to read (e.g. ImageNet-100); default: all
    epochs: int = 600
    warmup_epochs: float = 40
    batch_size: int = 64  # per process
    base_lr: float = 1.5e-4
    lr: float | None = None  # absolute; default base_lr * effective batch / 256
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    adamw_kernel: AdamWKernel = "default"  # default | fused (mixmim.engine.optim.ADAMW_KERNELS)
    crop_scale: tuple[float, float] = (0.2, 1.0)
    knn_every: int = 0  # online k-NN (mixmim.probes) every N epochs on the dataset's train/val split; 0: off
    knn_k: int = 20
    knn_temperature: float = 0.07
    knn_max_train: int | None = None  # cap on the k-NN memory bank (a seeded subset of the train split)
    knn_dataset: str | None = None  # labelled dataset of the online k-NN; default: the pretraining dataset
    knn_data_root: str = ""  # its root (a pipeline stage fills it from roots.<knn_dataset>); default: data_root


@dataclass
class FinetuneConfig(RuntimeConfig):
    """Classification finetuning (Table 12) or a linear probe of a pretrained encoder."""

    model: str = "mixmim_base"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    img_size: int | None = None
    init: str | None = None  # checkpoint: this suite's pretraining/finetuning, or an original release
    dataset: str = "imagenet"
    data_root: str = ""
    class_list: str | None = None  # file of ImageNet class folders to read (e.g. ImageNet-100); default: all
    linear_probe: bool = False
    epochs: int = 100
    warmup_epochs: float = 5
    batch_size: int = 64
    eval_batch_size: int | None = None
    base_lr: float = 5e-4
    lr: float | None = None
    min_lr: float = 1e-6
    layer_decay: float = 0.7
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    adamw_kernel: AdamWKernel = "default"  # default | fused (mixmim.engine.optim.ADAMW_KERNELS)
    drop_path: float | None = None  # default: the registered size's value (Table 12)
    randaug: str | None = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25
    mixup: float = 0.8
    cutmix: float = 1.0
    label_smoothing: float = 0.1
    crop_pct: float = 0.875
    eval_every: int = 1  # evaluate after every N-th epoch (0: only the final evaluation); the last is always evaluated


# --------------------------------------------------------------------------- #
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = typing.get_args(tp)
        if not any(type(value) is type(a) and value == a for a in allowed):
            raise ConfigError(f"{key}={value!r}: expected one of {', '.join(repr(a) for a in allowed)}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                errors.append(err)
        raise ConfigError(f"{key}={value!r}: expected {_type_name(tp)}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}={value!r}: expected a list of {len(args)} values ({_type_name(tp)})")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}={value!r}: expected a mapping")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r}: expected an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "2e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{key}={value!r}: expected a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r}: expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r}: expected a string")
        return value
    raise ConfigError(f"{key}: unsupported annotation {tp}")


def from_mapping(cls: type[T], data: Mapping[str, Any], where: str = "config") -> T:
    """Build ``cls`` from a mapping, refusing unknown keys and values of the wrong type."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; expected one of {sorted(names)}")
    values = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**values)


def load_config(cls: type[T], path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> T:
    """A YAML file (optional) with ``key=value`` style overrides applied on top."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"config file {path}: expected a mapping at the top level")
        data.update(loaded)
    data.update(overrides or {})
    return from_mapping(cls, data, where=str(path) if path else cls.__name__)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["epochs=3", "betas=[0.9,0.95]"]`` -> typed values (YAML scalars)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(raw)
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain, YAML-friendly dict of a config (tuples as lists)."""
    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}
