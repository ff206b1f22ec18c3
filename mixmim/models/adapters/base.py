"""What every timm adapter shares: the group context, forward swapping, the pixel-level mix.

Mask sampling, the decoder, the loss and the forward pass come from
:class:`~mixmim.models.pretrainer.PretrainerBase`, shared with ``MixMIMPretrainer``.

An adapter holds an *unmodified* timm model as ``self.encoder`` (so its state dict is
the timm model's under the prefix ``encoder.``) and swaps the ``forward`` of a few of
its submodules (attention, convolutions, pooling, group norms) for group-aware
versions. A swapped forward is an instance attribute: it leaves the state dict and
the module tree alone, and it falls back to the original forward whenever no mixing
mask is active, so outside :meth:`TimmMixMIMAdapter.encode` the encoder computes
exactly what the plain timm model computes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ..layers import Size2, to_2tuple
from ..masking import check_mask
from ..pretrainer import PretrainerBase

PAD = -1.0  # group-map value of padding positions: constant content, valid for both groups


class GroupContext:
    """The mixing mask of the current forward pass, at every resolution the encoder asks for.

    ``groups(h, w)`` is a (1, 1, h, w) float map: 0 where the token or pixel comes from
    the image itself, 1 where it comes from the partner (the mask's convention), and
    :data:`PAD` for padding added by a pad module (registered by that module). Maps are
    nearest upsamplings of the (1, gh*gw) mask, which is shared by the whole batch, so
    they are built once per resolution and forward pass.
    """

    def __init__(self, grid: Size2) -> None:
        self.grid = grid
        self.mask: Tensor | None = None
        self.cache: dict[object, Tensor] = {}
        self.current_hw: Size2 | None = None  # feature size of the block running now (Swin)

    @property
    def active(self) -> bool:
        return self.mask is not None

    @contextmanager
    def use(self, mask: Tensor | None) -> Iterator[None]:
        """Make ``mask`` (1, gh*gw) the active mask for the duration of a forward pass."""
        self.mask, self.cache = mask, {}
        try:
            yield
        finally:
            self.mask, self.cache = None, {}

    def groups(self, h: int, w: int) -> Tensor:
        key = (h, w)
        if key not in self.cache:
            gh, gw = self.grid
            if h % gh or w % gw:
                raise ValueError(
                    f"a {h}x{w} feature map is not aligned to the {gh}x{gw} mixing grid; MixMIM adapters need "
                    "every feature map to be an integer multiple of the mask grid (image size divisible by "
                    "the encoder stride, no odd intermediate sizes)"
                )
            m = self.mask.reshape(1, 1, gh, gw)
            self.cache[key] = m.repeat_interleave(h // gh, dim=2).repeat_interleave(w // gw, dim=3)
        return self.cache[key]

    def register(self, groups: Tensor) -> None:
        """Record the group map of a padded feature map (its size is its key)."""
        self.cache[tuple(groups.shape[-2:])] = groups

    def keep(self, groups: Tensor, g: int, dtype: torch.dtype) -> Tensor:
        """1 where a position may feed group ``g`` (its own cells and padding), else 0."""
        return ((groups == g) | (groups == PAD)).to(dtype)


def swap_forward(module: nn.Module, fn: Callable, *args) -> None:
    """Make ``module.forward`` call ``fn(original_forward, *args, *inputs)`` (this instance only).

    The swap is a ``functools.partial`` of a module-level function, so ``copy.deepcopy``
    of the model (an EMA copy, say) rebinds it to the copied modules and context.
    """
    if "forward" in module.__dict__:
        raise RuntimeError(f"{type(module).__name__}.forward is already swapped")
    module.forward = functools.partial(fn, module.forward, *args)


def restore_forward(module: nn.Module) -> None:
    """Undo :func:`swap_forward` (the class's forward is used again)."""
    module.__dict__.pop("forward", None)


def additive_bias(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """0 where ``allowed``, -inf elsewhere (the attention bias of the group restriction)."""
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return bias.masked_fill_(~allowed, float("-inf"))


class TimmMixMIMAdapter(PretrainerBase):
    """MixMIM pretraining (Eq. 1 mixing, group restriction, dual reconstruction) on a timm encoder.

    Subclasses install the group restriction in ``__init__`` and implement
    :meth:`_encode` (mixed images -> (B, L, C) features at the output stride).
    ``model(imgs)`` samples a mask, ``model(imgs, mask=m)`` uses ``m`` (1, L) where 1
    marks the cells taken from the partner image B-1-i; the output is the
    :class:`~mixmim.models.pretrainer.PretrainOutput` of ``MixMIMPretrainer``.

    The semantics are ``MixMIMPretrainer``'s with ``fill="mix"``: ``restrict`` is its
    ``unmix="masked_attention"`` (off: ``"none"``), ``dual=False`` decodes image i's own
    group with mask tokens over the partner's cells and scores the masked cells only.
    The non-mix fills of Table 6 (one image encoded whole, every cell decoded; see
    :func:`~mixmim.models.pretrainer.check_fill_settings`) exist for the MixMIM encoder
    only, and the engine refuses them for a timm encoder.

    Mask sampling, the decoder, the loss and the forward pass are
    :class:`~mixmim.models.pretrainer.PretrainerBase`'s; what is timm-specific here is the
    pixel-level mix, the group context and the swapped forwards.
    """

    family = "base"
    checkpoint_safe = False  # whether timm's gradient checkpointing may stay on while mixing

    def __init__(
        self,
        encoder: nn.Module,
        timm_name: str,
        stride: int,
        num_features: int,
        img_size: int | Size2 = 224,
        in_chans: int = 3,
        mask_ratio: float = 0.5,
        range_mask_ratio: float = 0.0,
        mask_type: str = "random",
        dual: bool = True,
        norm_pix_loss: bool = True,
        restrict: bool = True,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        decoder_mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__(in_chans, mask_ratio, range_mask_ratio, mask_type, dual, norm_pix_loss)
        self.img_size = to_2tuple(img_size)
        if self.img_size[0] % stride or self.img_size[1] % stride:
            raise ValueError(
                f"image size {self.img_size[0]}x{self.img_size[1]} is not divisible by the output stride "
                f"{stride} of {timm_name}; expected a multiple of {stride}"
            )
        self.encoder = encoder
        self.timm_name = timm_name
        self.num_features = int(num_features)
        self.restrict = restrict
        self._build_decoder((self.img_size[0] // stride, self.img_size[1] // stride), stride, self.num_features,
                            decoder_dim, decoder_depth, decoder_num_heads, decoder_mlp_ratio)
        self.ctx = GroupContext(self.mask_grid)

    # ------------------------------------------------------------------ #
    def pixel_mask(self, mask: Tensor, dtype: torch.dtype) -> Tensor:
        """The (1, 1, H, W) pixel map of a (1, L) mask (nearest upsampling by the stride)."""
        return self.cell_map(mask, self.stride, dtype)

    def mix(self, imgs: Tensor, mask: Tensor) -> Tensor:
        """Eq. (1) in pixels: image i keeps its cells where mask == 0 and shows image B-1-i's elsewhere."""
        return self.mix_by_mask(imgs, imgs.flip(0), self.pixel_mask(mask, imgs.dtype))

    def check_images(self, imgs: Tensor) -> None:
        if imgs.ndim != 4 or tuple(imgs.shape[-2:]) != self.img_size:
            raise ValueError(
                f"input of shape {tuple(imgs.shape)} does not match the adapter, built for (B, C, "
                f"{self.img_size[0]}, {self.img_size[1]}) images"
            )

    def _encode(self, x: Tensor, restrict: bool) -> Tensor:
        raise NotImplementedError

    def encode(self, x: Tensor, mask: Tensor | None, restrict: bool | None = None) -> Tensor:
        """Features (B, L, C) at the output stride of (already mixed) images ``x``.

        With ``mask`` and the restriction on, every group-aware forward sees the mask;
        without, the encoder runs as the plain timm model.
        """
        restrict = self.restrict if restrict is None else restrict
        active = mask if (restrict and mask is not None) else None
        if active is not None and not self.checkpoint_safe and torch.is_grad_enabled() and any(
                getattr(m, "grad_checkpointing", False) for m in self.encoder.modules()):
            raise ValueError(
                f"{self.timm_name}: timm's gradient checkpointing recomputes blocks during backward, outside "
                "the pretraining forward, where the group-aware operators are switched off; turn it off "
                "(encoder.set_grad_checkpointing(False)) for MixMIM pretraining"
            )
        with self.ctx.use(active):
            return self._encode(x, active is not None)

    def forward_features(self, imgs: Tensor, mask: Tensor | None = None) -> Tensor:
        """Mix with ``mask`` (if given) and encode: the latent (B, L, C) the decoder reads."""
        self.check_images(imgs)
        if mask is None:
            return self.encode(imgs, None)
        mask = check_mask(mask, self.num_cells).to(imgs.device)
        return self.encode(self.mix(imgs, mask), mask)

    def forward_encoder(self, imgs: Tensor, mask: Tensor) -> Tensor:
        """Mix (Eq. 1) in pixels and encode with the group restriction."""
        return self.encode(self.mix(imgs, mask), mask)

    def other_no_weight_decay(self) -> set[str]:
        """The timm encoder's own list (its ``no_weight_decay``), as parameter names."""
        names: set[str] = set()
        own = getattr(self.encoder, "no_weight_decay", None)
        if callable(own):
            keys = set(own())
            names |= {"encoder." + n for n, _ in self.encoder.named_parameters()
                      if n in keys or n.split(".")[-1] in keys}
        return names


def to_tokens(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H*W, C)."""
    return x.flatten(2).transpose(1, 2)


def masked_mean_pool(pool: Callable[[Tensor], Tensor], x: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """Average pooling over one group only, renormalised as partial convolution does.

    ``pool(x * keep) / (1 - pool(1 - keep))``: the other group's inputs count as missing
    and the window's weight is spread over the rest; zero padding stays valid, so with
    one group this is exactly ``pool(x)`` for any linear averaging pool (AvgPool2d with
    or without padding counted, AdaptiveAvgPool2d). Also returns the valid fraction.
    """
    frac = 1 - pool(1 - keep)
    return pool(x * keep) / frac.clamp(min=1e-6), frac


__all__ = [
    "PAD", "GroupContext", "TimmMixMIMAdapter", "additive_bias", "masked_mean_pool", "restore_forward",
    "swap_forward", "to_tokens",
]
