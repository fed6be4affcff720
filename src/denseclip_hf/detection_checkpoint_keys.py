"""The DenseCLIP authors' detection checkpoint keys (mmdet 2.x `DenseCLIP_RetinaNet`, `DenseCLIP_MaskRCNN` and the
CLIP baselines' `RetinaNet` / `MaskRCNN`) -> the keys of `DenseClipForObjectDetection` /
`DenseClipForInstanceSegmentation`, with the key-mapping mechanism of `checkpoint_conversion` (every source key
consumed exactly once, the result checked against the model's shapes).

Their image encoder, text encoder, contexts, context decoder and gamma have the names of their segmentation
checkpoints (`base_model_rules`); the detector parts map as follows (mmcv's `ConvModule` wrappers `.conv` dropped):

    neck.lateral_convs.{i}.conv.*            -> fpn.lateral_convs.{i}.*      (input level start_level + i)
    neck.fpn_convs.{i}.conv.*, i < inputs    -> fpn.fpn_convs.{i}.*
    neck.fpn_convs.{i}.conv.*, i >= inputs   -> fpn.extra_convs.{i - inputs}.*  (RetinaNet's P6 on C5', P7)
    bbox_head.cls_convs.{i}.conv.*           -> head.class_convs.{i}.*
    bbox_head.reg_convs.{i}.conv.*           -> head.box_convs.{i}.*
    bbox_head.retina_cls.*                   -> head.classifier.*
    bbox_head.retina_reg.*                   -> head.box_regressor.*
    rpn_head.rpn_conv.*                      -> rpn.conv.*
    rpn_head.rpn_cls.*                       -> rpn.objectness.*
    rpn_head.rpn_reg.*                       -> rpn.box_regressor.*
    roi_head.bbox_head.shared_fcs.{i}.*      -> box_head.shared_fcs.{i}.*
    roi_head.bbox_head.fc_cls.*              -> box_head.classifier.*     (background last, as theirs)
    roi_head.bbox_head.fc_reg.*              -> box_head.box_regressor.*
    roi_head.mask_head.convs.{i}.conv.*      -> mask_head.convs.{i}.*
    roi_head.mask_head.upsample.*            -> mask_head.upsample.*
    roi_head.mask_head.conv_logits.*         -> mask_head.classifier.*

Part of the installed package (the converter of the authors' detection checkpoints builds on it), not of saved
models.
"""

import re

import torch
from torch import nn

from .checkpoint_conversion import (
    Rule,
    check_converted,
    clip_image_tower,
    convert_keys,
    count_indexed,
    rename,
    shapes_of,
)
from .convert_denseclip_original_to_hf import base_model_rules, has_text


def _fpn_conv(inputs: int):
    """`neck.fpn_convs.{i}`: the output convolution of input level i, or (i >= inputs) extra level i - inputs."""

    def target(match: re.Match) -> str:
        index = int(match[1])
        if index < inputs:
            return f"fpn.fpn_convs.{index}.{match[2]}"
        return f"fpn.extra_convs.{index - inputs}.{match[2]}"

    return target


def authors_detection_rules(state_dict: dict[str, torch.Tensor]) -> list[Rule]:
    """The rules that map an authors' detection state dict (RetinaNet or Mask R-CNN, DenseCLIP or CLIP baseline,
    found from its keys) to the detectors' keys (see the module docstring)."""
    family = clip_image_tower(state_dict, "backbone.").family
    inputs = count_indexed(state_dict, r"neck\.lateral_convs\.(\d+)\.", "FPN input levels")
    tensor = r"\.(weight|bias)"
    return [
        *base_model_rules(family, has_text(state_dict)),
        (r"neck\.lateral_convs\.(\d+)\.conv" + tensor, rename(r"fpn.lateral_convs.\1.\2")),
        (r"neck\.fpn_convs\.(\d+)\.conv" + tensor, rename(_fpn_conv(inputs))),
        (r"bbox_head\.cls_convs\.(\d+)\.conv" + tensor, rename(r"head.class_convs.\1.\2")),
        (r"bbox_head\.reg_convs\.(\d+)\.conv" + tensor, rename(r"head.box_convs.\1.\2")),
        (r"bbox_head\.retina_cls" + tensor, rename(r"head.classifier.\1")),
        (r"bbox_head\.retina_reg" + tensor, rename(r"head.box_regressor.\1")),
        (r"rpn_head\.rpn_conv" + tensor, rename(r"rpn.conv.\1")),
        (r"rpn_head\.rpn_cls" + tensor, rename(r"rpn.objectness.\1")),
        (r"rpn_head\.rpn_reg" + tensor, rename(r"rpn.box_regressor.\1")),
        (r"roi_head\.bbox_head\.shared_fcs\.(\d+)" + tensor, rename(r"box_head.shared_fcs.\1.\2")),
        (r"roi_head\.bbox_head\.fc_cls" + tensor, rename(r"box_head.classifier.\1")),
        (r"roi_head\.bbox_head\.fc_reg" + tensor, rename(r"box_head.box_regressor.\1")),
        (r"roi_head\.mask_head\.convs\.(\d+)\.conv" + tensor, rename(r"mask_head.convs.\1.\2")),
        (r"roi_head\.mask_head\.upsample" + tensor, rename(r"mask_head.upsample.\1")),
        (r"roi_head\.mask_head\.conv_logits" + tensor, rename(r"mask_head.classifier.\1")),
    ]


def convert_authors_detection_state_dict(
    state_dict: dict[str, torch.Tensor], model: nn.Module, source: str = "The detection checkpoint"
) -> dict[str, torch.Tensor]:
    """An authors' detection state dict (its `state_dict`, keys without `module.`) in `model`'s key layout, ready for
    `model.load_state_dict(..., strict=True)`; a `ValueError` naming every unknown, missing or misshapen key."""
    converted = convert_keys(state_dict, authors_detection_rules(state_dict), source)
    check_converted(converted, shapes_of(model), source)
    return converted


__all__ = ["authors_detection_rules", "convert_authors_detection_state_dict"]
