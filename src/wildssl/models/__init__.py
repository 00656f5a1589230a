"""Encoder and heads: one ViT (timm parameter names) and the projection heads methods compose."""

from wildssl.models.export import timm_kwargs, timm_state_dict
from wildssl.models.heads import DINOHead, ProjectionHead
from wildssl.models.vit import ENCODER_SIZES, VisionTransformer, build_encoder

__all__ = [
    "ENCODER_SIZES",
    "DINOHead",
    "ProjectionHead",
    "VisionTransformer",
    "build_encoder",
    "timm_kwargs",
    "timm_state_dict",
]
