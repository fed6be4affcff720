"""DenseCLIP detection configurations: RetinaNet (object detection) and Mask R-CNN (instance segmentation), the
authors' detectors of the paper's Tables 3-4, and their CLIP-only baselines (`prompting_type="none"`).

`DenseClipDetectionConfig` holds what both share (a CLIP ResNet image encoder with DenseCLIP's post-model prompting,
the FPN width, the test-time detection settings, the Eq. 8 weight); `DenseClipRetinaNetConfig` and
`DenseClipMaskRCNNConfig` add their heads' settings. Every default is the authors' value (their mmdet 2.x configs
`retinanet_r50_fpn.py` / `mask_rcnn_r50_fpn.py` with the DenseCLIP overrides), train-time ones included (used by the
training code). Shipped with saved models as remote code.
"""

import math

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, CLIPTextConfig

from .configuration_denseclip import (
    PYRAMID_STRIDES,
    ClipResNetSettings,
    DenseClipConfig,
    DenseClipResNetConfig,
    VisionConfigSpec,
    _check,
)

# The positional grid of the authors' detectors' attention pool: 42 x 42 cells (`input_resolution=1344`), cropped to
# the stride-32 feature map of inputs of up to 1344 pixels per side (the test pipeline's longest edge 1333, padded).
AUTHORS_DETECTION_IMAGE_SIZE = 1344
# The authors' mask binarization threshold (mmdet `test_cfg.rcnn.mask_thr_binary`): the default of
# `DenseClipMaskRCNNConfig.mask_threshold` and of `DenseClipDetectionImageProcessor.mask_threshold`.
AUTHORS_MASK_THRESHOLD = 0.5


def fpn_levels(strides: list[int], owner: str, name: str) -> tuple[int, int]:
    """The FPN a detector with anchors / features at `strides` needs: `(start_level, extra_levels)`, the first image
    encoder level it reads (strides 4, 8, 16, 32 are levels 0-3) and how many levels it adds beyond stride 32.
    A `ValueError` naming the setting unless the strides double from one of 4, 8, 16, 32 on (e.g. RetinaNet's 8-128,
    the RPN's 4-64)."""
    _check(
        len(strides) >= 1
        and strides[0] in PYRAMID_STRIDES
        and all(stride == strides[0] * 2**level for level, stride in enumerate(strides)),
        name,
        list(strides),
        f"must double from one of {list(PYRAMID_STRIDES)} on, e.g. [8, 16, 32, 64, 128] (one stride per FPN level)",
        owner,
    )
    start_level = PYRAMID_STRIDES.index(strides[0])
    return start_level, sum(stride > PYRAMID_STRIDES[-1] for stride in strides)


@strict
class DenseClipDetectionConfig(DenseClipConfig):
    r"""
    What DenseCLIP's detectors share (the base of [`DenseClipRetinaNetConfig`] and [`DenseClipMaskRCNNConfig`]):
    every [`DenseClipConfig`] setting of the image encoder, text encoder and prompting, with the authors' detection
    defaults, and the detector settings below. The segmentation decoder's and test protocol's settings
    (`decoder_type`, `decode_head_*`, `upernet_pool_scales`, `identity_loss_weight`, `semantic_loss_ignore_index`,
    `loss_reduction`, `test_*`) are unused. `id2label` (and `class_token_ids` for the DenseCLIP models) come from the
    checkpoint or the user: there is no default class list (the authors' checkpoints carry COCO's 80 classes).

    Changed defaults (the authors' detectors):

        vision_config (`dict` or `DenseClipResNetConfig`, *optional*):
            A CLIP ResNet (the only image encoder of the authors' detectors); defaults to RN50 (`layers=[3, 4, 6, 3]`)
            with a 42 x 42 positional grid (`image_size=1344`). RN101: `layers=[3, 4, 23, 3]`, `projection_dim=512`.
        projection_dim (`int`, *optional*, defaults to 1024):
            RN50's embedding size (512 for RN101).
        position_embedding_interpolation (`str`, *optional*, defaults to `"crop"`):
            The attention pool takes the top-left part of its grid for the stride-32 feature map (`[:H5, :W5]`, the
            authors' detection code) instead of resizing it: inputs of at most `image_size` pixels per side.
        join_score_map_over_temperature (`bool`, *optional*, defaults to `True`):
            The score map joined to C5 is the cosine divided by `temperature` (0.07), as the authors' detectors.

    Detector settings:

        fpn_channels (`int`, *optional*, defaults to 256):
            Channels of every FPN level (and of the heads' inputs).
        anchor_ratios (`list[float]`, *optional*, defaults to `[0.5, 1.0, 2.0]`):
            Height / width ratios of the anchors at each position (mmdet `AnchorGenerator.ratios`).
        score_threshold (`float`, *optional*, defaults to 0.05):
            Test time: detections with a score at or below it are dropped before NMS (mmdet `score_thr`).
        nms_iou_threshold (`float`, *optional*, defaults to 0.5):
            Test time: class-wise NMS suppresses a box overlapping a better one of its class by an IoU above it.
        max_detections (`int`, *optional*, defaults to 100):
            Test time: detections kept per image after NMS (mmdet `max_per_img`).
        score_map_loss_weight (`float`, *optional*, defaults to 1.0):
            Training: weight of the auxiliary Eq. 8 loss on the score map (the authors' `seg_loss`, weight 1).
    """

    model_type = "denseclip_detection"
    # The authors' detection backbone resizes CLIP's positional embedding to its `input_resolution` (1344) when it
    # loads the CLIP weights: `from_clip_pretrained` does the same.
    clip_position_embedding_size = AUTHORS_DETECTION_IMAGE_SIZE
    sub_configs_defaults = {
        "text_config": CLIPTextConfig,
        "vision_config": VisionConfigSpec(
            config_class=AutoConfig,
            model_type=DenseClipResNetConfig.model_type,
            init_kwargs={"image_size": AUTHORS_DETECTION_IMAGE_SIZE},
        ),
    }

    projection_dim: int = 1024
    position_embedding_interpolation: str = "crop"
    join_score_map_over_temperature: bool = True
    anchor_ratios: list[float | int] | tuple[float | int, ...] = (0.5, 1.0, 2.0)
    score_threshold: float | int = 0.05
    nms_iou_threshold: float | int = 0.5
    max_detections: int = 100
    score_map_loss_weight: float | int = 1.0

    def __post_init__(self, **kwargs):
        for name in self._list_settings():
            setattr(self, name, list(getattr(self, name)))
        super().__post_init__(**kwargs)

    @classmethod
    def _list_settings(cls) -> tuple[str, ...]:
        """Settings stored as lists (given as tuples, or read back from JSON)."""
        return ("anchor_ratios",)

    @property
    def _owner(self) -> str:
        """The config's class name, for error messages."""
        return type(self).__name__

    def validate_architecture(self):
        super().validate_architecture()
        owner = self._owner
        _check(
            self.image_encoder_family == ClipResNetSettings.name,
            "vision_config",
            self.vision_config.model_type,
            "must be a CLIP ResNet (DenseClipResNetConfig): the DenseCLIP detectors use CLIP's RN50 / RN101",
            owner,
        )
        _check(
            len(self.anchor_ratios) >= 1 and all(ratio > 0 for ratio in self.anchor_ratios),
            "anchor_ratios",
            self.anchor_ratios,
            "must be a non-empty list of positive height / width ratios",
            owner,
        )
        for name in ("score_threshold", "nms_iou_threshold"):
            _check(0 <= getattr(self, name) <= 1, name, getattr(self, name), "must be in [0, 1]", owner)
        _check(self.max_detections >= 1, "max_detections", self.max_detections, "must be >= 1", owner)
        _check(
            self.score_map_loss_weight >= 0, "score_map_loss_weight", self.score_map_loss_weight, "must be >= 0", owner
        )

    def _check_positive(self, *names: str) -> None:
        for name in names:
            _check(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1", self._owner)

    def _check_fraction(self, *names: str) -> None:
        for name in names:
            _check(0 <= getattr(self, name) <= 1, name, getattr(self, name), "must be in [0, 1]", self._owner)


@strict
class DenseClipRetinaNetConfig(DenseClipDetectionConfig):
    r"""
    Configuration of [`DenseClipForObjectDetection`], DenseCLIP's RetinaNet (paper Table 3): every
    [`DenseClipDetectionConfig`] setting, and RetinaNet's (defaults: the authors' `retinanet_r50_fpn.py`). The CLIP
    baseline ("RetinaNet RN50-CLIP") is `prompting_type="none"`.

    The FPN reads the image encoder's levels from `anchor_strides[0]` on (stride 8: C3-C5) and adds a level per
    stride beyond 32 with stride-2 convolutions, the first on C5 joined with the score map (P6, P7).

    Anchors and head:

        anchor_strides (`list[int]`, *optional*, defaults to `[8, 16, 32, 64, 128]`):
            Strides of the FPN levels P3-P7 the head runs on (anchor base size = stride).
        anchor_octave_base_scale (`float`, *optional*, defaults to 4):
            Anchor scales are `octave_base_scale * 2 ** (i / scales_per_octave)` times the stride.
        anchor_scales_per_octave (`int`, *optional*, defaults to 3):
            Anchor scales per level (9 anchors per position with 3 ratios).
        head_stacked_convs (`int`, *optional*, defaults to 4):
            3x3 convolution + ReLU layers of each branch (classification, box regression) before its output.
        head_channels (`int`, *optional*, defaults to 256):
            Channels of those layers (mmdet `feat_channels`).
        nms_pre (`int`, *optional*, defaults to 1000):
            Test time: (anchor, class) pairs above `score_threshold` kept per FPN level before NMS, by score.

    Training (the authors' `train_cfg` and losses):

        assigner_pos_iou_threshold (`float`, *optional*, defaults to 0.5), assigner_neg_iou_threshold (`float`,
        *optional*, defaults to 0.4), assigner_min_pos_iou (`float`, *optional*, defaults to 0.0):
            `MaxIoUAssigner`: anchors with a best IoU of at least 0.5 are positives, below 0.4 negatives, and each gt
            box also takes its best anchors (IoU at least `min_pos_iou`).
        focal_loss_alpha (`float`, *optional*, defaults to 0.25), focal_loss_gamma (`float`, *optional*, defaults to
        2.0):
            Sigmoid focal loss of the classification branch.
        classification_loss_weight (`float`, *optional*, defaults to 1.0), box_loss_weight (`float`, *optional*,
        defaults to 1.0):
            Weights of the focal loss and of the L1 loss on the box deltas.
    """

    model_type = "denseclip_retinanet"

    anchor_strides: list[int] | tuple[int, ...] = (8, 16, 32, 64, 128)
    anchor_octave_base_scale: float | int = 4
    anchor_scales_per_octave: int = 3
    head_stacked_convs: int = 4
    head_channels: int = 256
    nms_pre: int = 1000
    assigner_pos_iou_threshold: float | int = 0.5
    assigner_neg_iou_threshold: float | int = 0.4
    assigner_min_pos_iou: float | int = 0.0
    focal_loss_alpha: float | int = 0.25
    focal_loss_gamma: float | int = 2.0
    classification_loss_weight: float | int = 1.0
    box_loss_weight: float | int = 1.0

    @classmethod
    def _list_settings(cls) -> tuple[str, ...]:
        return (*super()._list_settings(), "anchor_strides")

    @property
    def fpn_levels(self) -> tuple[int, int]:
        """`(start_level, extra_levels)` of the FPN (see `fpn_levels`): `(1, 2)` for the strides 8-128."""
        return fpn_levels(self.anchor_strides, self._owner, "anchor_strides")

    @property
    def num_anchors(self) -> int:
        """Anchors per position: ratios x scales (9)."""
        return len(self.anchor_ratios) * self.anchor_scales_per_octave

    def validate_architecture(self):
        super().validate_architecture()
        self.fpn_levels  # noqa: B018 (checks the strides)
        _check(
            self.anchor_octave_base_scale > 0,
            "anchor_octave_base_scale",
            self.anchor_octave_base_scale,
            "must be > 0",
            self._owner,
        )
        self._check_positive("anchor_scales_per_octave", "head_stacked_convs", "head_channels", "nms_pre")
        self._check_fraction("assigner_pos_iou_threshold", "assigner_neg_iou_threshold", "assigner_min_pos_iou")
        self._check_fraction("focal_loss_alpha")
        for name in ("focal_loss_gamma", "classification_loss_weight", "box_loss_weight"):
            _check(getattr(self, name) >= 0, name, getattr(self, name), "must be >= 0", self._owner)


@strict
class DenseClipMaskRCNNConfig(DenseClipDetectionConfig):
    r"""
    Configuration of [`DenseClipForInstanceSegmentation`], DenseCLIP's Mask R-CNN (paper Table 4): every
    [`DenseClipDetectionConfig`] setting, and Mask R-CNN's (defaults: the authors' `mask_rcnn_r50_fpn.py`). The CLIP
    baseline ("Mask R-CNN RN50-CLIP") is `prompting_type="none"`.

    The FPN reads the image encoder's levels from `rpn_anchor_strides[0]` on (stride 4: C2-C5) and adds a level per
    stride beyond 32 by max-pooling (P6). The RoI heads pool from the FPN levels of strides up to 32 (P2-P5).

    Region proposal network:

        rpn_anchor_strides (`list[int]`, *optional*, defaults to `[4, 8, 16, 32, 64]`):
            Strides of the FPN levels P2-P6 the RPN runs on.
        rpn_anchor_scales (`list[float]`, *optional*, defaults to `[8]`):
            Anchor sizes in strides (32-512 pixels over the levels).
        rpn_channels (`int`, *optional*, defaults to 256):
            Channels of the RPN's 3x3 convolution (mmdet `feat_channels`).
        rpn_nms_pre (`int`, *optional*, defaults to 1000):
            Test time: anchors kept per level by objectness before NMS.
        rpn_max_proposals (`int`, *optional*, defaults to 1000):
            Test time: proposals kept per image after NMS (mmdet `max_per_img`).
        rpn_nms_iou_threshold (`float`, *optional*, defaults to 0.7):
            NMS IoU of the proposals (run per FPN level).
        rpn_min_box_size (`float`, *optional*, defaults to 0.0):
            Proposals must be wider and taller than it (strictly: empty boxes are always dropped).

    RoI heads:

        roi_finest_scale (`float`, *optional*, defaults to 56):
            A RoI of size sqrt(w h) is pooled from level `floor(log2(size / finest_scale + 1e-6))` of P2-P5.
        roi_sampling_ratio (`int`, *optional*, defaults to 0):
            RoIAlign samples per bin and axis; 0: `ceil(RoI size / output size)`, per RoI (adaptive).
        box_roi_size (`int`, *optional*, defaults to 7), mask_roi_size (`int`, *optional*, defaults to 14):
            RoIAlign output sizes of the box and mask heads.
        box_head_fc_channels (`int`, *optional*, defaults to 1024):
            Width of the box head's two shared fully connected layers.
        box_coder_stds (`list[float]`, *optional*, defaults to `[0.1, 0.1, 0.2, 0.2]`):
            The box head's deltas are multiplied by these before decoding.
        mask_head_convs (`int`, *optional*, defaults to 4), mask_head_channels (`int`, *optional*, defaults to 256):
            3x3 convolution + ReLU layers of the mask head and their width; a 2x transposed convolution then gives
            masks of `2 * mask_roi_size` (28) pixels per side.
        mask_threshold (`float`, *optional*, defaults to 0.5):
            Test time: mask probabilities at or above it are foreground (mmdet `mask_thr_binary`). The image
            processor saved with the model holds the same value (`DenseClipDetectionImageProcessor.mask_threshold`,
            the default of its `post_process_instance_segmentation`).

    Training (the authors' `train_cfg` and losses):

        rpn_train_nms_pre (`int`, *optional*, defaults to 2000):
            Proposals for the RoI heads in training: anchors kept per level before NMS (mmdet `rpn_proposal`; the
            other proposal settings are the test ones).
        rpn_assigner_pos_iou_threshold (`float`, defaults to 0.7), rpn_assigner_neg_iou_threshold (0.3),
        rpn_assigner_min_pos_iou (0.3):
            The RPN's `MaxIoUAssigner`.
        rpn_sampler_num (`int`, defaults to 256), rpn_sampler_pos_fraction (`float`, defaults to 0.5):
            The RPN's `RandomSampler`: anchors sampled per image, at most this fraction positive.
        rcnn_assigner_pos_iou_threshold (0.5), rcnn_assigner_neg_iou_threshold (0.5), rcnn_assigner_min_pos_iou
        (0.5):
            The RoI heads' `MaxIoUAssigner`.
        rcnn_sampler_num (`int`, defaults to 512), rcnn_sampler_pos_fraction (`float`, defaults to 0.25),
        rcnn_sampler_add_gt_as_proposals (`bool`, defaults to `True`):
            The RoI heads' `RandomSampler` (gt boxes are added to the proposals first).
        rpn_classification_loss_weight, rpn_box_loss_weight, classification_loss_weight, box_loss_weight,
        mask_loss_weight (`float`, all default to 1.0):
            Weights of the RPN's binary cross-entropy and L1 losses, the box head's cross-entropy and L1 losses and
            the mask head's binary cross-entropy.
    """

    model_type = "denseclip_mask_rcnn"

    rpn_anchor_strides: list[int] | tuple[int, ...] = (4, 8, 16, 32, 64)
    rpn_anchor_scales: list[float | int] | tuple[float | int, ...] = (8,)
    rpn_channels: int = 256
    rpn_nms_pre: int = 1000
    rpn_max_proposals: int = 1000
    rpn_nms_iou_threshold: float | int = 0.7
    rpn_min_box_size: float | int = 0.0
    roi_finest_scale: float | int = 56
    roi_sampling_ratio: int = 0
    box_roi_size: int = 7
    mask_roi_size: int = 14
    box_head_fc_channels: int = 1024
    box_coder_stds: list[float | int] | tuple[float | int, ...] = (0.1, 0.1, 0.2, 0.2)
    mask_head_convs: int = 4
    mask_head_channels: int = 256
    mask_threshold: float | int = AUTHORS_MASK_THRESHOLD
    rpn_train_nms_pre: int = 2000
    rpn_assigner_pos_iou_threshold: float | int = 0.7
    rpn_assigner_neg_iou_threshold: float | int = 0.3
    rpn_assigner_min_pos_iou: float | int = 0.3
    rpn_sampler_num: int = 256
    rpn_sampler_pos_fraction: float | int = 0.5
    rcnn_assigner_pos_iou_threshold: float | int = 0.5
    rcnn_assigner_neg_iou_threshold: float | int = 0.5
    rcnn_assigner_min_pos_iou: float | int = 0.5
    rcnn_sampler_num: int = 512
    rcnn_sampler_pos_fraction: float | int = 0.25
    rcnn_sampler_add_gt_as_proposals: bool = True
    rpn_classification_loss_weight: float | int = 1.0
    rpn_box_loss_weight: float | int = 1.0
    classification_loss_weight: float | int = 1.0
    box_loss_weight: float | int = 1.0
    mask_loss_weight: float | int = 1.0

    @classmethod
    def _list_settings(cls) -> tuple[str, ...]:
        return (*super()._list_settings(), "rpn_anchor_strides", "rpn_anchor_scales", "box_coder_stds")

    @property
    def fpn_levels(self) -> tuple[int, int]:
        """`(start_level, extra_levels)` of the FPN (see `fpn_levels`): `(0, 1)` for the strides 4-64."""
        return fpn_levels(self.rpn_anchor_strides, self._owner, "rpn_anchor_strides")

    @property
    def roi_strides(self) -> list[int]:
        """Strides of the FPN levels the RoI heads pool from: those of the image encoder's levels (P2-P5)."""
        return [stride for stride in self.rpn_anchor_strides if stride <= PYRAMID_STRIDES[-1]]

    @property
    def num_anchors(self) -> int:
        """RPN anchors per position: ratios x scales (3)."""
        return len(self.anchor_ratios) * len(self.rpn_anchor_scales)

    @property
    def mask_size(self) -> int:
        """Side of the mask head's output (and of the training mask targets): `2 * mask_roi_size` (28)."""
        return 2 * self.mask_roi_size

    def validate_architecture(self):
        super().validate_architecture()
        self.fpn_levels  # noqa: B018 (checks the strides)
        owner = self._owner
        _check(
            len(self.rpn_anchor_scales) >= 1 and all(scale > 0 for scale in self.rpn_anchor_scales),
            "rpn_anchor_scales",
            self.rpn_anchor_scales,
            "must be a non-empty list of positive scales",
            owner,
        )
        _check(
            len(self.box_coder_stds) == 4 and all(std > 0 for std in self.box_coder_stds),
            "box_coder_stds",
            self.box_coder_stds,
            "must be 4 positive numbers (x, y, w, h)",
            owner,
        )
        self._check_positive(
            "rpn_channels",
            "rpn_nms_pre",
            "rpn_max_proposals",
            "box_roi_size",
            "mask_roi_size",
            "box_head_fc_channels",
            "mask_head_convs",
            "mask_head_channels",
            "rpn_train_nms_pre",
            "rpn_sampler_num",
            "rcnn_sampler_num",
        )
        _check(
            self.roi_finest_scale > 0 and math.isfinite(self.roi_finest_scale),
            "roi_finest_scale",
            self.roi_finest_scale,
            "must be a positive number",
            owner,
        )
        _check(self.roi_sampling_ratio >= 0, "roi_sampling_ratio", self.roi_sampling_ratio, "must be >= 0", owner)
        _check(self.rpn_min_box_size >= 0, "rpn_min_box_size", self.rpn_min_box_size, "must be >= 0", owner)
        self._check_fraction(
            "rpn_nms_iou_threshold",
            "mask_threshold",
            "rpn_assigner_pos_iou_threshold",
            "rpn_assigner_neg_iou_threshold",
            "rpn_assigner_min_pos_iou",
            "rpn_sampler_pos_fraction",
            "rcnn_assigner_pos_iou_threshold",
            "rcnn_assigner_neg_iou_threshold",
            "rcnn_assigner_min_pos_iou",
            "rcnn_sampler_pos_fraction",
        )
        for name in (
            "rpn_classification_loss_weight",
            "rpn_box_loss_weight",
            "classification_loss_weight",
            "box_loss_weight",
            "mask_loss_weight",
        ):
            _check(getattr(self, name) >= 0, name, getattr(self, name), "must be >= 0", owner)


__all__ = [
    "AUTHORS_DETECTION_IMAGE_SIZE",
    "DenseClipDetectionConfig",
    "DenseClipMaskRCNNConfig",
    "DenseClipRetinaNetConfig",
    "fpn_levels",
]
