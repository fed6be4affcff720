"""DenseCLIP for Hugging Face transformers."""

import importlib

import transformers
from transformers import AutoBackbone, AutoConfig, AutoImageProcessor, AutoModel, AutoModelForSemanticSegmentation
from transformers.models.auto.video_processing_auto import AutoVideoProcessor

from .assets import CLIP_TOKENIZER_PATH
from .configuration_denseclip import DenseClipBackboneConfig, DenseClipConfig, DenseClipResNetConfig
from .configuration_denseclip_detection import DenseClipMaskRCNNConfig, DenseClipRetinaNetConfig
from .image_processing_denseclip import MULTI_SCALE_RATIOS, DenseClipImageProcessor
from .image_processing_denseclip_detection import DenseClipDetectionImageProcessor
from .loading_denseclip import tokenize_class_names
from .loss_denseclip import detection_score_map_loss, detection_targets
from .modeling_denseclip import (
    DenseClipBackbone,
    DenseClipBackboneOutput,
    DenseClipForSemanticSegmentation,
    DenseClipModel,
    DenseClipModelOutput,
    DenseClipPreTrainedModel,
    DenseClipSemanticSegmenterOutput,
    pixel_text_score_map,
)
from .modeling_denseclip_detection import (
    DenseClipDetectionOutput,
    DenseClipForInstanceSegmentation,
    DenseClipForObjectDetection,
    DenseClipInstanceSegmentationOutput,
    DenseClipObjectDetectionOutput,
)

AutoConfig.register(DenseClipConfig.model_type, DenseClipConfig, exist_ok=True)
AutoModel.register(DenseClipConfig, DenseClipModel, exist_ok=True)
AutoModelForSemanticSegmentation.register(DenseClipConfig, DenseClipForSemanticSegmentation, exist_ok=True)
AutoConfig.register(DenseClipBackboneConfig.model_type, DenseClipBackboneConfig, exist_ok=True)
AutoBackbone.register(DenseClipBackboneConfig, DenseClipBackbone, exist_ok=True)
AutoImageProcessor.register(DenseClipConfig, image_processor_classes={"pil": DenseClipImageProcessor}, exist_ok=True)
# `save_pretrained` then writes `auto_map` and copies the code, so saved folders load with `trust_remote_code=True`.
DenseClipConfig.register_for_auto_class()
DenseClipModel.register_for_auto_class("AutoModel")
DenseClipForSemanticSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")
DenseClipImageProcessor.register_for_auto_class("AutoImageProcessor")
DenseClipBackboneConfig.register_for_auto_class()
DenseClipBackbone.register_for_auto_class("AutoBackbone")
# The detectors (RetinaNet, Mask R-CNN): each under the Auto classes of its `auto_classes` (Mask R-CNN also under
# AutoModelForImageSegmentation, which the image-segmentation pipeline loads, and AutoModelForObjectDetection), with
# the detection image processor; saved folders name them all in `auto_map`.
for _detector in (DenseClipForObjectDetection, DenseClipForInstanceSegmentation):
    AutoConfig.register(_detector.config_class.model_type, _detector.config_class, exist_ok=True)
    for _auto_class in _detector.auto_classes:
        getattr(transformers, _auto_class).register(_detector.config_class, _detector, exist_ok=True)
    AutoImageProcessor.register(
        _detector.config_class, image_processor_classes={"pil": DenseClipDetectionImageProcessor}, exist_ok=True
    )
    _detector.config_class.register_for_auto_class()
    _detector.register_for_auto_class(_detector.auto_classes[0])
DenseClipDetectionImageProcessor.register_for_auto_class("AutoImageProcessor")
# DenseCLIP has no video processor. Saying so keeps `pipeline(...)` from asking whether to run a remote one, which
# transformers infers from the image processor's `auto_map` (a blocking "[y/N]" prompt in a terminal).
for _config_class in (DenseClipConfig, DenseClipRetinaNetConfig, DenseClipMaskRCNNConfig):
    AutoVideoProcessor.register(_config_class, video_processor_classes={}, exist_ok=True)

# Loaded on first use, so that `import denseclip_hf` stays light: the converters (which import the model, never the
# other way round), the training helpers (which import `datasets` and `accelerate`) and the ONNX export and ONNX
# Runtime wrapper (the `export` extra).
_LAZY_EXPORTS = {
    "convert_clip_checkpoint": "checkpoint_conversion",
    "convert_denseclip_checkpoint": "convert_denseclip_original_to_hf",
    "export_onnx": "export",
    "DenseClipOnnxSegmenter": "onnx_inference",
    "SYNTHETIC_CLASS_NAMES": "synthetic",
    "SYNTHETIC_DETECTION_CLASS_NAMES": "synthetic",
    "load_synthetic_dataset": "synthetic",
    "SegmentationAugmentation": "training.transforms",
    "confusion_matrix": "training.metrics",
    "segmentation_metrics": "training.metrics",
    "RECIPES": "training.recipes",
    "SegmentationTrainingArguments": "training.arguments",
    "parameter_groups": "training.optimization",
    "poly_schedule_with_warmup": "training.optimization",
}


def __getattr__(name: str):
    if name in _LAZY_EXPORTS:
        return getattr(importlib.import_module(f".{_LAZY_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    *_LAZY_EXPORTS,
    "CLIP_TOKENIZER_PATH",
    "MULTI_SCALE_RATIOS",
    "DenseClipBackbone",
    "DenseClipBackboneConfig",
    "DenseClipBackboneOutput",
    "DenseClipConfig",
    "DenseClipDetectionImageProcessor",
    "DenseClipDetectionOutput",
    "DenseClipForInstanceSegmentation",
    "DenseClipForObjectDetection",
    "DenseClipForSemanticSegmentation",
    "DenseClipImageProcessor",
    "DenseClipInstanceSegmentationOutput",
    "DenseClipMaskRCNNConfig",
    "DenseClipModel",
    "DenseClipModelOutput",
    "DenseClipObjectDetectionOutput",
    "DenseClipPreTrainedModel",
    "DenseClipResNetConfig",
    "DenseClipRetinaNetConfig",
    "DenseClipSemanticSegmenterOutput",
    "detection_score_map_loss",
    "detection_targets",
    "pixel_text_score_map",
    "tokenize_class_names",
]
