"""The finetuning model: the MixMIM encoder, average pooling over tokens and a linear head."""

from __future__ import annotations

from timm.models._manipulate import MATCH_PREV_GROUP
from torch import Tensor, nn

from .encoder import MixMIMEncoder


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

        The patch embedding is depth 0 and every block has its own depth in order; a
        patch merging shares the depth of the block before it (in the original model it
        closes the previous stage); the final norm and the head come last.
        """
        def ordinal(name: str) -> tuple[float, ...]:
            parts = name.split(".")
            if name.startswith("encoder.patch_embed."):
                return (0,)
            if name.startswith("encoder.stages.") and parts[3] == "blocks":
                return (1, int(parts[2]), int(parts[4]))
            if name.startswith("encoder.stages.") and parts[3] == "merge":
                return (1, int(parts[2]) - 1, float("inf"), MATCH_PREV_GROUP[0])
            return (float("inf"),)  # final norm, probe norm, head

        return ordinal
