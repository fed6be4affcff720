"""Full-size DenseCLIP configs of the authors' ADE20K models (random weights: speed and size do not depend on them)."""

from denseclip_hf import DenseClipConfig

NUM_CLASSES = 150  # ADE20K
# CLIP's text transformer (all released CLIP models): width 512, 12 layers, 8 heads.
CLIP_TEXT = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8)
# A class prompt of the right length ([SOT] "a" [EOT]); the cost does not depend on the names.
CLASS_TOKEN_IDS = [[49406, 320, 49407, 0, 0]] * NUM_CLASSES


def ade20k_config(encoder: str, image_size: int, **settings) -> DenseClipConfig:
    """`encoder` `"vit-b16"` (CLIP ViT-B/16, projection 512) or `"rn50"` (CLIP RN50, projection 1024) at
    `image_size` (the positional tables' size), with the 150 ADE20K classes and the paper's default settings."""
    vision = {
        "vit-b16": {"model_type": "clip_vision_model", "patch_size": 16},
        "rn50": {"model_type": "denseclip_resnet_vision"},
    }[encoder]
    return DenseClipConfig(
        vision_config={**vision, "image_size": image_size},
        text_config=CLIP_TEXT,
        projection_dim={"vit-b16": 512, "rn50": 1024}[encoder],
        id2label={label: f"class {label}" for label in range(NUM_CLASSES)},
        class_token_ids=CLASS_TOKEN_IDS,
        **settings,
    )
