"""DenseCLIP for Hugging Face transformers."""

from transformers import AutoConfig, AutoModelForSemanticSegmentation

from .configuration_denseclip import DenseClipConfig
from .modeling_denseclip import (
    DenseClipForSemanticSegmentation,
    DenseClipPreTrainedModel,
    DenseClipSemanticSegmenterOutput,
    pixel_text_score_map,
)

AutoConfig.register(DenseClipConfig.model_type, DenseClipConfig, exist_ok=True)
AutoModelForSemanticSegmentation.register(DenseClipConfig, DenseClipForSemanticSegmentation, exist_ok=True)

__all__ = [
    "DenseClipConfig",
    "DenseClipForSemanticSegmentation",
    "DenseClipPreTrainedModel",
    "DenseClipSemanticSegmenterOutput",
    "pixel_text_score_map",
]
