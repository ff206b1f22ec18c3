"""MixMIM models: encoder, pretraining model, classifier, and their registry."""

from .classifier import MixMIMClassifier
from .encoder import MixMIMEncoder
from .pretrainer import (
    FILLS, UNMIX, MixMIMDecoder, MixMIMPretrainer, PretrainerBase, PretrainOutput, patchify, pixel_targets,
    reconstruction_loss, unpatchify,
)
from .registry import MODEL_SIZES, ModelSize, build_classifier, build_pretrainer

__all__ = [
    "FILLS", "MODEL_SIZES", "UNMIX", "MixMIMClassifier", "MixMIMDecoder", "MixMIMEncoder", "MixMIMPretrainer",
    "ModelSize", "PretrainOutput", "PretrainerBase", "build_classifier", "build_pretrainer", "patchify",
    "pixel_targets", "reconstruction_loss", "unpatchify",
]
