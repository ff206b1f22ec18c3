"""The finetuning model: the MixMIM encoder, average pooling over tokens and a linear head."""

from __future__ import annotations

from torch import Tensor, nn

from .encoder import MixMIMEncoder, encoder_layer_id


class MixMIMClassifier(nn.Module):
    """Encoder (stochastic depth as in Table 12), token mean, linear head."""

    def __init__(self, num_classes: int = 1000, **encoder_kwargs) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes}; expected a positive class count")
        self.encoder = MixMIMEncoder(**encoder_kwargs)
        self.num_classes = num_classes
        self.head = nn.Linear(self.encoder.num_features, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.frozen_encoder = False

    def to_linear_probe(self) -> MixMIMClassifier:
        """MAE's linear-probe protocol: frozen encoder (always in eval mode), BatchNorm
        without affine parameters, then the linear head; only the head trains."""
        for p in self.encoder.parameters():
            p.requires_grad = False
        self.head = nn.Sequential(nn.BatchNorm1d(self.encoder.num_features, affine=False, eps=1e-6), self.head)
        self.frozen_encoder = True
        return self.train(self.training)

    def train(self, mode: bool = True) -> MixMIMClassifier:
        super().train(mode)
        if self.frozen_encoder:
            self.encoder.eval()
        return self

    def forward_features(self, imgs: Tensor) -> Tensor:
        """Pooled representation (B, C)."""
        return self.encoder(imgs).mean(dim=1)

    def forward(self, imgs: Tensor) -> Tensor:
        return self.head(self.forward_features(imgs))

    def no_weight_decay(self) -> set[str]:
        return {"encoder." + n for n in self.encoder.no_weight_decay()}

    def group_matcher(self, coarse: bool = False):
        """Depth of each parameter for layer-wise lr decay (timm's ``param_groups_layer_decay``).

        Encoder depths follow :func:`~mixmim.models.encoder.encoder_layer_id` (patch
        embedding 0, one depth per block, a patch merging with the block it feeds, as the
        authors' ``util/lr_decay.py``); the final norm and the head come last.
        """
        depths = [len(stage.blocks) for stage in self.encoder.stages]

        def ordinal(name: str) -> tuple[float, ...]:
            layer = encoder_layer_id(name[len("encoder."):], depths) if name.startswith("encoder.") else None
            return (float("inf"),) if layer is None else (layer,)  # None: final norm, probe norm, head

        return ordinal
