"""DenseCLIP for Hugging Face transformers."""

from pathlib import Path

from transformers import AutoConfig, AutoImageProcessor, AutoModelForSemanticSegmentation

from .configuration_denseclip import DenseClipConfig
from .image_processing_denseclip import DenseClipImageProcessor
from .modeling_denseclip import (
    DenseClipForSemanticSegmentation,
    DenseClipPreTrainedModel,
    DenseClipSemanticSegmenterOutput,
    pixel_text_score_map,
    tokenize_class_names,
)

# The real CLIP BPE tokenizer (OpenAI CLIP, MIT license), shipped so that class names tokenize offline.
CLIP_TOKENIZER_PATH = str(Path(__file__).parent / "assets" / "clip_tokenizer")

AutoConfig.register(DenseClipConfig.model_type, DenseClipConfig, exist_ok=True)
AutoModelForSemanticSegmentation.register(DenseClipConfig, DenseClipForSemanticSegmentation, exist_ok=True)
AutoImageProcessor.register(DenseClipConfig, image_processor_classes={"pil": DenseClipImageProcessor}, exist_ok=True)
# `save_pretrained` then writes `auto_map` and copies the code, so saved folders load with `trust_remote_code=True`.
DenseClipConfig.register_for_auto_class()
DenseClipForSemanticSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")
DenseClipImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = [
    "CLIP_TOKENIZER_PATH",
    "DenseClipConfig",
    "DenseClipForSemanticSegmentation",
    "DenseClipImageProcessor",
    "DenseClipPreTrainedModel",
    "DenseClipSemanticSegmenterOutput",
    "pixel_text_score_map",
    "tokenize_class_names",
]
