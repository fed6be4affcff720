"""DenseCLIP detectors (Rao et al., CVPR 2022, Tables 3-4): RetinaNet for object detection and Mask R-CNN for instance
segmentation, exact to the authors' code (mmdet 2.28 / mmcv 1.7 semantics), and their CLIP-only baselines.

Both read the language-guided pyramid of `DenseClipModel` (CLIP ResNet, text tower, post-model prompting, the score
map joined to C5 as cos / tau, the attention pool's positions cropped) through an FPN:

    pixels -> DenseClipModel -> [C2, C3, C4, [C5, s / tau]] -> FPN -> RetinaNet head -> dense detections
                                                                -> RPN -> proposals -> RoIAlign -> box head -> boxes
                                                                        boxes -> RoIAlign -> mask head -> masks

The test-time post-processing (mmdet's `simple_test`: selection, decoding, rescaling, NMS) is part of the forward and
written as plain functions (`dense_detections`, `rpn_proposals`, `rcnn_detections`) on one image's head outputs. Box
coding, NMS and RoIAlign are `box_ops`. With `labels` the forward also computes the authors' training losses (mmdet's
`forward_train`: anchor / R-CNN / mask targets and losses from `loss_denseclip_detection`, Eq. 8 from
`loss_denseclip`). Modules and weights:

    DenseClipForObjectDetection (RetinaNet)           DenseClipForInstanceSegmentation (Mask R-CNN)
    ├── denseclip: DenseClipModel                     ├── denseclip: DenseClipModel
    ├── fpn: DenseClipFPN  (C3-C5, P6/P7 convs)       ├── fpn: DenseClipFPN  (C2-C5, P6 max-pool)
    └── head: DenseClipRetinaHead                     ├── rpn: DenseClipRPNHead
        class_convs.{i}, box_convs.{i},               │   conv, objectness, box_regressor
        classifier, box_regressor                     ├── box_head: DenseClipBoxHead
                                                      │   shared_fcs.{0,1}, classifier (background last), box_regressor
                                                      └── mask_head: DenseClipMaskHead
                                                          convs.{i}, upsample, classifier

Shipped with saved models as remote code (flat relative imports of its siblings only).
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_IMAGE_SEGMENTATION_MAPPING_NAMES,
    MODEL_FOR_INSTANCE_SEGMENTATION_MAPPING_NAMES,
    MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES,
)
from transformers.utils import ModelOutput
from transformers.utils.generic import can_return_tuple

from .box_ops import (
    AnchorGenerator,
    MaxIoUAssigner,
    RandomSampler,
    SamplingResult,
    batched_nms,
    boxes_to_rois,
    decode_deltas,
    multi_level_roi_align,
    sampled_rois,
)
from .configuration_denseclip_detection import (
    DenseClipDetectionConfig,
    DenseClipMaskRCNNConfig,
    DenseClipRetinaNetConfig,
)
from .loading_denseclip import declare_pipeline_support
from .loss_denseclip import detection_score_map_loss
from .loss_denseclip_detection import (
    SCORE_MAP_LOSS_NAMES,
    anchor_head_losses,
    anchor_targets,
    detection_loss_names,
    mask_loss,
    mask_targets,
    rcnn_losses,
    rcnn_targets,
    total_detection_loss,
)
from .modeling_denseclip import DenseClipFPN, DenseClipModel, DenseClipModelOutput, DenseClipPreTrainedModel

# Training: each image's anchors are those inside its `image_size` padded to a multiple of this (mmdet's `pad_shape`
# with the authors' `Pad(size_divisor=32)`, the processor's default `size_divisor`); the batch grid beyond is padding.
PAD_SIZE_DIVISOR = 32


# ---------------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class DenseClipDetectionOutput(ModelOutput):
    r"""
    What both DenseCLIP detectors return. Per-image results are tuples with one tensor per image (images have
    different numbers of detections), each sorted by decreasing score (the authors' order before `bbox2result`).
    In training mode with `labels` the forward stops after the losses, as mmdet's `forward_train`: the detections
    (`pred_boxes`, `scores`, `labels`, `frame_sizes`, and Mask R-CNN's masks and test-time proposals) are `None`.

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned with `labels`):
            The training loss: the sum of the `loss_dict` entries whose key contains "loss" (mmdet's `_parse_losses`),
            each weighted by its `config.*_loss_weight`.
        loss_dict (`dict[str, torch.FloatTensor]`, *optional*, returned with `labels`):
            The scalar terms under the keys of the authors' mmdet logs (`detection_loss_names`), per-level terms
            summed. RetinaNet: `loss_cls` (focal), `loss_bbox` (L1), `loss_seg` (Eq. 8); Mask R-CNN: `loss_rpn_cls`,
            `loss_rpn_bbox`, `loss_cls`, `acc` (the box head's accuracy in percent, logged, not in `loss`),
            `loss_bbox`, `loss_mask`, `loss_aux_seg` (Eq. 8). The CLIP baselines have no Eq. 8 term.
        level_losses (`dict[str, tuple(torch.FloatTensor)]`, *optional*, returned with `labels`):
            The anchor head's terms per FPN level (RetinaNet: `loss_cls`, `loss_bbox` on P3-P7; Mask R-CNN:
            `loss_rpn_cls`, `loss_rpn_bbox` on P2-P6), weighted; `loss_dict` holds their sums.
        pred_boxes (`tuple(torch.FloatTensor)`):
            Per image `(n_i, 4)` boxes `(x1, y1, x2, y2)` in pixels of the frame given by `frame_sizes`: the
            original image when the model got `scale_factors` (the authors' `rescale=True`), else the input image.
        scores (`tuple(torch.FloatTensor)`):
            Per image `(n_i,)` scores (sigmoid for RetinaNet, softmax for Mask R-CNN), above `config.score_threshold`.
        labels (`tuple(torch.LongTensor)`):
            Per image `(n_i,)` class indices into `config.id2label`.
        frame_sizes (`torch.LongTensor` of shape `(batch, 2)`):
            `(height, width)` of each image's frame of `pred_boxes` (and of the pasted masks): `original_sizes`
            with `scale_factors` (derived as `image_size / scale` when not given), else `image_sizes`.
        feature_maps (`tuple(torch.FloatTensor)`):
            The FPN levels `(batch, fpn_channels, h_l, w_l)` the heads read (RetinaNet: P3-P7, strides 8-128;
            Mask R-CNN: P2-P6, strides 4-64).
        score_map (`torch.FloatTensor` of shape `(batch, num_labels, H / 32, W / 32)`):
            Pixel-text cosine similarities s (Eq. 2); the pyramid was joined with `s / temperature`. `None` for the
            CLIP baselines (`prompting_type="none"`), as `text_embeddings`.
        text_embeddings (`torch.FloatTensor` of shape `(batch, num_labels, projection_dim)`):
            Class text embeddings t after post-model prompting (Eq. 6).
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned with `output_hidden_states`):
            The image encoder's stem and its 4 levels C2-C5 before the score map is joined.
    """

    loss: torch.FloatTensor | None = None
    loss_dict: dict[str, torch.FloatTensor] | None = None
    level_losses: dict[str, tuple[torch.FloatTensor, ...]] | None = None
    pred_boxes: tuple[torch.FloatTensor, ...] | None = None
    scores: tuple[torch.FloatTensor, ...] | None = None
    labels: tuple[torch.LongTensor, ...] | None = None
    frame_sizes: torch.LongTensor | None = None
    feature_maps: tuple[torch.FloatTensor, ...] | None = None
    score_map: torch.FloatTensor | None = None
    text_embeddings: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class DenseClipObjectDetectionOutput(DenseClipDetectionOutput):
    r"""
    Output of [`DenseClipForObjectDetection`] (RetinaNet): the fields of `DenseClipDetectionOutput`, and the head's
    outputs on every FPN level (for training and inspection).

    Args:
        class_logits (`tuple(torch.FloatTensor)`):
            Per FPN level `(batch, num_anchors * num_labels, h_l, w_l)` classification logits (before the sigmoid),
            channel `a * num_labels + c` for anchor `a` (ratio-major: `a = ratio_index * scales + scale_index`).
        box_deltas (`tuple(torch.FloatTensor)`):
            Per FPN level `(batch, num_anchors * 4, h_l, w_l)` box deltas `(dx, dy, dw, dh)`, channel `a * 4 + k`.
    """

    class_logits: tuple[torch.FloatTensor, ...] | None = None
    box_deltas: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class DenseClipInstanceSegmentationOutput(DenseClipDetectionOutput):
    r"""
    Output of [`DenseClipForInstanceSegmentation`] (Mask R-CNN): the fields of `DenseClipDetectionOutput`, the masks,
    and the intermediate outputs of the RPN and the box head (for training and inspection).

    Args:
        pred_masks (`tuple(torch.FloatTensor)`):
            Per image `(n_i, M, M)` mask probabilities (M = `2 * mask_roi_size`, 28) of each detection's class, in
            its box `mask_boxes`; `post_process_instance_segmentation` pastes them onto the image.
        mask_boxes (`tuple(torch.FloatTensor)`):
            Per image `(n_i, 4)` boxes the masks are pasted into, in the frame of `pred_boxes`: the mask RoIs
            (`pred_boxes * scale_factor`, the input frame) divided by the scale factor again, as the authors' paste.
        rpn_objectness (`tuple(torch.FloatTensor)`):
            Per FPN level `(batch, num_anchors, h_l, w_l)` objectness logits (before the sigmoid).
        rpn_box_deltas (`tuple(torch.FloatTensor)`):
            Per FPN level `(batch, num_anchors * 4, h_l, w_l)` RPN box deltas.
        proposals (`tuple(torch.FloatTensor)`):
            Per image `(p_i, 5)` proposals `(x1, y1, x2, y2, objectness)` in the input frame, by decreasing score.
        roi_class_logits (`tuple(torch.FloatTensor)`):
            Per image `(p_i, num_labels + 1)` box-head logits of the proposals (before the softmax), background last.
        roi_box_deltas (`tuple(torch.FloatTensor)`):
            Per image `(p_i, 4 * num_labels)` class-specific box deltas of the proposals, column `4 * c + k`.
    """

    pred_masks: tuple[torch.FloatTensor, ...] | None = None
    mask_boxes: tuple[torch.FloatTensor, ...] | None = None
    rpn_objectness: tuple[torch.FloatTensor, ...] | None = None
    rpn_box_deltas: tuple[torch.FloatTensor, ...] | None = None
    proposals: tuple[torch.FloatTensor, ...] | None = None
    roi_class_logits: tuple[torch.FloatTensor, ...] | None = None
    roi_box_deltas: tuple[torch.FloatTensor, ...] | None = None


# ---------------------------------------------------------------------------------------------------------------------
# Test-time post-processing of one image (mmdet 2.28's `simple_test` steps)
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class ImageFrame:
    """One image's geometry: `image_size` `(h, w)` of the resized image inside the (padded) input, where boxes are
    clipped; `scale_factor` `(4,)` float32 `(w_scale, h_scale, w_scale, h_scale)` from the original image to it, or
    `None` (boxes stay in the input frame); `frame_size` `(h, w)` of the frame the boxes end in."""

    image_size: tuple[int, int]
    scale_factor: torch.Tensor | None
    frame_size: tuple[int, int]


def _empty_detections(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return like.new_zeros(0, 4), like.new_zeros(0), torch.zeros(0, dtype=torch.long, device=like.device)


def dense_detections(
    class_logits: Sequence[torch.Tensor],
    box_deltas: Sequence[torch.Tensor],
    anchors: Sequence[torch.Tensor],
    frame: ImageFrame,
    *,
    score_threshold: float,
    nms_pre: int,
    iou_threshold: float,
    max_detections: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RetinaNet's test post-processing of one image (mmdet 2.28 `BaseDenseHead._get_bboxes_single` and
    `_bbox_post_process`, `rescale=True`).

    Per level `class_logits[l]` `(A * K, h, w)`, `box_deltas[l]` `(A * 4, h, w)` and `anchors[l]` `(h * w * A, 4)`
    (rows `(y, x, a)`): sigmoid, the (anchor, class) pairs scoring above `score_threshold` (strictly), the
    `nms_pre` best of them by `sort(descending=True)`, their anchors decoded and clipped to `frame.image_size`. All
    levels' boxes are divided by `frame.scale_factor` (when given) before the class-wise `batched_nms`, and the
    `max_detections` best are kept. Returns float32 `boxes (n, 4)`, `scores (n,)`, int64 `labels (n,)`.
    """
    boxes, scores, labels = [], [], []
    for logits, deltas, priors in zip(class_logits, box_deltas, anchors, strict=True):
        num_classes = logits.shape[0] * 4 // deltas.shape[0]
        level_scores = logits.float().permute(1, 2, 0).reshape(-1, num_classes).sigmoid()
        level_deltas = deltas.float().permute(1, 2, 0).reshape(-1, 4)
        above = level_scores > score_threshold
        pairs = above.nonzero()
        ranked, order = level_scores[above].sort(descending=True)
        rows, classes = pairs[order[:nms_pre]].unbind(1)
        boxes.append(decode_deltas(priors[rows], level_deltas[rows], max_shape=frame.image_size))
        scores.append(ranked[:nms_pre])
        labels.append(classes)
    boxes, scores, labels = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
    if frame.scale_factor is not None:
        boxes = boxes / frame.scale_factor.to(boxes)
    if boxes.shape[0] == 0:
        return _empty_detections(boxes)
    detections, keep = batched_nms(boxes, scores, labels, iou_threshold)
    return detections[:max_detections, :4], detections[:max_detections, 4], labels[keep[:max_detections]]


def rpn_proposals(
    objectness: Sequence[torch.Tensor],
    box_deltas: Sequence[torch.Tensor],
    anchors: Sequence[torch.Tensor],
    image_size: tuple[int, int],
    *,
    nms_pre: int,
    max_proposals: int,
    iou_threshold: float,
    min_box_size: float,
) -> torch.Tensor:
    """The RPN's proposals of one image (mmdet 2.28 `RPNHead._get_bboxes_single` and `_bbox_post_process`).

    Per level `objectness[l]` `(A, h, w)`, `box_deltas[l]` `(A * 4, h, w)`, `anchors[l]` `(h * w * A, 4)`: sigmoid;
    when the level has more than `nms_pre` anchors, the `nms_pre` best by `sort(descending=True)`. The anchors are
    decoded and clipped to `image_size`; boxes not wider and taller than `min_box_size` are dropped; NMS runs per
    level (`batched_nms` with the level as class); the `max_proposals` best are kept. Returns `(p, 5)` float32
    `(x1, y1, x2, y2, score)` in the input frame (never rescaled), by decreasing score.
    """
    scores, deltas, priors, levels = [], [], [], []
    for level, (logits, level_deltas, level_anchors) in enumerate(zip(objectness, box_deltas, anchors, strict=True)):
        level_scores = logits.float().permute(1, 2, 0).reshape(-1).sigmoid()
        level_deltas = level_deltas.float().permute(1, 2, 0).reshape(-1, 4)
        if 0 < nms_pre < level_scores.shape[0]:
            level_scores, order = level_scores.sort(descending=True)
            level_scores, order = level_scores[:nms_pre], order[:nms_pre]
            level_deltas, level_anchors = level_deltas[order], level_anchors[order]
        scores.append(level_scores)
        deltas.append(level_deltas)
        priors.append(level_anchors)
        levels.append(torch.full_like(level_scores, level, dtype=torch.long))
    scores, levels = torch.cat(scores), torch.cat(levels)
    proposals = decode_deltas(torch.cat(priors), torch.cat(deltas), max_shape=image_size)
    sizes = proposals[:, 2:] - proposals[:, :2]
    valid = (sizes > min_box_size).all(1)
    proposals, scores, levels = proposals[valid], scores[valid], levels[valid]
    if proposals.shape[0] == 0:
        return proposals.new_zeros(0, 5)
    return batched_nms(proposals, scores, levels, iou_threshold)[0][:max_proposals]


def rcnn_detections(
    proposals: torch.Tensor,
    class_logits: torch.Tensor,
    box_deltas: torch.Tensor,
    frame: ImageFrame,
    *,
    box_coder_stds: Sequence[float],
    score_threshold: float,
    iou_threshold: float,
    max_detections: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The box head's detections of one image (mmdet 2.28 `BBoxHead.get_bboxes` + `multiclass_nms`,
    `rescale=True`).

    `proposals` `(p, 4)` in the input frame, `class_logits` `(p, K + 1)` (background last), `box_deltas` `(p, 4K)`:
    softmax; each proposal decoded with each class's deltas (times `box_coder_stds`) and clipped to
    `frame.image_size`; divided by `frame.scale_factor` (when given); the (proposal, class) pairs scoring above
    `score_threshold` (strictly, background excluded) go through the class-wise `batched_nms`; the `max_detections`
    best are kept. Returns float32 `boxes (n, 4)`, `scores (n,)`, int64 `labels (n,)`.
    """
    num_classes = class_logits.shape[1] - 1
    if proposals.shape[0] == 0:
        return _empty_detections(box_deltas.float())
    scores = class_logits.float().softmax(-1)[:, :-1]
    boxes = decode_deltas(proposals.float(), box_deltas.float(), stds=box_coder_stds, max_shape=frame.image_size)
    boxes = boxes.view(-1, num_classes, 4)
    if frame.scale_factor is not None:
        boxes = boxes / frame.scale_factor.to(boxes)
    labels = torch.arange(num_classes, device=boxes.device).repeat(scores.shape[0])
    boxes, scores = boxes.reshape(-1, 4), scores.reshape(-1)
    valid = (scores > score_threshold).nonzero().view(-1)
    boxes, scores, labels = boxes[valid], scores[valid], labels[valid]
    if boxes.shape[0] == 0:
        return _empty_detections(boxes)
    detections, keep = batched_nms(boxes, scores, labels, iou_threshold)
    return detections[:max_detections, :4], detections[:max_detections, 4], labels[keep[:max_detections]]


# ---------------------------------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------------------------------


def _as_rows(value: Any, name: str, batch: int, width: int, integer: bool) -> torch.Tensor:
    """`value` (tensor, array or nested list) as a CPU `(batch, width)` tensor, or a `TypeError` / `ValueError`."""
    try:
        rows = torch.as_tensor(value).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"{name} must be a tensor (batch, {width}), got {type(value).__name__}.") from error
    if rows.ndim == 1 and batch == 1:
        rows = rows[None]
    if rows.ndim != 2 or tuple(rows.shape) != (batch, width):
        raise ValueError(
            f"{name} must have shape (batch={batch}, {width}), one row per image of pixel_values, got "
            f"{tuple(rows.shape)}: pass the image processor's output unchanged."
        )
    if integer and (rows.is_floating_point() and not bool((rows == rows.round()).all()) or rows.is_complex()):
        raise TypeError(f"{name} must hold integer sizes (height, width), got {rows.tolist()}.")
    if not bool(torch.isfinite(rows.double()).all()) or not bool((rows > 0).all()):
        raise ValueError(f"{name} must be positive and finite, got {rows.tolist()}.")
    return rows.long() if integer else rows.float()


def image_frames(
    pixel_values: torch.Tensor,
    image_sizes: Any = None,
    scale_factors: Any = None,
    original_sizes: Any = None,
) -> list[ImageFrame]:
    """Each image's `ImageFrame` from the processor's metas (see the detectors' `forward`): without `image_sizes`
    the input's own size, without `scale_factors` the input frame. A `ValueError` for sizes larger than the input,
    or `original_sizes` without `scale_factors` (nothing would map the boxes to them)."""
    batch, _, height, width = pixel_values.shape
    if image_sizes is None:
        sizes = [(height, width)] * batch
    else:
        sizes = [tuple(row) for row in _as_rows(image_sizes, "image_sizes", batch, 2, integer=True).tolist()]
        if any(h > height or w > width for h, w in sizes):
            raise ValueError(
                f"image_sizes {sizes} exceed the input's (height, width) = ({height}, {width}): each is the size of "
                "an image inside the padded input (the processor's `image_sizes`)."
            )
    if scale_factors is None:
        if original_sizes is not None:
            raise ValueError(
                "original_sizes without scale_factors: boxes go back to the original images by the scale factors; "
                "pass the processor's scale_factors too (or neither, for boxes in the input frame)."
            )
        return [ImageFrame(size, None, size) for size in sizes]
    factors = _as_rows(scale_factors, "scale_factors", batch, 4, integer=False)
    if original_sizes is None:
        originals = [
            (max(1, round(h / float(factor[1]))), max(1, round(w / float(factor[0]))))
            for (h, w), factor in zip(sizes, factors, strict=True)
        ]
    else:
        originals = [tuple(row) for row in _as_rows(original_sizes, "original_sizes", batch, 2, True).tolist()]
    device = pixel_values.device
    return [
        ImageFrame(size, factor.to(device), original)
        for size, factor, original in zip(sizes, factors, originals, strict=True)
    ]


def check_detection_labels(
    labels: Any,
    batch: int,
    num_labels: int,
    image_sizes: Sequence[tuple[int, int]] | None = None,
    input_size: tuple[int, int] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """The entry check of a detector's `labels`: one dict per image (the processor's `labels`) with `class_labels`
    `(n,)` class indices in `0..num_labels-1`, `boxes` `(n, 4)` `(x1, y1, x2, y2)` in the input frame with
    `x2 > x1` and `y2 > y1`, and optionally `masks` `(n, H, W)`: with `image_sizes` (each image's `(h, w)`) and
    `input_size` (the padded input's), masks must cover their image (`H >= h`, `W >= w`) and fit in the input (the
    processor pads them like the image). Returns the dicts with tensors; otherwise a `TypeError` / `ValueError` naming
    the image and the problem.

    Zero-size boxes are rejected: they have no box regression target (`log(0)` in the deltas), and mmdet's assigners
    would make them every anchor's match (RetinaNet's `min_pos_iou=0`) or a proposal of their own (R-CNN), so the
    authors' losses would be infinite or NaN. Their COCO loader, as `DenseClipDetectionImageProcessor`, drops boxes
    under one pixel."""
    if not isinstance(labels, (list, tuple)) or len(labels) != batch:
        raise TypeError(
            f"labels must be a list with one dict per image ({batch}), got {type(labels).__name__}"
            + (f" of length {len(labels)}" if isinstance(labels, (list, tuple)) else "")
            + ": pass the image processor's `labels`."
        )
    checked = []
    for index, target in enumerate(labels):
        if not hasattr(target, "keys") or not {"class_labels", "boxes"} <= set(target.keys()):
            raise TypeError(f"labels[{index}] must be a dict with 'class_labels' and 'boxes' (and 'masks').")
        classes, boxes = torch.as_tensor(target["class_labels"]), torch.as_tensor(target["boxes"])
        if classes.is_floating_point() or classes.ndim != 1:
            raise ValueError(f"labels[{index}]['class_labels'] must be (n,) integer class ids, got {classes.dtype}.")
        if boxes.ndim != 2 or boxes.shape != (len(classes), 4) or not boxes.is_floating_point():
            raise ValueError(
                f"labels[{index}]['boxes'] must be float (n={len(classes)}, 4) boxes (x1, y1, x2, y2), got "
                f"{tuple(boxes.shape)} {boxes.dtype}."
            )
        if len(classes) and not (0 <= int(classes.min()) and int(classes.max()) < num_labels):
            raise ValueError(
                f"labels[{index}]['class_labels'] must be in 0..{num_labels - 1}, got {classes.tolist()}."
            )
        if not bool(torch.isfinite(boxes).all()) or bool((boxes[:, 2:] <= boxes[:, :2]).any()):
            raise ValueError(
                f"labels[{index}]['boxes'] must be finite (x1, y1, x2, y2) with x2 > x1 and y2 > y1, got "
                f"{boxes.tolist()[:5]}: zero-size boxes have no regression target; drop them (the processor drops "
                "boxes under one pixel, as the authors' COCO loader)."
            )
        entry = {"class_labels": classes.long(), "boxes": boxes}
        if "masks" in target.keys() and target["masks"] is not None:
            masks = torch.as_tensor(target["masks"])
            if masks.ndim != 3 or masks.shape[0] != len(classes):
                raise ValueError(
                    f"labels[{index}]['masks'] must be (n={len(classes)}, H, W), got {tuple(masks.shape)}."
                )
            if image_sizes is not None and input_size is not None:
                (height, width), (max_height, max_width) = image_sizes[index], input_size
                if not (height <= masks.shape[1] <= max_height and width <= masks.shape[2] <= max_width):
                    raise ValueError(
                        f"labels[{index}]['masks'] are {tuple(masks.shape[1:])} pixels: they must cover the image "
                        f"({height}, {width}) and fit in the input ({max_height}, {max_width}), in the input frame "
                        "as the boxes (the processor's masks are padded like the image)."
                    )
            entry["masks"] = masks
        checked.append(entry)
    return checked


# ---------------------------------------------------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------------------------------------------------


def init_like_conv_module(conv: nn.Module) -> None:
    """mmcv `ConvModule`'s own init (what the authors' FPN, RetinaHead and FCN mask head convolutions trained from:
    their training script never applies the heads' init configs): Kaiming normal, fan-out, ReLU gain; zero bias."""
    init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    init.zeros_(conv.bias)


def init_like_pytorch(layer: nn.Module) -> None:
    """PyTorch's default init of a convolution / linear layer (the authors' plain `nn.Conv2d`, `nn.Linear` and
    `nn.ConvTranspose2d` layers: RetinaNet's outputs, the RPN, the box head, the mask head's upsampling and output)."""
    init.kaiming_uniform_(layer.weight, a=math.sqrt(5))
    fan_in = nn.init._calculate_fan_in_and_fan_out(layer.weight)[0]
    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    init.uniform_(layer.bias, -bound, bound)


class DenseClipRetinaHead(nn.Module):
    """RetinaNet's head, shared by every FPN level: two branches of `head_stacked_convs` 3x3 conv + ReLU layers, then
    a 3x3 conv to `num_anchors * num_labels` class logits and one to `num_anchors * 4` box deltas."""

    def __init__(self, config: DenseClipRetinaNetConfig):
        super().__init__()
        channels, hidden = config.fpn_channels, config.head_channels
        widths = [channels] + [hidden] * (config.head_stacked_convs - 1)
        self.class_convs = nn.ModuleList(nn.Conv2d(width, hidden, 3, padding=1) for width in widths)
        self.box_convs = nn.ModuleList(nn.Conv2d(width, hidden, 3, padding=1) for width in widths)
        self.classifier = nn.Conv2d(hidden, config.num_anchors * config.num_labels, 3, padding=1)
        self.box_regressor = nn.Conv2d(hidden, config.num_anchors * 4, 3, padding=1)

    def _init_denseclip_weights(self) -> None:
        for conv in [*self.class_convs, *self.box_convs]:
            init_like_conv_module(conv)
        init_like_pytorch(self.classifier)
        init_like_pytorch(self.box_regressor)

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """FPN levels `(batch, fpn_channels, h_l, w_l)` -> per level class logits `(batch, A * K, h_l, w_l)` and box
        deltas `(batch, A * 4, h_l, w_l)`."""
        class_logits, box_deltas = [], []
        for feature in features:
            class_features, box_features = feature, feature
            for class_conv, box_conv in zip(self.class_convs, self.box_convs, strict=True):
                class_features = F.relu(class_conv(class_features))
                box_features = F.relu(box_conv(box_features))
            class_logits.append(self.classifier(class_features))
            box_deltas.append(self.box_regressor(box_features))
        return tuple(class_logits), tuple(box_deltas)


class DenseClipRPNHead(nn.Module):
    """The region proposal network's head, shared by every FPN level: a 3x3 conv + ReLU, then 1x1 convs to
    `num_anchors` objectness logits and `num_anchors * 4` box deltas."""

    def __init__(self, config: DenseClipMaskRCNNConfig):
        super().__init__()
        self.conv = nn.Conv2d(config.fpn_channels, config.rpn_channels, 3, padding=1)
        self.objectness = nn.Conv2d(config.rpn_channels, config.num_anchors, 1)
        self.box_regressor = nn.Conv2d(config.rpn_channels, config.num_anchors * 4, 1)

    def _init_denseclip_weights(self) -> None:
        for layer in (self.conv, self.objectness, self.box_regressor):
            init_like_pytorch(layer)

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """FPN levels -> per level objectness `(batch, A, h_l, w_l)` and box deltas `(batch, A * 4, h_l, w_l)`."""
        hidden_states = [F.relu(self.conv(feature)) for feature in features]
        return (
            tuple(self.objectness(states) for states in hidden_states),
            tuple(self.box_regressor(states) for states in hidden_states),
        )


class DenseClipBoxHead(nn.Module):
    """Mask R-CNN's box head (mmdet `Shared2FCBBoxHead`): the flattened `(p, C, 7, 7)` RoI features through two
    fully connected + ReLU layers, then `num_labels + 1` class logits (background last) and `4 * num_labels`
    class-specific box deltas."""

    def __init__(self, config: DenseClipMaskRCNNConfig):
        super().__init__()
        width = config.box_head_fc_channels
        self.shared_fcs = nn.ModuleList(
            [nn.Linear(config.fpn_channels * config.box_roi_size**2, width), nn.Linear(width, width)]
        )
        self.classifier = nn.Linear(width, config.num_labels + 1)
        self.box_regressor = nn.Linear(width, 4 * config.num_labels)

    def _init_denseclip_weights(self) -> None:
        for layer in (*self.shared_fcs, self.classifier, self.box_regressor):
            init_like_pytorch(layer)

    def forward(self, roi_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(p, C, S, S)` -> class logits `(p, K + 1)` and box deltas `(p, 4K)`."""
        hidden_states = roi_features.flatten(1)
        for fc in self.shared_fcs:
            hidden_states = F.relu(fc(hidden_states))
        return self.classifier(hidden_states), self.box_regressor(hidden_states)


class DenseClipMaskHead(nn.Module):
    """Mask R-CNN's mask head (mmdet `FCNMaskHead`): `mask_head_convs` 3x3 conv + ReLU layers, a 2x transposed
    convolution + ReLU, and a 1x1 conv to one mask logit map per class: `(n, C, 14, 14)` -> `(n, K, 28, 28)`."""

    def __init__(self, config: DenseClipMaskRCNNConfig):
        super().__init__()
        channels = config.mask_head_channels
        widths = [config.fpn_channels] + [channels] * (config.mask_head_convs - 1)
        self.convs = nn.ModuleList(nn.Conv2d(width, channels, 3, padding=1) for width in widths)
        self.upsample = nn.ConvTranspose2d(channels, channels, 2, stride=2)
        self.classifier = nn.Conv2d(channels, config.num_labels, 1)

    def _init_denseclip_weights(self) -> None:
        for conv in self.convs:
            init_like_conv_module(conv)
        init_like_pytorch(self.upsample)
        init_like_pytorch(self.classifier)

    def forward(self, roi_features: torch.Tensor) -> torch.Tensor:
        hidden_states = roi_features
        for conv in self.convs:
            hidden_states = F.relu(conv(hidden_states))
        return self.classifier(F.relu(self.upsample(hidden_states)))


# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------


class DenseClipDetectionPreTrainedModel(DenseClipPreTrainedModel):
    """What both detectors share: `DenseClipModel` (the language-guided pyramid), the FPN on it, the image metas and
    the outputs' common fields. `extra_level_convs` says how the FPN makes its levels beyond stride 32: stride-2
    convolutions (RetinaNet) or max-pooling (Mask R-CNN). The FPN's levels follow the anchor strides
    (`config.fpn_levels`).

    The Auto classes a saved folder names (`auto_map`, for loading with `trust_remote_code=True`) are
    `auto_classes`: the pipelines look a model up by theirs (`object-detection`: `AutoModelForObjectDetection`,
    `image-segmentation`: `AutoModelForImageSegmentation`). `architecture` names the detector's training losses
    (`detection_loss_names`)."""

    config_class = DenseClipDetectionConfig
    extra_level_convs: ClassVar[bool]
    auto_classes: ClassVar[tuple[str, ...]]
    architecture: ClassVar[str]

    def __init__(self, config: DenseClipDetectionConfig):
        super().__init__(config)
        self.denseclip = DenseClipModel(config)
        start_level, extra_levels = config.fpn_levels
        self.fpn = DenseClipFPN(
            self.denseclip.pyramid_channels,
            config.fpn_channels,
            start_level,
            extra_levels,
            extra_level_convs=self.extra_level_convs,
            conv_init="kaiming_normal",
        )

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`DenseClipPreTrainedModel.save_pretrained`, with every Auto class of `auto_classes` in the config's
        `auto_map` (transformers writes the one of `register_for_auto_class`)."""
        if self._auto_class is not None:
            self.config.auto_map = {
                **(getattr(self.config, "auto_map", None) or {}),
                **{
                    name: f"{type(self).__module__.split('.')[-1]}.{type(self).__name__}" for name in self.auto_classes
                },
            }
        return super().save_pretrained(save_directory, *args, **kwargs)

    def resize_position_embeddings(self, image_size: int) -> None:
        """See `DenseClipModel.resize_position_embeddings` (the authors' detectors: a 42 x 42 grid, 1344)."""
        self.denseclip.resize_position_embeddings(image_size)

    def get_text_embeddings(self, class_token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The class text embeddings t `(num_labels, projection_dim)`; see `DenseClipModel.get_text_embeddings`."""
        return self.denseclip.get_text_embeddings(class_token_ids=class_token_ids)

    def remove_text_encoder(self) -> None:
        """See `DenseClipModel.remove_text_encoder`: stores t, deletes the CLIP text tower (for deployment)."""
        self.denseclip.remove_text_encoder()

    def _features(
        self, pixel_values: torch.Tensor, output_hidden_states: bool | list[int] | None
    ) -> tuple[DenseClipModelOutput, tuple[torch.Tensor, ...]]:
        """`DenseClipModel`'s output and the FPN levels on its pyramid."""
        outputs = self.denseclip(pixel_values, output_hidden_states=output_hidden_states)
        return outputs, self.fpn(outputs.pyramid)

    def _targets(
        self, labels: Any, frames: Sequence[ImageFrame], pixel_values: torch.Tensor
    ) -> list[dict[str, torch.Tensor]] | None:
        """The checked `labels` (`check_detection_labels`) on the model's device, boxes in float32; None without."""
        if labels is None:
            return None
        sizes = [frame.image_size for frame in frames]
        checked = check_detection_labels(labels, len(frames), self.config.num_labels, sizes, pixel_values.shape[-2:])
        device = pixel_values.device
        return [
            {
                key: value.to(device, torch.float32) if key == "boxes" else value.to(device)
                for key, value in target.items()
            }
            for target in checked
        ]

    def _valid_flags(
        self, sizes: Sequence[Sequence[int]], frames: Sequence[ImageFrame], device: torch.device
    ) -> list[list[torch.Tensor]]:
        """Each image's anchors on its own part of the batch grid (mmdet's `inside_flags` with `allowed_border=-1`):
        those of cells inside its `pad_shape`, its `image_size` padded to a multiple of `PAD_SIZE_DIVISOR`."""
        return [
            self.anchor_generator.valid_flags(
                sizes, [-(-side // PAD_SIZE_DIVISOR) * PAD_SIZE_DIVISOR for side in frame.image_size], device
            )
            for frame in frames
        ]

    def _loss_outputs(
        self,
        head_losses: dict[str, torch.Tensor | list[torch.Tensor]],
        outputs: DenseClipModelOutput,
        targets: Sequence[dict[str, torch.Tensor]],
        input_size: Sequence[int],
    ) -> dict[str, Any]:
        """`loss`, `loss_dict` and `level_losses` of the output from the heads' terms (keys of
        `detection_loss_names`, per-level terms as lists) and Eq. 8 on the score map (DenseCLIP models; its target
        grid is the padded input's, `input_size // 4`, as the authors' `img.shape`), in the authors' key order."""
        config = self.config
        losses = dict(head_losses)
        if outputs.score_map is not None:
            losses[SCORE_MAP_LOSS_NAMES[self.architecture]] = config.score_map_loss_weight * detection_score_map_loss(
                outputs.score_map,
                [target["boxes"] for target in targets],
                [target["class_labels"] for target in targets],
                tuple(input_size),
                temperature=config.temperature,
            )
        names = detection_loss_names(self.architecture, score_map_loss=outputs.score_map is not None)
        losses = {name: losses[name] for name in names}
        loss, loss_dict = total_detection_loss(losses)
        level_losses = {name: tuple(value) for name, value in losses.items() if isinstance(value, list)}
        return {"loss": loss, "loss_dict": loss_dict, "level_losses": level_losses}

    def _common_outputs(
        self,
        outputs: DenseClipModelOutput,
        features: tuple[torch.Tensor, ...],
        frames: list[ImageFrame],
        detections: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None,
    ) -> dict[str, Any]:
        common = {
            "feature_maps": features,
            "score_map": outputs.score_map,
            "text_embeddings": outputs.text_embeddings,
            "hidden_states": outputs.hidden_states,
        }
        if detections is None:
            return common
        boxes, scores, labels = (tuple(parts) for parts in zip(*detections, strict=True))
        return {
            **common,
            "pred_boxes": boxes,
            "scores": scores,
            "labels": labels,
            "frame_sizes": torch.tensor([frame.frame_size for frame in frames], dtype=torch.long),
        }


_FORWARD_ARGS = r"""
        pixel_values (`torch.FloatTensor` of shape `(batch, 3, height, width)`):
            Normalized images, zero-padded at the bottom / right (`DenseClipDetectionImageProcessor`); each side at
            least 32 and, for the DenseCLIP models, at most 32 x the attention pool's grid (1344 for the authors').
            The padding is part of what the model sees (the attention pool's mean token and the context decoder read
            it), as in the authors' code: their test runs one image per batch.
        image_sizes (`torch.LongTensor` of shape `(batch, 2)`, *optional*):
            `(height, width)` of each resized image inside the padded input (mmdet `img_shape`): boxes are clipped
            to it. Default: the input's own size (no padding).
        scale_factors (`torch.FloatTensor` of shape `(batch, 4)`, *optional*):
            `(w_scale, h_scale, w_scale, h_scale)` from each original image to its resized one: with them, boxes are
            divided by them before NMS and come back in the original image's frame (the authors' `rescale=True`).
            Default: boxes in the input frame.
        original_sizes (`torch.LongTensor` of shape `(batch, 2)`, *optional*):
            `(height, width)` of the original images (with `scale_factors`): the frame of the boxes and masks
            (`frame_sizes`). Default: `image_sizes / scale`, rounded.
        labels (`list[dict]`, *optional*):
            Per image `{"class_labels": (n,), "boxes": (n, 4) (x1, y1, x2, y2) in the input frame, "masks": (n, H,
            W)}` (the processor's `labels`; Mask R-CNN needs the masks, in the input frame, padded like the image),
            checked (`check_detection_labels`: zero-size boxes are an error). With them the output has the authors'
            training losses (`loss`, `loss_dict`, `level_losses`), in eval mode too (the authors' own comparison:
            BN running statistics, no dropout). In training mode the forward then stops after the losses (no
            detections). Each image's anchors are those inside its `image_sizes` padded to a multiple of 32 (mmdet's
            `pad_shape`); Eq. 8's target grid is the padded input's (`height // 4, width // 4`). An image without
            boxes is a result: all its anchors are negatives (RetinaNet, RPN), the R-CNN sampler draws negatives
            only, and a batch without any box gives an Eq. 8 term of 0 (where the authors' code divides 0 by 0).
        generator (`torch.Generator`, *optional*):
            A CPU generator for the random samplers of Mask R-CNN's training (RPN anchors, then R-CNN proposals, image
            by image, as mmdet draws): seeded like the authors' `torch.manual_seed`, it draws the same samples on the
            same torch build. Default: torch's global generator (as mmdet). RetinaNet samples nothing.
        output_hidden_states (`bool` or `list[int]`, *optional*):
            Also return the image encoder's stem and its levels C2-C5 (see `DenseClipModel.forward`).
        return_dict (`bool`, *optional*):
            `False` returns a tuple of the non-`None` outputs (`config.return_dict` by default).
"""


class DenseClipForObjectDetection(DenseClipDetectionPreTrainedModel):
    """DenseCLIP RetinaNet (paper Table 3; with `prompting_type="none"`, the CLIP baseline): `DenseClipModel`, an FPN
    (P3-P5 from C3-C5', P6 and P7 by stride-2 convolutions from C5', C5 joined with s / tau) and RetinaNet's head;
    the forward ends with the authors' test post-processing (`dense_detections`) on each image. With `labels`: the
    focal and L1 losses of the head (`head_losses`) and Eq. 8 on the score map (`loss_seg`)."""

    config: DenseClipRetinaNetConfig
    config_class = DenseClipRetinaNetConfig
    extra_level_convs = True
    auto_classes = ("AutoModelForObjectDetection",)
    architecture = "retinanet"

    def __init__(self, config: DenseClipRetinaNetConfig):
        super().__init__(config)
        self.head = DenseClipRetinaHead(config)
        with torch.device("cpu"):  # plain tensors, also when the model is built on the meta device
            self.anchor_generator = AnchorGenerator(
                config.anchor_strides,
                config.anchor_ratios,
                octave_base_scale=config.anchor_octave_base_scale,
                scales_per_octave=config.anchor_scales_per_octave,
            )
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor | None = None,
        scale_factors: torch.Tensor | None = None,
        original_sizes: torch.Tensor | None = None,
        labels: list[dict[str, torch.Tensor]] | None = None,
        output_hidden_states: bool | list[int] | None = None,
        return_dict: bool | None = None,
        generator: torch.Generator | None = None,
        **kwargs,
    ) -> DenseClipObjectDetectionOutput:
        config = self.config
        frames = image_frames(pixel_values, image_sizes, scale_factors, original_sizes)
        targets = self._targets(labels, frames, pixel_values)
        outputs, features = self._features(pixel_values, output_hidden_states)
        class_logits, box_deltas = self.head(features)
        sizes = [feature.shape[-2:] for feature in features]
        anchors = self.anchor_generator.grid_anchors(sizes, features[0].device)
        losses = {}
        if targets is not None:
            head_losses = self.head_losses(
                class_logits, box_deltas, anchors, self._valid_flags(sizes, frames, features[0].device), targets
            )
            losses = self._loss_outputs(head_losses, outputs, targets, pixel_values.shape[-2:])
        detections = None
        if not (self.training and targets is not None):
            with torch.no_grad():
                detections = [
                    dense_detections(
                        [level[index] for level in class_logits],
                        [level[index] for level in box_deltas],
                        anchors,
                        frame,
                        score_threshold=config.score_threshold,
                        nms_pre=config.nms_pre,
                        iou_threshold=config.nms_iou_threshold,
                        max_detections=config.max_detections,
                    )
                    for index, frame in enumerate(frames)
                ]
        return DenseClipObjectDetectionOutput(
            **losses,
            **self._common_outputs(outputs, features, frames, detections),
            class_logits=class_logits,
            box_deltas=box_deltas,
        )

    def head_losses(
        self,
        class_logits: Sequence[torch.Tensor],
        box_deltas: Sequence[torch.Tensor],
        anchors: Sequence[torch.Tensor],
        valid_flags: Sequence[Sequence[torch.Tensor]],
        targets: Sequence[dict[str, torch.Tensor]],
    ) -> dict[str, list[torch.Tensor]]:
        """The RetinaNet head's training losses (mmdet 2.28 `AnchorHead.loss`): per level `l` the head's
        `class_logits[l] (B, A * K, h_l, w_l)` and `box_deltas[l] (B, A * 4, h_l, w_l)`, the batch grid's
        `anchors[l] (h_l * w_l * A, 4)`, each image's `valid_flags[i][l]` and `targets[i]` (`boxes`,
        `class_labels`). Every valid anchor is assigned (`MaxIoUAssigner` with the config's thresholds, no
        sampling); returns `{"loss_cls": [...], "loss_bbox": [...]}` per level, the sigmoid focal loss and the L1
        loss on the deltas of the positives, each divided by `sum_i max(#positives_i, 1)` and weighted
        (`classification_loss_weight`, `box_loss_weight`). An image without boxes: all its anchors are negatives."""
        config = self.config
        assigner = MaxIoUAssigner(
            config.assigner_pos_iou_threshold, config.assigner_neg_iou_threshold, config.assigner_min_pos_iou
        )
        head_targets = anchor_targets(
            anchors,
            valid_flags,
            [target["boxes"] for target in targets],
            [target["class_labels"] for target in targets],
            config.num_labels,
            assigner,
        )
        losses_cls, losses_bbox = anchor_head_losses(
            class_logits, box_deltas, head_targets, "focal", config.focal_loss_gamma, config.focal_loss_alpha
        )
        return {
            "loss_cls": [config.classification_loss_weight * loss for loss in losses_cls],
            "loss_bbox": [config.box_loss_weight * loss for loss in losses_bbox],
        }


class DenseClipForInstanceSegmentation(DenseClipDetectionPreTrainedModel):
    """DenseCLIP Mask R-CNN (paper Table 4; with `prompting_type="none"`, the CLIP baseline): `DenseClipModel`, an FPN
    (P2-P5 from C2-C5', P6 by max-pooling), the RPN with per-level NMS (`rpn_proposals`), RoIAlign from the level
    each proposal maps to, the box head (`rcnn_detections`) and the mask head on the final detections; the forward
    follows the authors' `simple_test` on each image. With `labels`: the RPN's, box head's and mask head's losses
    (`head_losses`, the authors' `forward_train`) and Eq. 8 on the score map (`loss_aux_seg`)."""

    config: DenseClipMaskRCNNConfig
    config_class = DenseClipMaskRCNNConfig
    extra_level_convs = False
    auto_classes = ("AutoModelForInstanceSegmentation", "AutoModelForImageSegmentation", "AutoModelForObjectDetection")
    architecture = "mask_rcnn"

    def __init__(self, config: DenseClipMaskRCNNConfig):
        super().__init__(config)
        self.rpn = DenseClipRPNHead(config)
        self.box_head = DenseClipBoxHead(config)
        self.mask_head = DenseClipMaskHead(config)
        with torch.device("cpu"):  # plain tensors, also when the model is built on the meta device
            self.anchor_generator = AnchorGenerator(
                config.rpn_anchor_strides, config.anchor_ratios, scales=config.rpn_anchor_scales
            )
        self.post_init()

    def propose(
        self,
        rpn_objectness: Sequence[torch.Tensor],
        rpn_box_deltas: Sequence[torch.Tensor],
        frames: Sequence[ImageFrame],
        nms_pre: int | None = None,
        anchors: Sequence[torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """Each image's proposals `(p_i, 5)` (`rpn_proposals`) from the RPN's outputs, with `nms_pre` anchors per
        level (default `config.rpn_nms_pre`, the test setting; training uses `config.rpn_train_nms_pre`). `anchors`:
        the levels' anchor grids when already made (`anchor_generator.grid_anchors` of the RPN's level sizes)."""
        config = self.config
        if anchors is None:
            anchors = self.anchor_generator.grid_anchors(
                [level.shape[-2:] for level in rpn_objectness], rpn_objectness[0].device
            )
        with torch.no_grad():
            return [
                rpn_proposals(
                    [level[index] for level in rpn_objectness],
                    [level[index] for level in rpn_box_deltas],
                    anchors,
                    frame.image_size,
                    nms_pre=config.rpn_nms_pre if nms_pre is None else nms_pre,
                    max_proposals=config.rpn_max_proposals,
                    iou_threshold=config.rpn_nms_iou_threshold,
                    min_box_size=config.rpn_min_box_size,
                )
                for index, frame in enumerate(frames)
            ]

    def roi_features(self, features: Sequence[torch.Tensor], boxes: Sequence[torch.Tensor], size: int) -> torch.Tensor:
        """RoIAlign of each image's `boxes[i]` `(n_i, >= 4)` (input frame): `pool_rois` of their `boxes_to_rois`."""
        return self.pool_rois(features, boxes_to_rois(boxes), size)

    def pool_rois(self, features: Sequence[torch.Tensor], rois: torch.Tensor, size: int) -> torch.Tensor:
        """RoIAlign (`aligned=True`, `config.roi_sampling_ratio`) of `rois` `(N, 5)` rows `(image, x1, y1, x2, y2)` in
        the input frame, each from the FPN level its size maps to (`config.roi_finest_scale`) among those of strides
        up to 32: `(N, C, size, size)`."""
        config = self.config
        return multi_level_roi_align(
            features[: len(config.roi_strides)],
            rois,
            size,
            config.roi_strides,
            sampling_ratio=config.roi_sampling_ratio,
            finest_scale=config.roi_finest_scale,
        )

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor | None = None,
        scale_factors: torch.Tensor | None = None,
        original_sizes: torch.Tensor | None = None,
        labels: list[dict[str, torch.Tensor]] | None = None,
        output_hidden_states: bool | list[int] | None = None,
        return_dict: bool | None = None,
        generator: torch.Generator | None = None,
        **kwargs,
    ) -> DenseClipInstanceSegmentationOutput:
        config = self.config
        frames = image_frames(pixel_values, image_sizes, scale_factors, original_sizes)
        targets = self._targets(labels, frames, pixel_values)
        if targets is not None and any("masks" not in target for target in targets):
            raise ValueError(
                "Mask R-CNN's training loss needs instance masks: give each labels dict 'masks' (n, H, W) (the "
                "processor's labels for COCO annotations with a 'segmentation')."
            )
        outputs, features = self._features(pixel_values, output_hidden_states)
        # RoIAlign reads channels-last maps; converted once for the box and the mask heads.
        roi_levels = [
            feature.contiguous(memory_format=torch.channels_last) for feature in features[: len(config.roi_strides)]
        ]
        rpn_objectness, rpn_box_deltas = self.rpn(features)
        sizes = [level.shape[-2:] for level in rpn_objectness]
        anchors = self.anchor_generator.grid_anchors(sizes, features[0].device)
        losses = {}
        if targets is not None:
            valid_flags = self._valid_flags(sizes, frames, features[0].device)
            head_losses = self.head_losses(
                roi_levels, rpn_objectness, rpn_box_deltas, anchors, valid_flags, frames, targets, generator
            )
            losses = self._loss_outputs(head_losses, outputs, targets, pixel_values.shape[-2:])
        if self.training and targets is not None:
            return DenseClipInstanceSegmentationOutput(
                **losses,
                **self._common_outputs(outputs, features, frames, None),
                rpn_objectness=rpn_objectness,
                rpn_box_deltas=rpn_box_deltas,
            )
        proposals = self.propose(rpn_objectness, rpn_box_deltas, frames, anchors=anchors)
        counts = [len(image_proposals) for image_proposals in proposals]
        roi_class_logits, roi_box_deltas = self.box_head(self.roi_features(roi_levels, proposals, config.box_roi_size))
        roi_class_logits, roi_box_deltas = roi_class_logits.split(counts), roi_box_deltas.split(counts)
        with torch.no_grad():
            detections = [
                rcnn_detections(
                    image_proposals[:, :4],
                    class_logits,
                    box_deltas,
                    frame,
                    box_coder_stds=config.box_coder_stds,
                    score_threshold=config.score_threshold,
                    iou_threshold=config.nms_iou_threshold,
                    max_detections=config.max_detections,
                )
                for image_proposals, class_logits, box_deltas, frame in zip(
                    proposals, roi_class_logits, roi_box_deltas, frames, strict=True
                )
            ]
            pred_masks, mask_boxes = self._masks(roi_levels, frames, detections)
        return DenseClipInstanceSegmentationOutput(
            **losses,
            **self._common_outputs(outputs, features, frames, detections),
            pred_masks=pred_masks,
            mask_boxes=mask_boxes,
            rpn_objectness=rpn_objectness,
            rpn_box_deltas=rpn_box_deltas,
            proposals=tuple(proposals),
            roi_class_logits=tuple(roi_class_logits),
            roi_box_deltas=tuple(roi_box_deltas),
        )

    def head_losses(
        self,
        roi_levels: Sequence[torch.Tensor],
        rpn_objectness: Sequence[torch.Tensor],
        rpn_box_deltas: Sequence[torch.Tensor],
        anchors: Sequence[torch.Tensor],
        valid_flags: Sequence[Sequence[torch.Tensor]],
        frames: Sequence[ImageFrame],
        targets: Sequence[dict[str, torch.Tensor]],
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Mask R-CNN's training losses (mmdet 2.28 `TwoStageDetector.forward_train` with `StandardRoIHead`), from
        the FPN levels the RoI heads pool from (`roi_levels`, P2-P5), the RPN's outputs per level, the batch grid's
        `anchors`, each image's `valid_flags`, `frames` and `targets` (`boxes`, `class_labels`, `masks`):

        1. RPN: the valid anchors assigned (`rpn_assigner_*`) and sampled (`rpn_sampler_*`), image by image;
           `loss_rpn_cls` (sigmoid cross-entropy) and `loss_rpn_bbox` (L1) per level, divided by the sampled count.
        2. Proposals with the training setting (`rpn_train_nms_pre` per level; not differentiated), per image
           assigned (`rcnn_assigner_*`) and sampled over `[gt boxes; proposals]` (`rcnn_sampler_*`, gt boxes added
           as proposals), image by image after the RPN's draws, from `generator`.
        3. Box head on the sampled RoIs (positives then negatives per image): `loss_cls` (softmax cross-entropy),
           `acc` (percent), `loss_bbox` (L1 on the gt class's deltas, `box_coder_stds`, divided by all sampled RoIs).
        4. Mask head on the positives: `loss_mask`, the binary cross-entropy of the gt class's 28 x 28 logits
           against the gt masks cropped to the RoIs (`mask_targets`).

        Each term is weighted by its `config.*_loss_weight`. An image without boxes gives the RPN only negatives
        and the R-CNN sampler draws negatives only; a batch without positives has 0 box and mask terms."""
        config = self.config
        boxes = [target["boxes"] for target in targets]
        labels = [target["class_labels"] for target in targets]
        rpn_assigner = MaxIoUAssigner(
            config.rpn_assigner_pos_iou_threshold,
            config.rpn_assigner_neg_iou_threshold,
            config.rpn_assigner_min_pos_iou,
        )
        rpn_sampler = RandomSampler(config.rpn_sampler_num, config.rpn_sampler_pos_fraction)
        rpn_targets = anchor_targets(
            anchors, valid_flags, boxes, None, 1, rpn_assigner, rpn_sampler, generator=generator
        )
        rpn_cls, rpn_bbox = anchor_head_losses(rpn_objectness, rpn_box_deltas, rpn_targets, "sigmoid_cross_entropy")

        proposals = self.propose(rpn_objectness, rpn_box_deltas, frames, config.rpn_train_nms_pre, anchors)
        rcnn_assigner = MaxIoUAssigner(
            config.rcnn_assigner_pos_iou_threshold,
            config.rcnn_assigner_neg_iou_threshold,
            config.rcnn_assigner_min_pos_iou,
        )
        rcnn_sampler = RandomSampler(
            config.rcnn_sampler_num,
            config.rcnn_sampler_pos_fraction,
            add_gt_as_proposals=config.rcnn_sampler_add_gt_as_proposals,
        )
        samples: list[SamplingResult] = [
            rcnn_sampler.sample(
                rcnn_assigner.assign(image_proposals, gt_boxes, gt_labels),
                image_proposals,
                gt_boxes,
                gt_labels,
                generator,
            )
            for image_proposals, gt_boxes, gt_labels in zip(proposals, boxes, labels, strict=True)
        ]
        class_logits, box_deltas = self.box_head(
            self.pool_rois(roi_levels, sampled_rois(samples), config.box_roi_size)
        )
        rcnn = rcnn_losses(
            class_logits, box_deltas, rcnn_targets(samples, config.num_labels, stds=config.box_coder_stds)
        )
        mask_logits = self.mask_head(
            self.pool_rois(roi_levels, sampled_rois(samples, positives_only=True), config.mask_roi_size)
        )
        masks = mask_targets(samples, [target["masks"] for target in targets], config.mask_size)
        positive_labels = torch.cat([sample.pos_gt_labels for sample in samples])
        return {
            "loss_rpn_cls": [config.rpn_classification_loss_weight * loss for loss in rpn_cls],
            "loss_rpn_bbox": [config.rpn_box_loss_weight * loss for loss in rpn_bbox],
            "loss_cls": config.classification_loss_weight * rcnn["loss_cls"],
            "acc": rcnn["acc"],
            "loss_bbox": config.box_loss_weight * rcnn["loss_bbox"],
            "loss_mask": config.mask_loss_weight * mask_loss(mask_logits, masks, positive_labels),
        }

    def _masks(
        self,
        roi_levels: Sequence[torch.Tensor],
        frames: Sequence[ImageFrame],
        detections: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """The mask head on the final detections (mmdet `simple_test_mask` / `get_seg_masks`): RoIs = boxes x scale
        factor (back in the input frame), 14 x 14 RoIAlign, the logits of each detection's class, sigmoid. Returns
        per image the probabilities `(n_i, M, M)` and the paste boxes `(n_i, 4)` (the RoIs / scale factor)."""
        mask_rois = [
            boxes if frame.scale_factor is None else boxes * frame.scale_factor.to(boxes)
            for frame, (boxes, _, _) in zip(frames, detections, strict=True)
        ]
        size = self.config.mask_size
        counts = [len(rois) for rois in mask_rois]
        if sum(counts) == 0:
            empty = roi_levels[0].new_zeros(0, size, size)
            return tuple(empty for _ in frames), tuple(rois.new_zeros(0, 4) for rois in mask_rois)
        logits = self.mask_head(self.roi_features(roi_levels, mask_rois, self.config.mask_roi_size))
        classes = torch.cat([labels for _, _, labels in detections])
        probabilities = logits[torch.arange(len(classes), device=logits.device), classes].float().sigmoid()
        paste_boxes = tuple(
            rois if frame.scale_factor is None else rois / frame.scale_factor.to(rois)
            for frame, rois in zip(frames, mask_rois, strict=True)
        )
        return probabilities.split(counts), paste_boxes


# transformers' table of model class names for each Auto class a detector is registered with (see
# `declare_pipeline_support`).
_TASK_MODEL_NAMES = {
    "AutoModelForObjectDetection": MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES,
    "AutoModelForInstanceSegmentation": MODEL_FOR_INSTANCE_SEGMENTATION_MAPPING_NAMES,
    "AutoModelForImageSegmentation": MODEL_FOR_IMAGE_SEGMENTATION_MAPPING_NAMES,
}
for _detector in (DenseClipForObjectDetection, DenseClipForInstanceSegmentation):
    _detector.forward.__doc__ = _FORWARD_ARGS
    for _auto_class in _detector.auto_classes:
        declare_pipeline_support(_detector, _TASK_MODEL_NAMES[_auto_class])

__all__ = [
    "DenseClipBoxHead",
    "DenseClipDetectionOutput",
    "DenseClipDetectionPreTrainedModel",
    "DenseClipForInstanceSegmentation",
    "DenseClipForObjectDetection",
    "DenseClipInstanceSegmentationOutput",
    "DenseClipMaskHead",
    "DenseClipObjectDetectionOutput",
    "DenseClipRPNHead",
    "DenseClipRetinaHead",
    "ImageFrame",
    "check_detection_labels",
    "dense_detections",
    "image_frames",
    "rcnn_detections",
    "rpn_proposals",
]
