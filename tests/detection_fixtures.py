"""The authors' detection fixtures (`fixtures/official_denseclip_det_*`) as models and inputs, for the detection
tests: each fixture's tiny config (its `tiny_overrides`), the model holding its parameters, its test inputs."""

import json
from functools import cache
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTokenizer

import denseclip_hf
from denseclip_hf import (
    DenseClipForInstanceSegmentation,
    DenseClipForObjectDetection,
    DenseClipMaskRCNNConfig,
    DenseClipResNetConfig,
    DenseClipRetinaNetConfig,
    tokenize_class_names,
)
from denseclip_hf.convert_denseclip_original_to_hf import convert_authors_detection_state_dict

FIXTURES = Path(__file__).parent / "fixtures"
DETECTORS = ["retinanet", "maskrcnn", "clip_retinanet", "clip_maskrcnn"]
IMAGES = [0, 1]
# The fixtures' test pipeline: img_scale=[224, 128] (mmdet's (long, short) bounds).
FIXTURE_SIZE = {"shortest_edge": 128, "longest_edge": 224}


def is_retinanet(name: str) -> bool:
    return name.endswith("retinanet")


@cache
def fixture(name: str) -> tuple[dict[str, torch.Tensor], dict]:
    stem = FIXTURES / f"official_denseclip_det_{name}"
    return load_file(f"{stem}.safetensors"), json.loads(Path(f"{stem}.json").read_text())


def authors_state_dict(name: str) -> dict[str, torch.Tensor]:
    tensors, _ = fixture(name)
    return {key[len("state_dict.") :]: value for key, value in tensors.items() if key.startswith("state_dict.")}


def tiny_config(name: str, class_names: list[str] | None = None) -> DenseClipRetinaNetConfig | DenseClipMaskRCNNConfig:
    """The fixture's model: the authors' config with its `tiny_overrides` (written out here from the json), for the
    fixture's classes or `class_names`."""
    _, meta = fixture(name)
    sizes = meta["tiny_overrides"]
    class_names = meta["class_names"] if class_names is None else class_names
    uses_text = not name.startswith("clip_")
    settings = dict(
        vision_config=DenseClipResNetConfig(
            layers=sizes["rn_layers"], width=sizes["rn_width"], image_size=sizes["input_resolution"]
        ),
        text_config=CLIPTextConfig(
            hidden_size=sizes["text_width"],
            intermediate_size=4 * sizes["text_width"],
            num_attention_heads=sizes["text_heads"],
            num_hidden_layers=sizes["text_layers"],
            max_position_embeddings=sizes["text_context_length"],
            projection_dim=sizes["embed_dim"],
        ),
        projection_dim=sizes["embed_dim"],
        id2label=dict(enumerate(class_names)),
        prompting_type="post_model" if uses_text else "none",
        num_context_tokens=sizes["text_context_length"] - sizes["class_context_length"],
        class_name_token_length=sizes["class_context_length"],
        context_decoder_hidden_size=sizes["cd_width"],
        context_decoder_heads=sizes["cd_heads"],
        context_decoder_layers=sizes["cd_layers"],
        fpn_channels=sizes["fpn_out"],
    )
    if uses_text:
        tokenizer = CLIPTokenizer.from_pretrained(denseclip_hf.CLIP_TOKENIZER_PATH)
        settings["class_token_ids"] = tokenize_class_names(class_names, tokenizer, sizes["class_context_length"])
    if is_retinanet(name):
        return DenseClipRetinaNetConfig(head_channels=sizes["head_feat"], **settings)
    return DenseClipMaskRCNNConfig(
        rpn_channels=sizes["head_feat"],
        box_head_fc_channels=sizes["fc_out"],
        mask_head_channels=sizes["mask_conv"],
        **settings,
    )


def load_detector(name: str) -> DenseClipForObjectDetection | DenseClipForInstanceSegmentation:
    """A new model with the fixture's parameters, in eval mode (for tests that change it; `detector` is shared)."""
    model_class = DenseClipForObjectDetection if is_retinanet(name) else DenseClipForInstanceSegmentation
    model = model_class(tiny_config(name)).eval()
    model.load_state_dict(convert_authors_detection_state_dict(authors_state_dict(name), model), strict=True)
    return model


@cache
def detector(name: str) -> DenseClipForObjectDetection | DenseClipForInstanceSegmentation:
    """The fixture's model with the authors' parameters, in eval mode, shared by the tests: do not change it."""
    return load_detector(name)


def rgb_image(name: str, image: int) -> np.ndarray:
    """The fixture's original image (the authors' BGR uint8 array) as `(H, W, 3)` RGB."""
    return np.ascontiguousarray(fixture(name)[0][f"inputs.img{image}.bgr_uint8"].numpy()[..., ::-1])


def metas(name: str, image: int) -> dict[str, torch.Tensor]:
    """The authors' test input of one image as the processor's model inputs."""
    tensors, _ = fixture(name)
    return {
        "pixel_values": tensors[f"inputs.img{image}.pixel_values"],
        "image_sizes": tensors[f"meta.img{image}.img_shape"][None, :2],
        "scale_factors": tensors[f"meta.img{image}.scale_factor"][None],
        "original_sizes": tensors[f"meta.img{image}.ori_shape"][None, :2],
    }


@cache
def run(name: str, image: int):
    """The shared model's output on the fixture's test input of `image`, with hidden states."""
    with torch.no_grad():
        return detector(name)(**metas(name, image), output_hidden_states=True)
