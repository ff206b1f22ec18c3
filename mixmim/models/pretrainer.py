"""The MixMIM pretraining model: mixed input, group-restricted encoder, dual reconstruction.

Sections 2.2-2.3 of the paper, with every ablation of section 5 as a constructor
argument (defaults are the paper's choices):

- ``fill`` (Table 6): what replaces an image's masked cells. ``mix`` takes the
  partner image's tokens (image i is paired with image B-1-i); ``zero`` uses zeros;
  ``learnable`` a shared learned token; ``shuffle`` the image's own masked cells in a
  random order (a jigsaw at mask-cell granularity); ``zoomin`` the tokens of a random
  crop of the image enlarged ``zoom`` times.
- ``dual`` (Table 7): reconstruct both images (one decoder pass of 2B) or only the
  first. Only ``fill="mix"`` has a second image, so dual defaults to ``fill == "mix"``.

The non-mix fills are the BEiT/SimMIM-style alternatives the paper compares mixing
with (section 5: the learnable fill "follow[s] previous works [3, 45]"). Their input
holds one image, so there is no partner to keep apart and nothing to unmix: the
encoder sees the filled image whole, with full attention (``unmix="none"``, the
default for these fills), and the masked cells are reconstructed once. The decoder
reads the encoder's output at *every* cell, the filled ones included, with no mask
token: in BEiT and SimMIM the prediction of a masked patch is made from the encoder's
output at that patch, and the paper's account of Table 6 depends on the filled
content reaching the prediction (zero fill "mismatches" the visible tokens, the
learnable token "adapts" to them, shuffle and zoom-in make the task easier and lower
the pretraining loss). MixMIM's own decoder drops the other group's cells and puts
mask tokens there because those cells hold the *partner's* content (Figure 1:
"unmixed and filled with mask tokens"); a single filled image has nothing to unmix.
A non-mix fill with masked attention, a mix embedding or dual reconstruction has no
meaning and is refused.
- ``mask_type`` (Table 8): ``random`` cells or one ``block``; ``range_mask_ratio`` adds
  U(0, range) to the ratio once per batch.
- ``unmix`` (Table 10): ``masked_attention`` (a token attends only to its own group),
  ``mix_embedding`` (two learned vectors per stage added at each stage's start) or
  ``none``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from .encoder import MixMIMEncoder
from .layers import Size2, init_transformer_weights, sincos_pos_embed_2d, use_fast_linears
from .masking import check_mask, check_mask_settings, sample_mask

FILLS = ("mix", "zero", "learnable", "shuffle", "zoomin")
UNMIX = ("masked_attention", "mix_embedding", "none")


def check_fill_settings(fill: str, unmix: str | None, dual: bool | None) -> tuple[str, bool]:
    """Validate a fill with its unmixing and reconstruction; returns ``(unmix, dual)`` with the
    defaults resolved (``mix``: masked attention, dual; other fills: no unmixing, single).

    Only ``fill="mix"`` puts two images in the input. The other fills encode one image whole,
    so separating groups in the encoder (masked attention, mix embedding) or reconstructing
    a second image has nothing to act on, and such a combination is refused.
    """
    if fill not in FILLS:
        raise ValueError(f"fill={fill!r}; expected one of {FILLS}")
    mixes = fill == "mix"
    if unmix is None:
        unmix = "masked_attention" if mixes else "none"
    if unmix not in UNMIX:
        raise ValueError(f"unmix={unmix!r}; expected one of {UNMIX}")
    if dual is None:
        dual = mixes
    if not mixes and unmix != "none":
        raise ValueError(
            f"fill={fill!r} with unmix={unmix!r}: only fill='mix' puts a second image (group) in the input, "
            "the other fills are encoded whole with full attention; use unmix='none' (the default for them)"
        )
    if dual and not mixes:
        raise ValueError(
            f"dual=True with fill={fill!r}: only fill='mix' puts a second image in the input; "
            "use dual=False (the default for the other fills)"
        )
    return unmix, bool(dual)


@dataclass
class PretrainOutput:
    """What one pretraining forward pass returns.

    ``pred`` is (2B, L, stride**2 * 3) with dual reconstruction (rows 0..B-1 decoded from
    the group where mask == 0, rows B..2B-1 from the group where mask == 1), (B, L, ...)
    with single reconstruction. ``latent`` is the encoder output after its final norm.
    """

    loss: Tensor
    pred: Tensor
    latent: Tensor
    mask: Tensor


def patchify(imgs: Tensor, cell: int) -> Tensor:
    """(B, C, H, W) -> (B, L, cell*cell*C), each row ordered (row, column, channel)."""
    b, c, h, w = imgs.shape
    x = imgs.reshape(b, c, h // cell, cell, w // cell, cell)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // cell) * (w // cell), cell * cell * c)


def unpatchify(x: Tensor, cell: int, grid: Size2, channels: int = 3) -> Tensor:
    """Inverse of :func:`patchify`."""
    b = x.shape[0]
    h, w = grid
    x = x.reshape(b, h, w, cell, cell, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, channels, h * cell, w * cell)


def pixel_targets(imgs: Tensor, cell: int, norm_pix: bool = True) -> Tensor:
    """Per-cell pixel targets (B, L, cell*cell*C), normalised per cell when ``norm_pix``."""
    target = patchify(imgs, cell)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    return target


def reconstruction_loss(imgs: Tensor, pred: Tensor, mask: Tensor, cell: int, dual: bool,
                        norm_pix: bool = True) -> Tensor:
    """Eq. (2). Dual: unmix the two decoder branches (image i's cells where mask == 1 come
    from branch 1, where mask == 0 from branch 2 of its partner B-1-i) and average the
    squared error over every element. Single: mean error over the masked cells only.
    """
    target = pixel_targets(imgs, cell, norm_pix).float()
    pred = pred.float()
    b = imgs.shape[0]
    m = mask.reshape(1, -1, 1).float()
    if dual:
        unmixed = pred[:b] * m + pred[b:].flip(0) * (1 - m)
        return ((unmixed - target) ** 2).mean()
    per_cell = ((pred[:b] - target) ** 2).mean(dim=-1, keepdim=True)
    return (per_cell * m).sum() / (m.sum() * b).clamp(min=1.0)


def mean_colour_loss(imgs: Tensor, cell: int, norm_pix: bool = True) -> Tensor:
    """Per-image loss (B,) of the predict-the-mean baseline, in the units of :func:`reconstruction_loss`.

    Every target cell is predicted by its own mean colour (one value per channel, i.e. a
    flat cell); the squared error is averaged over every cell of the image, which is the
    expected error over the masked cells of a uniformly random mask. A reconstruction
    loss at this level means the model has learnt each cell's average colour and nothing
    of its structure.
    """
    target = pixel_targets(imgs, cell, norm_pix).float()
    b, num, _ = target.shape
    pixels = target.reshape(b, num, cell * cell, imgs.shape[1])
    return ((pixels - pixels.mean(dim=2, keepdim=True)) ** 2).mean(dim=(1, 2, 3))


class MixMIMDecoder(nn.Module):
    """Linear projection to the decoder width, mask-token filling, ViT blocks, pixel head."""

    def __init__(self, in_dim: int, grid: Size2, out_dim: int, dim: int = 512, depth: int = 8,
                 num_heads: int = 16, mlp_ratio: float = 4.0, mask_token: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"decoder_num_heads={num_heads} does not divide decoder_dim={dim}")
        self.embed = nn.Linear(in_dim, dim)
        # Without a mask token (non-mix fills: the decoder reads every cell) the parameter is
        # absent rather than unused, so DDP does not wait for its gradient.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim)) if mask_token else None
        self.register_buffer("pos_embed", sincos_pos_embed_2d(dim, grid), persistent=False)
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=nn.LayerNorm) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, out_dim)
        self.apply(init_transformer_weights)
        use_fast_linears(self)  # same parameters; oneDNN matmuls on AMD CPUs (layers.fast_linear)
        if self.mask_token is not None:
            nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent: Tensor, mask: Tensor | None, dual: bool) -> Tensor:
        """Decode twice (dual) or once: the mask token replaces the other group's cells.

        ``mask=None`` decodes the latent as it is, every cell included (the non-mix fills).
        """
        x = self.embed(latent)
        if mask is None:
            if dual:
                raise ValueError("dual=True needs the mixing mask: it decodes the two groups separately")
            branches = [x]
        else:
            if self.mask_token is None:
                raise ValueError("this decoder was built without a mask token (mask_token=False); "
                                 "decode with mask=None")
            m = mask.reshape(1, -1, 1).to(x.dtype)
            tok = self.mask_token.to(x.dtype)
            branches = [x * (1 - m) + tok * m]
            if dual:
                branches.append(x * m + tok * (1 - m))
        x = torch.cat(branches, dim=0) + self.pos_embed.to(x.dtype)
        for blk in self.blocks:
            x = blk(x)
        return self.pred(self.norm(x))


class PretrainerBase(nn.Module):
    """What every MixMIM pretrainer shares, whatever its encoder.

    The mask (sampled or given, checked against the mixing grid), the Eq. (1) mix, the
    decoder, the reconstruction loss (Eq. 2, dual or single), the forward pass and the
    weight-decay exclusions. A subclass builds its encoder, then calls
    :meth:`_build_decoder` with the encoder's mixing grid, stride and width, and
    implements :meth:`forward_encoder` (images and mask -> the latent the decoder reads).
    ``mask`` is (1, gh*gw), shared by the batch; 1 marks the cells filled from elsewhere
    (for ``fill="mix"``: taken from the partner image B-1-i).
    """

    def __init__(self, in_chans: int, mask_ratio: float, range_mask_ratio: float, mask_type: str,
                 dual: bool, norm_pix_loss: bool) -> None:
        super().__init__()
        check_mask_settings(mask_type, mask_ratio, range_mask_ratio)
        self.in_chans = in_chans
        self.mask_ratio = mask_ratio
        self.range_mask_ratio = range_mask_ratio
        self.mask_type = mask_type
        self.dual = dual
        self.norm_pix_loss = norm_pix_loss

    def _build_decoder(self, mask_grid: Size2, stride: int, num_features: int, decoder_dim: int,
                       decoder_depth: int, decoder_num_heads: int, mlp_ratio: float,
                       mask_token: bool = True) -> None:
        """Record the encoder's mixing grid and output stride, and build the decoder for them."""
        self.mask_grid: Size2 = tuple(mask_grid)
        self.stride = int(stride)
        self.decoder = MixMIMDecoder(
            num_features, self.mask_grid, self.stride**2 * self.in_chans, decoder_dim, decoder_depth,
            decoder_num_heads, mlp_ratio, mask_token=mask_token,
        )

    # ------------------------------------------------------------------ #
    @property
    def num_cells(self) -> int:
        h, w = self.mask_grid
        return h * w

    def sample_mask(self, device: torch.device | None = None) -> Tensor:
        return sample_mask(self.mask_grid, self.mask_type, self.mask_ratio, self.range_mask_ratio, device)

    def resolve_mask(self, mask: Tensor | None, device: torch.device) -> Tensor:
        """A fresh mask when ``mask`` is None, else ``mask`` checked against the grid."""
        if mask is None:
            return self.sample_mask(device)
        return check_mask(mask, self.num_cells).to(device)

    def cell_map(self, mask: Tensor, factor: int, dtype: torch.dtype) -> Tensor:
        """The (1, 1, gh*f, gw*f) map of a (1, gh*gw) mask: each cell repeated f x f times."""
        m = mask.reshape(1, 1, *self.mask_grid).to(dtype)
        return m.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)

    @staticmethod
    def mix_by_mask(x: Tensor, fill: Tensor, m: Tensor) -> Tensor:
        """Eq. (1): ``x`` where ``m`` == 0, ``fill`` where ``m`` == 1 (``m`` broadcasts over ``x``)."""
        return x * (1 - m) + fill * m

    def check_images(self, imgs: Tensor) -> None:
        """Refuse an input the encoder was not built for (the default accepts any)."""

    def forward_encoder(self, imgs: Tensor, mask: Tensor) -> Tensor:
        raise NotImplementedError

    def decoder_mask(self, mask: Tensor) -> Tensor | None:
        """The mask the decoder unmixes with (None: it reads every cell as it is)."""
        return mask

    def loss(self, imgs: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        return reconstruction_loss(imgs, pred, mask, self.stride, self.dual, self.norm_pix_loss)

    def forward(self, imgs: Tensor, mask: Tensor | None = None) -> PretrainOutput:
        self.check_images(imgs)
        mask = self.resolve_mask(mask, imgs.device)
        latent = self.forward_encoder(imgs, mask)
        pred = self.decoder(latent, self.decoder_mask(mask), self.dual)
        return PretrainOutput(loss=self.loss(imgs, pred, mask), pred=pred, latent=latent, mask=mask)

    def other_no_weight_decay(self) -> set[str]:
        """Names kept out of weight decay besides the mask token: the encoder's (prefixed
        ``encoder.``) and any token the subclass adds."""
        return set()

    def no_weight_decay(self) -> set[str]:
        """Names kept out of weight decay besides norms and biases: the decoder's mask token and
        :meth:`other_no_weight_decay` (the encoder's tables, a subclass's own tokens)."""
        names = self.other_no_weight_decay()
        if self.decoder.mask_token is not None:
            names.add("decoder.mask_token")
        return names


class MixMIMPretrainer(PretrainerBase):
    """Encoder + decoder trained by reconstructing the images behind a mixed input.

    What differs from :class:`PretrainerBase`: the MixMIM encoder, the fills of Table 6
    (mixed in at the patch-token level), the unmixing of Table 10, and for the non-mix
    fills a decoder without mask token that reads every cell.
    """

    def __init__(
        self,
        img_size: int | Size2 = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 128,
        depths: Sequence[int] = (2, 2, 18, 2),
        num_heads: Sequence[int] = (4, 8, 16, 32),
        window_size: int | Sequence[int] = (14, 14, 14, 7),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        norm_pix_loss: bool = True,
        mask_ratio: float = 0.5,
        range_mask_ratio: float = 0.0,
        mask_type: str = "random",
        fill: str = "mix",
        dual: bool | None = None,
        unmix: str | None = None,
        zoom: float = 2.0,
        use_checkpoint: bool = False,
    ) -> None:
        unmix, dual = check_fill_settings(fill, unmix, dual)
        super().__init__(in_chans, mask_ratio, range_mask_ratio, mask_type, dual, norm_pix_loss)
        if zoom <= 1.0:
            raise ValueError(f"zoom={zoom}; expected a zoom-in factor > 1")
        self.encoder = MixMIMEncoder(
            img_size, patch_size, in_chans, embed_dim, depths, num_heads, window_size, mlp_ratio,
            qkv_bias, drop_rate, attn_drop_rate, drop_path_rate, use_checkpoint,
        )
        enc = self.encoder
        self.fill = fill
        self.unmix = unmix
        self.zoom = zoom
        self._build_decoder(enc.mask_grid, enc.stride, enc.num_features, decoder_dim, decoder_depth,
                            decoder_num_heads, mlp_ratio, mask_token=fill == "mix")
        self.fill_token = nn.Parameter(torch.zeros(1, 1, enc.dims[0])) if fill == "learnable" else None
        if self.fill_token is not None:
            nn.init.normal_(self.fill_token, std=0.02)
        self.mix_embed = None
        if unmix == "mix_embedding":
            self.mix_embed = nn.ParameterList(nn.Parameter(torch.zeros(2, d)) for d in enc.dims)
            for p in self.mix_embed:
                nn.init.trunc_normal_(p, std=0.02)

    # ------------------------------------------------------------------ #
    def _shuffle_cells(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """Each image's masked cells (blocks of tokens) in an independent random order."""
        b, _, c = tokens.shape
        gh, gw = self.encoder.mask_grid
        f = 2 ** (self.encoder.num_stages - 1)
        cells = tokens.view(b, gh, f, gw, f, c).permute(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, f * f * c)
        masked = mask[0].nonzero().squeeze(1)
        order = torch.rand(b, masked.numel(), device=tokens.device).argsort(dim=1)
        source = torch.arange(gh * gw, device=tokens.device).repeat(b, 1)
        source[:, masked] = masked[order]
        cells = cells.gather(1, source.unsqueeze(-1).expand_as(cells))
        return cells.view(b, gh, gw, f, f, c).permute(0, 1, 3, 2, 4, 5).reshape(b, -1, c)

    def _zoomed_images(self, imgs: Tensor) -> Tensor:
        """A random crop, of the original size, of each image enlarged ``zoom`` times."""
        b, _, h, w = imgs.shape
        big = F.interpolate(imgs, scale_factor=self.zoom, mode="bilinear", align_corners=False)
        tops = torch.randint(0, big.shape[-2] - h + 1, (b,)).tolist()
        lefts = torch.randint(0, big.shape[-1] - w + 1, (b,)).tolist()
        return torch.stack([big[i, :, t:t + h, s:s + w] for i, (t, s) in enumerate(zip(tops, lefts))])

    def fill_tokens(self, imgs: Tensor, tokens: Tensor, mask: Tensor) -> Tensor:
        """The tokens that replace each image's masked cells (Table 6)."""
        if self.fill == "mix":
            return tokens.flip(0)
        if self.fill == "zero":
            return torch.zeros_like(tokens)
        if self.fill == "learnable":
            return self.fill_token.to(tokens.dtype).expand_as(tokens)
        if self.fill == "shuffle":
            return self._shuffle_cells(tokens, mask)
        return self.encoder.patch_embed(self._zoomed_images(imgs))

    def forward_encoder(self, imgs: Tensor, mask: Tensor) -> Tensor:
        """Mix (Eq. 1) at the patch-token level and encode; returns the normed latent."""
        enc = self.encoder
        tokens = enc.embed(imgs)
        m1 = self.cell_map(mask, 2 ** (enc.num_stages - 1), tokens.dtype).reshape(1, -1, 1)
        x = self.mix_by_mask(tokens, self.fill_tokens(imgs, tokens, mask), m1)
        outs = enc.forward_stages(
            x, mask, restrict_attention=self.unmix == "masked_attention",
            mix_embeds=list(self.mix_embed) if self.mix_embed is not None else None,
        )
        return enc.norm(outs[-1])

    def decoder_mask(self, mask: Tensor) -> Tensor | None:
        # Non-mix fills: the decoder reads the filled cells' outputs too (see the module docstring).
        return mask if self.fill == "mix" else None

    def other_no_weight_decay(self) -> set[str]:
        """The encoder's tables, and the fill and mix tokens."""
        names = {"encoder." + n for n in self.encoder.no_weight_decay()}
        for n, _ in self.named_parameters():
            if n.startswith(("fill_token", "mix_embed")):
                names.add(n)
        return names
