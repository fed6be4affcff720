"""The training targets and losses of DenseCLIP's detectors' heads (RetinaNet, RPN, R-CNN box and mask heads), exact
to mmdet 2.28.2 (`AnchorHead.get_targets / loss`, `BBoxHead.get_targets / loss`, `FCNMaskHead.get_targets / loss`,
`FocalLoss`, `CrossEntropyLoss`, `L1Loss`). The Eq. 8 loss on the score map is in `loss_denseclip.py`.

Shipped with saved detection models as remote code.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .box_ops import (
    AssignResult,
    MaxIoUAssigner,
    RandomSampler,
    SamplingResult,
    encode_deltas,
    pseudo_sample,
    roi_align,
)

# mmdet's `weight_reduce_loss` divides a summed loss by `avg_factor + eps` with float32's machine epsilon.
FLOAT32_EPS = torch.finfo(torch.float32).eps
# The box regression encoding of the R-CNN box head (`DeltaXYWHBBoxCoder` target_stds); anchor heads use 1.
RCNN_BOX_STDS = (0.1, 0.1, 0.2, 0.2)
# The keys of mmdet's loss dicts of the authors' detectors, in mmdet's order, and the Eq. 8 key of each (the
# authors' `loss_seg` in DenseCLIP_RetinaNet, `loss_aux_seg` in DenseCLIP_MaskRCNN). `acc` is logged, not a loss.
DETECTION_LOSS_NAMES = {
    "retinanet": ("loss_cls", "loss_bbox"),
    "mask_rcnn": ("loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "acc", "loss_bbox", "loss_mask"),
}
SCORE_MAP_LOSS_NAMES = {"retinanet": "loss_seg", "mask_rcnn": "loss_aux_seg"}


def detection_loss_names(architecture: str, score_map_loss: bool = True) -> tuple[str, ...]:
    """The keys of the loss dict of `architecture` (`"retinanet"` or `"mask_rcnn"`) as the authors' mmdet detectors
    log them, the Eq. 8 key last when `score_map_loss` (DenseCLIP; the CLIP baselines have none). The keys containing
    "loss" are summed into the training loss (`total_detection_loss`); `acc` (R-CNN accuracy in percent) is logged."""
    if architecture not in DETECTION_LOSS_NAMES:
        raise ValueError(f"architecture must be one of {sorted(DETECTION_LOSS_NAMES)}, got {architecture!r}.")
    extra = (SCORE_MAP_LOSS_NAMES[architecture],) if score_map_loss else ()
    return DETECTION_LOSS_NAMES[architecture] + extra


def total_detection_loss(
    losses: Mapping[str, torch.Tensor | Sequence[torch.Tensor]],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """mmdet's `BaseDetector._parse_losses`: each entry is a tensor (its mean) or a list of per-level tensors (the sum
    of their means, in level order); the total is the sum, in key order, of the entries whose key contains "loss".
    Returns `(total, values)` with `values[key]` the scalar of each entry."""
    values = {}
    for key, value in losses.items():
        if isinstance(value, torch.Tensor):
            values[key] = value.mean()
        elif isinstance(value, Sequence) and value and all(isinstance(level, torch.Tensor) for level in value):
            values[key] = sum(level.mean() for level in value)
        else:
            raise TypeError(f"losses[{key!r}] must be a tensor or a non-empty list of tensors, got {type(value)}.")
    summed = [value for key, value in values.items() if "loss" in key]
    if not summed:
        raise ValueError(f"No key containing 'loss' among {list(values)}: nothing to optimise.")
    return sum(summed), values


def _reduce(loss: torch.Tensor, weights: torch.Tensor | None, avg_factor: float) -> torch.Tensor:
    """mmdet `weight_reduce_loss(loss, weight, 'mean', avg_factor)`: `sum(loss * weight) / (avg_factor + eps)`."""
    if weights is not None:
        loss = loss * weights
    return loss.sum() / (avg_factor + FLOAT32_EPS)


def _one_hot_without_background(labels: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """`(N,)` labels in `0..num_classes` (`num_classes` = background) -> `(N, num_classes)` 0/1 targets, a
    background row all 0 (mmdet's one-hot targets of sigmoid classifiers)."""
    _check_labels(labels, num_classes)
    return F.one_hot(labels.long(), num_classes + 1)[:, :num_classes].to(dtype)


def _check_labels(labels: torch.Tensor, num_classes: int) -> None:
    if labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) <= num_classes):
        raise ValueError(f"labels must be in 0..{num_classes} ({num_classes} = background), got {labels.unique()}.")


def _check_classification(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a float (N, num_classes) tensor, got {getattr(logits, 'shape', logits)}.")
    if labels.shape != logits.shape[:1] or (weights is not None and weights.shape != logits.shape[:1]):
        raise ValueError(
            f"labels and weights must be (N,) = ({logits.shape[0]},), got {tuple(labels.shape)} and "
            f"{None if weights is None else tuple(weights.shape)}."
        )


class _SigmoidFocalLoss(torch.autograd.Function):
    """The elementwise focal loss `(N, K)` of `sigmoid_focal_loss` with its closed-form gradient, keeping only the
    logits and the `(N,)` labels for the backward pass (what mmcv's compiled `sigmoid_focal_loss` keeps on GPUs).
    Autograd through the formula keeps about eight `(N, K)` intermediates: on RetinaNet's P3 level at 1333x800 that is
    N * K = 151,200 anchors * 80 classes per image, about 0.8 GB for a batch of 2. Both passes work in place, at most
    three `(N, K)` buffers at a time besides the logits and the incoming gradient, and the forward's value is mmdet's
    formula bit for bit: with one-hot targets t, `pt = (1 - p) t + p (1 - t)` is `1 - p` at the one positive class of
    a row and `p` elsewhere, and `alpha t + (1 - alpha)(1 - t)` is `alpha` there and `1 - alpha` elsewhere, exactly."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, gamma: float, alpha: float) -> torch.Tensor:
        rows, classes = _positives(labels, logits.shape[1])
        focal_weight = logits.sigmoid()  # p, then pt, then pt ** gamma, then the focal weight, in place
        focal_weight[rows, classes] = 1 - focal_weight[rows, classes]
        focal_weight.pow_(gamma)
        positive = focal_weight[rows, classes] * alpha  # a_t = alpha at the positives, 1 - alpha elsewhere
        focal_weight.mul_(1 - alpha)
        focal_weight[rows, classes] = positive
        targets = _one_hot_without_background(labels, logits.shape[1], logits.dtype)
        loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        del targets
        ctx.save_for_backward(logits, labels)
        ctx.gamma, ctx.alpha = gamma, alpha
        return loss.mul_(focal_weight)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        # With p = sigmoid(x), pt = (1 - p) t + p (1 - t) = |p - t|: d BCE / dx = p - t and d pt / dx
        # = (1 - 2t) p (1 - p) = (1 - 2t) pt (1 - pt), so d(BCE * a_t * pt^g) / dx = a_t pt^g ((p - t) + g BCE (1 - pt)
        # (1 - 2t)), with 1 - 2t = -1 at the positive class and 1 elsewhere.
        logits, labels = ctx.saved_tensors
        gamma, alpha = ctx.gamma, ctx.alpha
        rows, classes = _positives(labels, logits.shape[1])
        targets = _one_hot_without_background(labels, logits.shape[1], logits.dtype)
        bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        grad = logits.sigmoid().sub_(targets)  # p - t
        del targets
        pt = grad.abs()
        bce.mul_(1 - pt)
        bce[rows, classes] = -bce[rows, classes]  # (1 - 2t)
        grad.add_(bce, alpha=gamma)
        del bce
        grad.mul_(pt.pow_(gamma))
        del pt
        positive = grad[rows, classes] * alpha  # a_t
        grad.mul_(1 - alpha)
        grad[rows, classes] = positive
        return grad.mul_(grad_output), None, None, None


def _positives(labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `(row, class)` indices of the one-hot targets' ones: the rows whose label is a class (not the background
    `num_classes`), and their labels."""
    (rows,) = (labels < num_classes).nonzero(as_tuple=True)
    return rows, labels[rows].long()


def sigmoid_focal_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor | None,
    avg_factor: float,
    gamma: float = 2.0,
    alpha: float = 0.25,
) -> torch.Tensor:
    """mmdet `FocalLoss(use_sigmoid=True)` (its CPU path, `py_sigmoid_focal_loss`): `logits (N, K)`, `labels (N,)`
    in `0..K` (K = background: all K targets 0), `weights (N,)` per row -> scalar
    `sum(BCE(x, t) * (alpha t + (1 - alpha)(1 - t)) * ((1 - p) t + p (1 - t)) ** gamma * w) / (avg_factor + eps)`,
    `p = sigmoid(x)`. The value is computed as mmdet computes it; the gradient in closed form (`_SigmoidFocalLoss`)."""
    _check_classification(logits, labels, weights)
    _check_labels(labels, logits.shape[1])
    loss = _SigmoidFocalLoss.apply(logits, labels, gamma, alpha)
    return _reduce(loss, None if weights is None else weights.view(-1, 1), avg_factor)


def sigmoid_cross_entropy_loss(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None, avg_factor: float
) -> torch.Tensor:
    """mmdet `CrossEntropyLoss(use_sigmoid=True)` (the RPN's objectness): `logits (N, C)`, `labels (N,)` in `0..C`
    expanded to one-hot targets (C = background, all 0: for the RPN's single channel label **0 is the foreground**,
    target 1, and label 1 the background, target 0), `weights (N,)` -> `sum(BCE(x, t) * w) / (avg_factor + eps)`."""
    _check_classification(logits, labels, weights)
    targets = _one_hot_without_background(labels, logits.shape[1], logits.dtype)
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return _reduce(loss, None if weights is None else weights.view(-1, 1).float(), avg_factor)


def l1_loss(
    predictions: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None, avg_factor: float
) -> torch.Tensor:
    """mmdet `L1Loss`: `sum(|prediction - target| * weight) / (avg_factor + eps)` over same-shape tensors (0 with
    gradients when there is no target)."""
    if predictions.shape != targets.shape or (weights is not None and weights.shape != targets.shape):
        raise ValueError(
            f"predictions, targets and weights must have one shape, got {tuple(predictions.shape)}, "
            f"{tuple(targets.shape)} and {None if weights is None else tuple(weights.shape)}."
        )
    if targets.numel() == 0:
        return predictions.sum() * 0
    return _reduce((predictions - targets).abs(), weights, avg_factor)


def classification_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """mmdet `accuracy(pred, target)` (top-1, in percent): the share of rows of `logits (N, C)` whose top class
    (`topk(1)`) is `labels (N,)`, times 100; 0 for no row."""
    if logits.shape[0] == 0:
        return logits.new_tensor(0.0)
    correct = logits.topk(1, dim=1)[1].t().eq(labels.view(1, -1))
    return correct.reshape(-1).float().sum(0) * (100.0 / logits.shape[0])


# --------------------------------------------------------------------------------------------- anchor heads


@dataclass(frozen=True)
class AnchorTargets:
    """The targets of an anchor head (RetinaNet, RPN) for a batch, per pyramid level `l` with `n_l` anchors (rows
    ordered `(y, x, a)`, as `AnchorGenerator.grid_anchors`):

    - `labels[l] (B, n_l)` int64: the class of positives (0 for the RPN's foreground), `num_classes` for the rest;
    - `label_weights[l] (B, n_l)` float32: 1 for sampled positives and negatives, 0 for ignored, unsampled and
      invalid anchors;
    - `bbox_targets[l] (B, n_l, 4)`: the encoded deltas of positives (`encode_deltas` with means / stds), 0 else;
    - `bbox_weights[l] (B, n_l, 4)`: 1 for positives, 0 else;
    - `avg_factor`: the loss normaliser, `sum_i max(#pos_i, 1)` (RetinaNet: no sampling), plus `sum_i max(#neg_i, 1)`
      with a sampler (RPN); per batch, not across processes (as the authors' training);
    - `assignments[i]`, `samples[i]`: image `i`'s assignment and sampling over its valid anchors only (indices into
      `anchors[valid]`, the index space of mmdet's `inside_flags`)."""

    labels: list[torch.Tensor]
    label_weights: list[torch.Tensor]
    bbox_targets: list[torch.Tensor]
    bbox_weights: list[torch.Tensor]
    avg_factor: int
    assignments: list[AssignResult]
    samples: list[SamplingResult]


def anchor_targets(
    anchors: Sequence[torch.Tensor],
    valid_flags: Sequence[Sequence[torch.Tensor]],
    gt_boxes: Sequence[torch.Tensor],
    gt_labels: Sequence[torch.Tensor] | None,
    num_classes: int,
    assigner: MaxIoUAssigner,
    sampler: RandomSampler | None = None,
    means: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
    stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    gt_boxes_ignore: Sequence[torch.Tensor | None] | None = None,
    generator: torch.Generator | None = None,
) -> AnchorTargets:
    """mmdet `AnchorHead.get_targets` (`allowed_border=-1`, `pos_weight=-1`, `unmap_outputs=True`).

    `anchors[l] (n_l, 4)`: the batch grid's anchors of level `l` (`AnchorGenerator.grid_anchors` of the padded batch
    feature sizes); `valid_flags[i][l] (n_l,)` bool: image `i`'s anchors inside its own padded size
    (`AnchorGenerator.valid_flags(sizes, pad_shape)`, mmdet's `inside_flags`); `gt_boxes[i] (n_i, 4)` in input
    pixels; `gt_labels[i] (n_i,)` class ids, or None for the RPN (positives get label 0, `num_classes` = 1).

    Per image, the valid anchors are assigned (`assigner`; the RPN's `RPN_ASSIGNER`, RetinaNet's
    `RETINANET_ASSIGNER`) and sampled (`sampler.sample(..., generator=generator)`, images in order; None = every
    positive and negative, mmdet's `PseudoSampler`); the results are spread back over all anchors (invalid anchors:
    background label, weight 0) and split by level. See `AnchorTargets`."""
    batch = len(gt_boxes)
    if len(valid_flags) != batch or (gt_labels is not None and len(gt_labels) != batch):
        raise ValueError(
            f"Give one valid_flags list and one gt_labels tensor per image (gt_boxes has {batch}), got "
            f"{len(valid_flags)} and {None if gt_labels is None else len(gt_labels)}."
        )
    level_sizes = [len(level) for level in anchors]
    flat_anchors = torch.cat(list(anchors))
    results = {key: [] for key in ("labels", "label_weights", "bbox_targets", "bbox_weights")}
    assignments, samples, num_pos, num_neg = [], [], 0, 0
    for image in range(batch):
        flags = torch.cat(list(valid_flags[image])).bool()
        if flags.shape != flat_anchors.shape[:1]:
            raise ValueError(f"valid_flags[{image}] cover {len(flags)} anchors, the levels have {len(flat_anchors)}.")
        if not bool(flags.any()):
            raise ValueError(f"Image {image} has no valid anchor: its pad_shape must be at least one stride.")
        valid_anchors = flat_anchors[flags]
        labels_i = None if gt_labels is None else gt_labels[image]
        ignore_i = None if gt_boxes_ignore is None else gt_boxes_ignore[image]
        # mmdet gives the assigner no labels when it samples (the RPN): its sampled results carry no labels then.
        assignment = assigner.assign(valid_anchors, gt_boxes[image], None if sampler else labels_i, ignore_i)
        if sampler is None:
            sample = pseudo_sample(assignment, valid_anchors, gt_boxes[image])
        else:
            sample = sampler.sample(assignment, valid_anchors, gt_boxes[image], labels_i, generator)
        labels = valid_anchors.new_full((len(valid_anchors),), num_classes, dtype=torch.long)
        label_weights = valid_anchors.new_zeros(len(valid_anchors))
        bbox_targets = torch.zeros_like(valid_anchors)
        bbox_weights = torch.zeros_like(valid_anchors)
        pos, neg = sample.pos_indices, sample.neg_indices
        if len(pos):
            bbox_targets[pos] = encode_deltas(sample.pos_boxes, sample.pos_gt_boxes, means, stds)
            bbox_weights[pos] = 1.0
            labels[pos] = 0 if labels_i is None else labels_i.long()[sample.pos_assigned_gt]
            label_weights[pos] = 1.0
        label_weights[neg] = 1.0
        for key, value, fill in (
            ("labels", labels, num_classes),
            ("label_weights", label_weights, 0),
            ("bbox_targets", bbox_targets, 0),
            ("bbox_weights", bbox_weights, 0),
        ):
            spread = value.new_full((len(flat_anchors), *value.shape[1:]), fill)
            spread[flags] = value
            results[key].append(spread)
        assignments.append(assignment)
        samples.append(sample)
        num_pos += max(len(pos), 1)
        num_neg += max(len(neg), 1)
    levels = {key: list(torch.stack(value).split(level_sizes, dim=1)) for key, value in results.items()}
    return AnchorTargets(
        **levels,
        avg_factor=num_pos + num_neg if sampler is not None else num_pos,
        assignments=assignments,
        samples=samples,
    )


def anchor_head_losses(
    cls_scores: Sequence[torch.Tensor],
    bbox_preds: Sequence[torch.Tensor],
    targets: AnchorTargets,
    classification: str = "focal",
    gamma: float = 2.0,
    alpha: float = 0.25,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """mmdet `AnchorHead.loss`: per level `l`, the head's `cls_scores[l] (B, A * C, H_l, W_l)` (channel `a * C + c`)
    and `bbox_preds[l] (B, A * 4, H_l, W_l)` against `targets` (`anchor_targets` over the same anchors) ->
    `(loss_cls, loss_bbox)`, two lists of per-level scalars (mmdet's log sums each list: `total_detection_loss`).

    Classification: `"focal"` (RetinaNet: `sigmoid_focal_loss` with `gamma`, `alpha`) or `"sigmoid_cross_entropy"`
    (the RPN, C = 1: `sigmoid_cross_entropy_loss`); boxes: `l1_loss` on the encoded deltas. Every level is divided by
    the batch's `targets.avg_factor`."""
    if classification not in ("focal", "sigmoid_cross_entropy"):
        raise ValueError(f"classification must be 'focal' or 'sigmoid_cross_entropy', got {classification!r}.")
    if not len(cls_scores) == len(bbox_preds) == len(targets.labels):
        raise ValueError(
            f"Got {len(cls_scores)} cls_scores and {len(bbox_preds)} bbox_preds levels for {len(targets.labels)} "
            "target levels."
        )
    losses_cls, losses_bbox = [], []
    for level, (cls_score, bbox_pred) in enumerate(zip(cls_scores, bbox_preds, strict=True)):
        batch, anchors = targets.labels[level].shape
        height, width = cls_score.shape[-2:]
        per_cell = anchors // max(height * width, 1)
        if (
            cls_score.dim() != 4
            or per_cell * height * width != anchors
            or cls_score.shape[0] != batch
            or cls_score.shape[1] % max(per_cell, 1)
            or bbox_pred.shape != (batch, 4 * per_cell, height, width)
        ):
            raise ValueError(
                f"Level {level}: cls_score {tuple(cls_score.shape)} and bbox_pred {tuple(bbox_pred.shape)} must be "
                f"(batch, A * C, H, W) and (batch, A * 4, H, W) with H * W * A = the targets' {anchors} anchors and "
                f"batch {batch}."
            )
        num_channels = cls_score.shape[1] // per_cell
        logits = cls_score.permute(0, 2, 3, 1).reshape(-1, num_channels)
        labels, label_weights = targets.labels[level].reshape(-1), targets.label_weights[level].reshape(-1)
        if classification == "focal":
            losses_cls.append(sigmoid_focal_loss(logits, labels, label_weights, targets.avg_factor, gamma, alpha))
        else:
            losses_cls.append(sigmoid_cross_entropy_loss(logits, labels, label_weights, targets.avg_factor))
        deltas = bbox_pred.permute(0, 2, 3, 1).reshape(-1, 4)
        losses_bbox.append(
            l1_loss(
                deltas,
                targets.bbox_targets[level].reshape(-1, 4),
                targets.bbox_weights[level].reshape(-1, 4),
                targets.avg_factor,
            )
        )
    return losses_cls, losses_bbox


# ---------------------------------------------------------------------------------------------- R-CNN heads


class RCNNTargets(NamedTuple):
    """The box head's targets for the sampled RoIs of a batch (per image its positives then its negatives, the order
    of `box_ops.sampled_rois`): `labels (N,)` int64 (`num_classes` = background), `label_weights (N,)` float32 (all
    1), `bbox_targets (N, 4)` encoded deltas of positives (0 for negatives), `bbox_weights (N, 4)` (1 for
    positives)."""

    labels: torch.Tensor
    label_weights: torch.Tensor
    bbox_targets: torch.Tensor
    bbox_weights: torch.Tensor


def rcnn_targets(
    samples: Sequence[SamplingResult],
    num_classes: int,
    means: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
    stds: Sequence[float] = RCNN_BOX_STDS,
) -> RCNNTargets:
    """mmdet `BBoxHead.get_targets` (`pos_weight=-1`, concatenated over images): per image, the positives take their
    gt label and the deltas of their gt box (`encode_deltas(pos_boxes, pos_gt_boxes, means, stds)`), the negatives
    the background label `num_classes`. The samples need labels (`RandomSampler.sample` with `gt_labels`)."""
    parts = []
    for sample in samples:
        if sample.pos_gt_labels is None:
            raise ValueError("The R-CNN samples carry no labels: assign with gt_labels (MaxIoUAssigner.assign).")
        num_pos, num_neg = len(sample.pos_indices), len(sample.neg_indices)
        boxes = sample.boxes
        labels = boxes.new_full((num_pos + num_neg,), num_classes, dtype=torch.long)
        labels[:num_pos] = sample.pos_gt_labels
        bbox_targets = boxes.new_zeros(num_pos + num_neg, 4)
        bbox_weights = boxes.new_zeros(num_pos + num_neg, 4)
        if num_pos:
            bbox_targets[:num_pos] = encode_deltas(sample.pos_boxes, sample.pos_gt_boxes, means, stds)
            bbox_weights[:num_pos] = 1.0
        parts.append((labels, boxes.new_ones(num_pos + num_neg), bbox_targets, bbox_weights))
    if not parts:
        raise ValueError("rcnn_targets needs the samples of at least one image.")
    return RCNNTargets(*(torch.cat(column) for column in zip(*parts, strict=True)))


def rcnn_losses(cls_score: torch.Tensor, bbox_pred: torch.Tensor, targets: RCNNTargets) -> dict[str, torch.Tensor]:
    """mmdet `BBoxHead.loss` (class-specific regression): `cls_score (N, K + 1)` (background last), `bbox_pred
    (N, 4 * K)` (columns `4 * k + j`) of the sampled RoIs, `targets` from `rcnn_targets` -> `{"loss_cls", "acc",
    "loss_bbox"}`:

    - `loss_cls`: softmax cross-entropy weighted by `label_weights`, divided by `max(#(label_weights > 0), 1)`;
    - `acc`: `classification_accuracy` (percent, logged);
    - `loss_bbox`: L1 between the gt class's 4 deltas of each positive and its targets, divided by N (all sampled
      RoIs, not the positives); `bbox_pred[positives].sum()` (0 with gradients) without positives.
    An empty batch of RoIs gives zero losses and accuracy."""
    labels = targets.labels
    if cls_score.dim() != 2 or bbox_pred.dim() != 2 or not len(cls_score) == len(bbox_pred) == len(labels):
        raise ValueError(
            f"cls_score (N, K + 1) and bbox_pred (N, 4 K) must have one row per target ({len(labels)}), got "
            f"{tuple(cls_score.shape)} and {tuple(bbox_pred.shape)}."
        )
    num_classes = cls_score.shape[1] - 1
    if bbox_pred.shape[1] != 4 * num_classes:
        raise ValueError(f"bbox_pred must have 4 * {num_classes} columns (class-specific), got {bbox_pred.shape[1]}.")
    losses = {}
    if cls_score.numel() > 0:
        avg_factor = max(torch.sum(targets.label_weights > 0).float().item(), 1.0)
        loss = F.cross_entropy(cls_score, labels, reduction="none")
        losses["loss_cls"] = _reduce(loss, targets.label_weights.float(), avg_factor)
    else:
        losses["loss_cls"] = cls_score.sum()
    losses["acc"] = classification_accuracy(cls_score, labels)
    positives = (labels >= 0) & (labels < num_classes)
    if bool(positives.any()):
        pos_pred = bbox_pred.view(len(bbox_pred), -1, 4)[positives, labels[positives]]
        losses["loss_bbox"] = l1_loss(
            pos_pred, targets.bbox_targets[positives], targets.bbox_weights[positives], targets.bbox_targets.size(0)
        )
    else:
        losses["loss_bbox"] = bbox_pred[positives].sum()
    return losses


def mask_targets(
    samples: Sequence[SamplingResult], gt_masks: Sequence[torch.Tensor], mask_size: int = 28
) -> torch.Tensor:
    """mmdet `FCNMaskHead.get_targets` (`mask_target`, binarised): for each positive RoI (images in order), its gt
    box's bitmap `gt_masks[i] (n_i, H_i, W_i)` (0/1, padded to the image's own pad size as the train pipeline pads it)
    cropped and resized to `mask_size x mask_size` by `roi_align(..., spatial_scale=1, sampling_ratio=0,
    aligned=True)` on the positive box clipped to `[0, W_i] x [0, H_i]`, then `>= 0.5` -> `(P, mask_size,
    mask_size)` float32 0/1, in the order of `box_ops.sampled_rois(samples, positives_only=True)`."""
    if len(gt_masks) != len(samples):
        raise ValueError(f"Give one gt_masks tensor per image: {len(samples)} samples, {len(gt_masks)} masks.")
    targets = []
    for image, (sample, masks) in enumerate(zip(samples, gt_masks, strict=True)):
        if masks.dim() != 3:
            raise ValueError(f"gt_masks[{image}] must be (num_gts, height, width), got {tuple(masks.shape)}.")
        boxes = sample.pos_boxes
        if len(boxes) == 0:
            continue
        if int(sample.pos_assigned_gt.max()) >= len(masks):
            raise ValueError(f"gt_masks[{image}] has {len(masks)} masks, fewer than the image's gt boxes.")
        height, width = masks.shape[1:]
        clipped = boxes.clone()
        clipped[:, 0::2] = clipped[:, 0::2].clamp(0, width)
        clipped[:, 1::2] = clipped[:, 1::2].clamp(0, height)
        # Each positive pools from its own gt bitmap (the RoI's batch index): one float copy of the image's masks,
        # not one per positive (mmdet's `index_select`: up to 128 full-image bitmaps per image on COCO).
        rois = torch.cat([sample.pos_assigned_gt.to(boxes)[:, None], clipped], dim=1)
        bitmaps = masks.to(boxes.device, boxes.dtype)[:, None]
        targets.append((roi_align(bitmaps, rois, mask_size, 1.0, 0, True)[:, 0] >= 0.5).float())
    if not targets:
        device = gt_masks[0].device if len(gt_masks) else None
        return torch.zeros(0, mask_size, mask_size, device=device)
    return torch.cat(targets)


def mask_loss(mask_logits: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """mmdet `FCNMaskHead.loss` (`mask_cross_entropy`): `mask_logits (P, K, M, M)` of the positive RoIs, `targets
    (P, M, M)` from `mask_targets`, `labels (P,)` their gt classes (`torch.cat([s.pos_gt_labels for s in
    samples])`) -> the binary cross-entropy with logits of each RoI's gt-class channel, averaged over all `P * M * M`
    pixels (`mask_logits.sum()`, 0 with gradients, for no RoI)."""
    if mask_logits.dim() != 4 or targets.shape != (mask_logits.shape[0], *mask_logits.shape[2:]):
        raise ValueError(
            f"mask_logits must be (P, K, M, M) and targets (P, M, M), got {tuple(mask_logits.shape)} and "
            f"{tuple(targets.shape)}."
        )
    if labels.shape != mask_logits.shape[:1]:
        raise ValueError(f"labels must be (P,) = ({mask_logits.shape[0]},), got {tuple(labels.shape)}.")
    if mask_logits.shape[0] == 0:
        return mask_logits.sum()
    rows = torch.arange(mask_logits.shape[0], device=mask_logits.device)
    return F.binary_cross_entropy_with_logits(mask_logits[rows, labels.long()], targets.to(mask_logits.dtype))
