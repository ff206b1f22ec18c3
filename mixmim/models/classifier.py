"""The finetuning model: the MixMIM encoder, average pooling over tokens and a linear head."""

from __future__ import annotations

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

    def forward_features(self, imgs: Tensor) -> Tensor:
        """Pooled representation (B, C)."""
        return self.encoder(imgs).mean(dim=1)

    def forward(self, imgs: Tensor) -> Tensor:
        return self.head(self.forward_features(imgs))

    def no_weight_decay(self) -> set[str]:
        return {"encoder." + n for n in self.encoder.no_weight_decay()}
