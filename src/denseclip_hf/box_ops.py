"""Box and RoI operations of mmdet 2.28.2 / mmcv-full 1.7.2 in plain PyTorch, exact to their CPU kernels: anchors
(non-legacy `AnchorGenerator`), `DeltaXYWHBBoxCoder`, `bbox_overlaps`, `nms` / `batched_nms`, `RoIAlign`
(`aligned=True`, adaptive sampling), `SingleRoIExtractor`'s level mapping and the detectron2-style mask paste of
`FCNMaskHead`.

Boxes are `(x1, y1, x2, y2)` in pixels, float32, with no `+1` anywhere (mmdet 2.x's non-legacy convention). RoIs are
`(batch_index, x1, y1, x2, y2)`. Shipped as remote code with saved models: imports torch and math only.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# mmdet's `wh_ratio_clip=16 / 1000`: decoded log-width/height deltas are clamped to +-|log(16/1000)|.
MAX_LOG_RATIO = abs(math.log(16 / 1000))
# Rows of the suppression matrix computed at once by `nms` (the greedy pass works block by block), in tiles of at
# most NMS_TILE pairs: torch runs smaller elementwise operations on one thread, which avoids a thread sync per
# operation (costly on a busy CPU).
NMS_BLOCK = 128
NMS_TILE = 1 << 15
# `roi_align` pools RoIs in groups whose sample bands differ by less than this factor per axis, at most this many
# weighted feature terms at a time.
BAND_GROWTH = 1.25
ROI_ALIGN_TERMS = 1 << 22


def _check_boxes(boxes: torch.Tensor, name: str, width: int = 4) -> None:
    if not isinstance(boxes, torch.Tensor):
        raise ValueError(f"`{name}` must be a torch.Tensor, got {type(boxes).__name__}.")
    if boxes.dim() != 2 or boxes.shape[1] != width:
        raise ValueError(f"`{name}` must have shape (N, {width}), got {tuple(boxes.shape)}.")
    if not boxes.is_floating_point():
        raise ValueError(f"`{name}` must be a floating-point tensor (float32 as mmdet computes), got {boxes.dtype}.")


def _check_length(tensor: torch.Tensor, name: str, length: int, of: str) -> None:
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 1 or tensor.shape[0] != length:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"`{name}` must be a 1-D tensor with one entry per row of `{of}` ({length}), got {shape}.")


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
        raise ValueError(f"`{name}` must be a positive int or a (height, width) pair of them, got {value!r}.")
    return pair


# --------------------------------------------------------------------------------------------------------- anchors


class AnchorGenerator:
    """mmdet's non-legacy `AnchorGenerator` (`mmdet/core/anchor/anchor_generator.py`): per level a square base size
    equal to its stride, anchors centred at `(x * stride, y * stride)` (centre offset 0), no `+1`.

    Give either `scales` (the RPN: `[8]`) or `octave_base_scale` and `scales_per_octave` (RetinaNet: 4 and 3, scales
    `octave_base_scale * 2 ** (i / scales_per_octave)` computed in float64, then stored as float32 as mmdet does).
    Anchor `a` of a cell is `ratio_index * len(scales) + scale_index` (ratios outer, scales inner: mmdet's
    `scale_major=True`).
    """

    def __init__(
        self,
        strides: Sequence[int],
        ratios: Sequence[float],
        scales: Sequence[float] | None = None,
        octave_base_scale: float | None = None,
        scales_per_octave: int | None = None,
    ) -> None:
        if not strides or not all(isinstance(stride, int) and stride > 0 for stride in strides):
            raise ValueError(f"`strides` must be a non-empty list of positive ints, got {strides!r}.")
        if not ratios or not all(ratio > 0 for ratio in ratios):
            raise ValueError(f"`ratios` must be a non-empty list of positive numbers, got {ratios!r}.")
        if (scales is None) == (octave_base_scale is None or scales_per_octave is None):
            raise ValueError("Give either `scales` or both `octave_base_scale` and `scales_per_octave`.")
        if scales is None:
            scales = [octave_base_scale * 2 ** (i / scales_per_octave) for i in range(scales_per_octave)]
        if not scales or not all(scale > 0 for scale in scales):
            raise ValueError(f"Anchor scales must be positive, got {list(scales)!r}.")
        self.strides = list(strides)
        self.ratios = torch.tensor(list(ratios), dtype=torch.float32)
        self.scales = torch.tensor(list(scales), dtype=torch.float32)
        self.base_anchors = [self._base_anchors(stride) for stride in self.strides]

    @property
    def num_base_anchors(self) -> int:
        """Anchors per feature-map cell (the same on every level)."""
        return len(self.ratios) * len(self.scales)

    def _base_anchors(self, base_size: int) -> torch.Tensor:
        """(A, 4) anchors of one level centred at 0, float32 as mmdet's `gen_single_level_base_anchors`."""
        h_ratios = torch.sqrt(self.ratios)
        w_ratios = 1 / h_ratios
        widths = (base_size * w_ratios[:, None] * self.scales[None, :]).view(-1)
        heights = (base_size * h_ratios[:, None] * self.scales[None, :]).view(-1)
        return torch.stack([-0.5 * widths, -0.5 * heights, 0.5 * widths, 0.5 * heights], dim=-1)

    def _check_sizes(self, featmap_sizes: Sequence[Sequence[int]]) -> None:
        if len(featmap_sizes) != len(self.strides):
            raise ValueError(f"Got {len(featmap_sizes)} feature-map sizes for {len(self.strides)} anchor strides.")

    def grid_anchors(
        self, featmap_sizes: Sequence[Sequence[int]], device: torch.device | str | None = None
    ) -> list[torch.Tensor]:
        """Anchors of every level: for a level of size `(H, W)` a float32 `(H * W * A, 4)` tensor, rows ordered
        `(y, x, a)`, anchor `a` of cell `(y, x)` = base anchor `a` shifted by `(x * stride, y * stride)`."""
        self._check_sizes(featmap_sizes)
        levels = []
        for (height, width), stride, base in zip(featmap_sizes, self.strides, self.base_anchors, strict=True):
            shift_x = torch.arange(width, device=device).to(torch.float32) * stride
            shift_y = torch.arange(height, device=device).to(torch.float32) * stride
            shift_yy, shift_xx = torch.meshgrid(shift_y, shift_x, indexing="ij")
            shifts = torch.stack([shift_xx, shift_yy, shift_xx, shift_yy], dim=-1).view(-1, 1, 4)
            levels.append((base.to(device)[None] + shifts).view(-1, 4))
        return levels

    def valid_flags(
        self,
        featmap_sizes: Sequence[Sequence[int]],
        pad_shape: Sequence[int],
        device: torch.device | str | None = None,
    ) -> list[torch.Tensor]:
        """Per level a bool `(H * W * A,)` tensor (rows as `grid_anchors`): True for the anchors of cells inside one
        image's own padded size `pad_shape = (pad_h, pad_w[, 3])` of a larger batch grid, i.e. cells with
        `x < ceil(pad_w / stride)` and `y < ceil(pad_h / stride)` (mmdet `valid_flags`; with `allowed_border=-1`
        these are the `inside_flags` of training)."""
        self._check_sizes(featmap_sizes)
        pad_h, pad_w = pad_shape[:2]
        levels = []
        for (height, width), stride in zip(featmap_sizes, self.strides, strict=True):
            valid_y = torch.arange(height, device=device) < min(math.ceil(pad_h / stride), height)
            valid_x = torch.arange(width, device=device) < min(math.ceil(pad_w / stride), width)
            valid = valid_y[:, None, None] & valid_x[None, :, None]
            levels.append(valid.expand(height, width, self.num_base_anchors).reshape(-1))
        return levels


# ---------------------------------------------------------------------------------------------------- box coding


def encode_deltas(
    proposals: torch.Tensor,
    targets: torch.Tensor,
    means: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
    stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
) -> torch.Tensor:
    """mmdet `DeltaXYWHBBoxCoder.encode` (`bbox2delta`): `(N, 4)` proposals and `(N, 4)` target boxes to `(N, 4)`
    deltas `((gx - px) / pw, (gy - py) / ph, log(gw / pw), log(gh / ph))`, then `(delta - means) / stds`; centres
    `(x1 + x2) / 2`, sizes `x2 - x1` (no +1), computed in float32."""
    _check_boxes(proposals, "proposals")
    _check_boxes(targets, "targets")
    if proposals.shape[0] != targets.shape[0]:
        raise ValueError(f"`proposals` ({proposals.shape[0]}) and `targets` ({targets.shape[0]}) differ in length.")
    proposals, targets = proposals.float(), targets.float()
    px, py = (proposals[:, 0] + proposals[:, 2]) * 0.5, (proposals[:, 1] + proposals[:, 3]) * 0.5
    pw, ph = proposals[:, 2] - proposals[:, 0], proposals[:, 3] - proposals[:, 1]
    gx, gy = (targets[:, 0] + targets[:, 2]) * 0.5, (targets[:, 1] + targets[:, 3]) * 0.5
    gw, gh = targets[:, 2] - targets[:, 0], targets[:, 3] - targets[:, 1]
    deltas = torch.stack([(gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)], dim=-1)
    return deltas.sub_(deltas.new_tensor(means)[None]).div_(deltas.new_tensor(stds)[None])


def decode_deltas(
    rois: torch.Tensor,
    deltas: torch.Tensor,
    means: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
    stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    max_shape: Sequence[int] | None = None,
) -> torch.Tensor:
    """mmdet `DeltaXYWHBBoxCoder.decode` (`delta2bbox`, the 2-D path): `(N, 4)` boxes and `(N, 4 * K)` deltas
    (class-specific when K > 1: each box is decoded with each class's 4 deltas) to `(N, 4 * K)` boxes.

    `d = deltas * stds + means`; `dw, dh` clamped to `[-MAX_LOG_RATIO, MAX_LOG_RATIO]` (|log(16/1000)|, both
    directions); centre `p + pwh * dxy`, size `pwh * exp(dwh)`, corners `centre -+ size / 2`. With `max_shape =
    (h, w[, 3])` (the resized, unpadded image) x is clipped to `[0, w]` and y to `[0, h]` (no -1)."""
    _check_boxes(rois, "rois")
    if not isinstance(deltas, torch.Tensor) or deltas.dim() != 2 or deltas.shape[1] % 4 or deltas.shape[1] == 0:
        shape = tuple(deltas.shape) if isinstance(deltas, torch.Tensor) else type(deltas).__name__
        raise ValueError(f"`deltas` must have shape (N, 4 * num_classes), got {shape}.")
    if deltas.shape[0] != rois.shape[0]:
        raise ValueError(f"`rois` ({rois.shape[0]}) and `deltas` ({deltas.shape[0]}) differ in length.")
    num_boxes, num_classes = deltas.shape[0], deltas.shape[1] // 4
    if num_boxes == 0:
        return deltas
    deltas = deltas.reshape(-1, 4)
    denormalised = deltas * deltas.new_tensor(stds).view(1, -1) + deltas.new_tensor(means).view(1, -1)
    dxy, dwh = denormalised[:, :2], denormalised[:, 2:]
    rois = rois.repeat(1, num_classes).reshape(-1, 4)
    pxy = (rois[:, :2] + rois[:, 2:]) * 0.5
    pwh = rois[:, 2:] - rois[:, :2]
    dwh = dwh.clamp(min=-MAX_LOG_RATIO, max=MAX_LOG_RATIO)
    gxy = pxy + pwh * dxy
    gwh = pwh * dwh.exp()
    boxes = torch.cat([gxy - gwh * 0.5, gxy + gwh * 0.5], dim=-1)
    if max_shape is not None:
        boxes[:, 0::2].clamp_(min=0, max=max_shape[1])
        boxes[:, 1::2].clamp_(min=0, max=max_shape[0])
    return boxes.reshape(num_boxes, -1)


# ------------------------------------------------------------------------------------------------ overlaps, NMS


def _intersections(boxes1: Sequence[torch.Tensor], boxes2: Sequence[torch.Tensor]) -> torch.Tensor:
    """Intersection areas `max(0, min(x2) - max(x1)) * max(0, min(y2) - max(y1))` of boxes given as 4 coordinate
    tensors each (`x1, y1, x2, y2`, broadcast against each other), float32 in the order of mmcv's CPU NMS kernel and
    mmdet's `bbox_overlaps`."""
    x1, y1, x2, y2 = boxes1
    u1, v1, u2, v2 = boxes2
    width = torch.minimum(x2, u2).sub_(torch.maximum(x1, u1)).clamp_(min=0)
    height = torch.minimum(y2, v2).sub_(torch.maximum(y1, v1)).clamp_(min=0)
    return width.mul_(height)


def _areas(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor, mode: str = "iou", eps: float = 1e-6) -> torch.Tensor:
    """mmdet `bbox_overlaps(boxes1, boxes2, mode)` (not aligned): `(N, 4)` x `(M, 4)` -> `(N, M)` overlaps.

    `mode="iou"`: `inter / max(area1 + area2 - inter, eps)`; `mode="iof"` (intersection over foreground, the area of
    `boxes1`): `inter / max(area1, eps)`. Areas `(x2 - x1) * (y2 - y1)`, no +1."""
    _check_boxes(boxes1, "boxes1")
    _check_boxes(boxes2, "boxes2")
    if mode not in ("iou", "iof"):
        raise ValueError(f"`mode` must be 'iou' or 'iof', got {mode!r}.")
    if boxes1.shape[0] == 0 or boxes2.shape[0] == 0:
        return boxes1.new_zeros(boxes1.shape[0], boxes2.shape[0])
    overlap = _intersections(boxes1.T[:, :, None], boxes2.T[:, None, :])
    area1 = _areas(boxes1)
    union = area1[:, None] + _areas(boxes2)[None, :] - overlap if mode == "iou" else area1[:, None]
    return overlap / torch.maximum(union, union.new_tensor([eps]))


def _check_nms_input(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> None:
    _check_boxes(boxes, "boxes")
    _check_length(scores, "scores", boxes.shape[0], "boxes")
    if boxes.dtype != torch.float32 or scores.dtype != torch.float32:
        raise ValueError(
            f"`boxes` and `scores` must be float32 (mmcv's nms kernel), got {boxes.dtype}, {scores.dtype}."
        )
    if not isinstance(iou_threshold, (int, float)) or not 0 <= iou_threshold <= 1:
        raise ValueError(f"`iou_threshold` must be a number in [0, 1], got {iou_threshold!r}.")


def _take(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`values[index]` along dim 0 (as `index_select`, which stays on one thread up to far more indices than
    `values[index]`: a thread sync per operation is costly on a busy CPU)."""
    return values.index_select(0, index.reshape(-1)).view(*index.shape, *values.shape[1:])


def _select(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`values[mask]` for same-shape `values` and bool `mask` (one thread, as `_take`)."""
    return values.reshape(-1).index_select(0, mask.reshape(-1).nonzero().view(-1))


def _any_row(matrix: torch.Tensor) -> torch.Tensor:
    """`matrix.any(0)` of a non-empty bool `(k, m)` matrix (as uint8: an order of magnitude faster on CPU)."""
    return matrix.view(torch.uint8).amax(0).bool()


def _x_runs(x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Boxes with x extents `[x1, x2]` `(N,)` split into runs along x that no box spans (in increasing x1, a run starts
    where x1 reaches the largest x2 before it): boxes of different runs never overlap with a positive width. Returns
    `(by_x1, first, end)`: the boxes by increasing x1, and for each box the positions `[first, end)` of its run in
    `by_x1`."""
    x1_sorted, by_x1 = x1.sort()
    reach = _take(x2, by_x1).cummax(0).values
    starts = torch.ones_like(by_x1, dtype=torch.bool)
    starts[1:] = x1_sorted[1:] >= reach[:-1]
    bounds = torch.cat([starts.nonzero().view(-1), by_x1.new_tensor([len(x1)])])
    run = starts.cumsum(0) - 1
    first = torch.empty_like(by_x1).scatter_(0, by_x1, _take(bounds, run))
    end = torch.empty_like(by_x1).scatter_(0, by_x1, _take(bounds, run + 1))
    return by_x1, first, end


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """mmcv `nms(boxes, scores, iou_threshold)` (offset 0) exactly as its CPU kernel: `(N, 4)` float32 boxes, `(N,)`
    float32 scores -> `(K,)` int64 indices of the kept boxes, by decreasing score.

    Order = `scores.sort(descending=True)` (torch's unstable sort: equal scores are ordered as torch orders them);
    greedily, a box is dropped when `inter / (area_i + area_j - inter) > float32(iou_threshold)` for a kept box `i`
    ranked before it, with the kernel's float32 operations in its order (areas without +1), so borderline cases match
    bit for bit.

    Vectorised: ranked boxes are taken `NMS_BLOCK` at a time; the greedy pass inside a block is solved on its
    suppression matrix, and the block's kept boxes then remove the later boxes they suppress: every later box still
    in, or (when fewer, as for the class-offset boxes of `batched_nms`) the boxes of their own x-runs (`_x_runs`).
    Pairs are tested in tiles of at most `NMS_TILE`."""
    _check_nms_input(boxes, scores, iou_threshold)
    count = boxes.shape[0]
    order = scores.sort(descending=True)[1]
    if count == 0:
        return order
    device = boxes.device
    ranked = _take(boxes, order)
    coordinates = [column.contiguous() for column in ranked.unbind(1)]
    areas = _areas(ranked)
    threshold = torch.tensor(iou_threshold, dtype=torch.float32, device=device)
    by_x1, first, end = _x_runs(coordinates[0], coordinates[2])

    def exceeds(rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """IoU of the ranked boxes `rows` and `columns` (index tensors, broadcast) above the threshold."""
        overlap = _intersections([_take(c, rows) for c in coordinates], [_take(c, columns) for c in coordinates])
        union = (_take(areas, rows) + _take(areas, columns)).sub_(overlap)
        return overlap.div_(union) > threshold

    removed = torch.zeros(count, dtype=torch.bool, device=device)
    steps = torch.arange(NMS_BLOCK, device=device)
    upper = steps[:, None] < steps[None, :]
    kept = []
    for start in range(0, count, NMS_BLOCK):
        stop = min(start + NMS_BLOCK, count)
        candidates = _select(torch.arange(start, stop, device=device), ~removed[start:stop])
        if len(candidates) == 0:
            continue
        # The greedy pass inside the block as a fixed point: a box is kept when no kept box ranked before it
        # suppresses it (position p is final after p rounds; usually a few rounds suffice).
        suppresses = exceeds(candidates[:, None], candidates[None, :]) & upper[: len(candidates), : len(candidates)]
        survivors = torch.ones(len(candidates), dtype=torch.bool, device=device)
        while True:
            update = ~_any_row(suppresses & survivors[:, None])
            if torch.equal(update, survivors):
                break
            survivors = update
        rows = _select(candidates, survivors)
        kept.append(rows)
        later = _select(torch.arange(stop, count, device=device), ~removed[stop:])
        row_first = _take(first, rows)
        width, tile = int((_take(end, rows) - row_first).max()), max(1, NMS_TILE // len(rows))
        if width < len(later):  # the boxes of the kept boxes' x-runs
            for offsets in torch.arange(width, device=device).split(tile):
                positions = row_first[:, None] + offsets
                columns = _take(by_x1, positions.clamp(max=count - 1))
                hits = exceeds(rows[:, None], columns) & (positions < _take(end, rows)[:, None]) & (columns >= stop)
                removed.index_fill_(0, _select(columns, hits), True)
        else:
            for columns in later.split(tile):
                removed.index_fill_(0, _select(columns, _any_row(exceeds(rows[:, None], columns[None, :]))), True)
    return _take(order, torch.cat(kept))


def batched_nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    idxs: torch.Tensor,
    iou_threshold: float,
    split_threshold: int = 10000,
) -> tuple[torch.Tensor, torch.Tensor]:
    """mmcv `batched_nms(boxes, scores, idxs, dict(type='nms', iou_threshold=...))`: NMS within each class `idxs`.

    `(N, 4)` float32 boxes, `(N,)` float32 scores, `(N,)` integer classes -> `(dets (K, 5), keep (K,))`: `dets` =
    original boxes of the kept rows with their score, `keep` their indices, by decreasing score. Classes are separated
    by offsetting the boxes by `idx * (boxes.max() + 1)` (float32); below `split_threshold` boxes ONE `nms` runs on
    the offset boxes, otherwise one `nms` per class (on the offset boxes too), the kept rows then re-sorted with
    `sort(descending=True)`. The two paths can order equal scores differently, as mmcv's do."""
    _check_nms_input(boxes, scores, iou_threshold)
    _check_length(idxs, "idxs", boxes.shape[0], "boxes")
    if idxs.is_floating_point() or idxs.dtype == torch.bool:
        raise ValueError(f"`idxs` must be an integer tensor of class indices, got {idxs.dtype}.")
    if boxes.shape[0] == 0:
        return boxes.new_zeros(0, 5), torch.zeros(0, dtype=torch.long, device=boxes.device)
    offsets = idxs.to(boxes) * (boxes.max() + torch.tensor(1).to(boxes))
    boxes_for_nms = boxes + offsets[:, None]
    if boxes.shape[0] < split_threshold:
        keep = nms(boxes_for_nms, scores, iou_threshold)
        kept_scores = _take(scores, keep)
    else:
        # Per class, its rows in increasing order (mmcv: `(idxs == idx).nonzero()`).
        by_class = torch.argsort(idxs, stable=True)
        counts = torch.unique_consecutive(_take(idxs, by_class), return_counts=True)[1]
        selected = torch.zeros_like(scores, dtype=torch.bool)
        for rows in by_class.split(counts.tolist()):
            class_keep = nms(_take(boxes_for_nms, rows), _take(scores, rows), iou_threshold)
            selected.index_fill_(0, _take(rows, class_keep), True)
        keep = selected.nonzero().view(-1)
        kept_scores, order = _take(scores, keep).sort(descending=True)
        keep = _take(keep, order)
    return torch.cat([_take(boxes, keep), kept_scores[:, None]], dim=-1), keep


# ---------------------------------------------------------------------------------------------------------- RoIs


def _axis_bands(
    start: torch.Tensor, bin_size: torch.Tensor, grid: torch.Tensor, pooled: int, length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The bilinear samples of mmcv's RoIAlign along one axis (rows or columns) for N RoIs, summed per bin over the
    cells they touch.

    Sample `i` of bin `p` sits at `start + p * bin + (i + 0.5) * bin / grid` (the kernel's order), for
    `i < grid` of its RoI. Samples outside `[-1, length]` count as 0; the others are clamped to >= 0 and interpolate
    between cell `low = int(y)` (weight `1 - ly`) and `low + 1` (weight `ly = y - low`), except from the last cell
    on, where both are `length - 1` (and `ly = 0`). Returns `(first, weights, lengths)`: bin `p` of RoI `n` puts
    weight `weights[n, p, k]` on cell `first[n, p] + k`, `first (N, P)`, `weights (N, P, L)`, and `lengths (N,)` the
    number of cells (at least 1) that the widest bin of each RoI touches."""
    count, device, dtype = start.shape[0], start.device, start.dtype
    samples = int(grid.max())
    if samples <= 0:
        return (
            start.new_zeros(count, pooled, dtype=torch.long),
            start.new_zeros(count, pooled, 1),
            grid.new_ones(count),
        )
    steps = torch.arange(samples, dtype=dtype, device=device) + 0.5
    bins = torch.arange(pooled, dtype=dtype, device=device)
    start, bin_size, grid = start[:, None, None], bin_size[:, None, None], grid[:, None, None]
    position = (start + bins[:, None] * bin_size) + (steps * bin_size) / grid.to(dtype)
    counted = (torch.arange(samples, device=device) < grid) & (position >= -1) & (position <= length)
    position = position.clamp(min=0)
    low = position.long()
    last = low >= length - 1
    low = low.clamp(max=length - 1)
    high = torch.where(last, low, low + 1)
    high_weight = torch.where(last, 0.0, position - low).masked_fill_(~counted, 0)
    low_weight = (1 - high_weight).masked_fill_(~counted, 0)
    first = torch.where(counted, low, torch.iinfo(torch.long).max).amin(2)
    end = torch.where(counted, high, -1).amax(2) + 1
    first = torch.where(end > 0, first, 0)
    lengths = (end - first).clamp(min=1)
    span = int(lengths.max())
    weights = torch.zeros(count, pooled, span, dtype=dtype, device=device)
    weights.scatter_add_(2, (low - first[:, :, None]).clamp(0, span - 1), low_weight)
    weights.scatter_add_(2, (high - first[:, :, None]).clamp(0, span - 1), high_weight)
    return first, weights, lengths.amax(1)


def roi_align(
    features: torch.Tensor,
    rois: torch.Tensor,
    output_size: int | Sequence[int],
    spatial_scale: float,
    sampling_ratio: int = 0,
    aligned: bool = True,
) -> torch.Tensor:
    """mmcv `RoIAlign(output_size, spatial_scale, sampling_ratio, pool_mode='avg', aligned)` (its CPU kernel):
    `features (B, C, H, W)`, `rois (N, 5)` rows `(batch_index, x1, y1, x2, y2)` in image pixels -> `(N, C, PH, PW)`
    (in channels-last memory: `.permute(0, 2, 3, 1)` of it is contiguous).

    A RoI maps to `x * spatial_scale - 0.5` (`aligned=True`; no shift and sizes at least 1 when False), is split
    into `PH x PW` bins, and each bin averages `gh x gw` bilinear samples at the centres of a regular sub-grid:
    `gh = ceil(roi_h / PH)`, `gw = ceil(roi_w / PW)` per RoI (adaptive) when `sampling_ratio` is 0, else
    `sampling_ratio`; the sum is divided by `max(gh * gw, 1)`. Samples outside `[-1, H] x [-1, W]` count as 0, the
    others are clamped to the map (see `_axis_bands`); zero-size RoIs give 0. Negative sizes (x2 < x1) are an error
    with `aligned=True`, as in mmcv.

    The bilinear weights factor into rows and columns: a bin is the weighted sum of the feature vectors in the band
    of rows and columns its samples touch, computed as one `embedding_bag` over the channels-last feature rows (a
    copy of `features` unless it is channels-last already). RoIs are grouped by band size (classes growing by
    `BAND_GROWTH`), at most `ROI_ALIGN_TERMS` weighted terms at a time. Differentiable w.r.t. `features` (not
    `rois`, as mmcv's op)."""
    if not isinstance(features, torch.Tensor) or features.dim() != 4 or not features.is_floating_point():
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"`features` must be a floating-point (B, C, H, W) tensor, got {shape}.")
    _check_boxes(rois, "rois", width=5)
    if rois.device != features.device:
        raise ValueError(f"`rois` ({rois.device}) and `features` ({features.device}) must be on the same device.")
    pooled_h, pooled_w = _pair(output_size, "output_size")
    if not isinstance(sampling_ratio, int) or sampling_ratio < 0:
        raise ValueError(f"`sampling_ratio` must be an int >= 0 (0: adaptive), got {sampling_ratio!r}.")
    batch, channels, height, width = features.shape
    count = rois.shape[0]
    if count == 0:
        return features.new_zeros(0, pooled_h, pooled_w, channels).permute(0, 3, 1, 2)
    # The kernel computes in the features' type: float64 for float64, float32 otherwise (mmcv: the type itself).
    rois = rois.detach().to(torch.float64 if features.dtype == torch.float64 else torch.float32)
    batch_index = rois[:, 0].long()
    if bool(((batch_index < 0) | (batch_index >= batch)).any()):
        raise ValueError(f"`rois[:, 0]` must be batch indices in [0, {batch}), got {rois[:, 0].unique().tolist()}.")
    offset = 0.5 if aligned else 0.0
    scale = torch.tensor(spatial_scale, dtype=torch.float32).to(rois.dtype)  # mmcv takes a C++ float
    start = rois[:, 1:3] * scale - offset
    size = (rois[:, 3:5] * scale - offset) - start
    if aligned and bool((size < 0).any()):
        bad = rois[(size < 0).any(1)][:3].tolist()
        raise ValueError(f"RoIs must have x2 >= x1 and y2 >= y1 (aligned RoIAlign), got e.g. {bad}.")
    if not aligned:
        size = size.clamp(min=1)
    pooled = torch.tensor([pooled_w, pooled_h], dtype=rois.dtype, device=rois.device)
    bins = size / pooled
    if sampling_ratio > 0:
        grids = torch.full((count, 2), sampling_ratio, dtype=torch.long, device=rois.device)
    else:
        grids = torch.ceil(size / pooled).long()
    divisor = (grids[:, 0] * grids[:, 1]).clamp(min=1).to(rois.dtype)
    first_column, weights_x, lengths_x = _axis_bands(start[:, 0], bins[:, 0], grids[:, 0], pooled_w, width)
    first_row, weights_y, lengths_y = _axis_bands(start[:, 1], bins[:, 1], grids[:, 1], pooled_h, height)
    weights_y = weights_y / divisor[:, None, None]

    # Each bin is a bag of (cell, weight) terms, padded with zero weights to the widest bin of its RoI's group (RoIs
    # of similar band sizes: classes growing by BAND_GROWTH); runs of consecutive RoIs within the term budget.
    classes = [
        torch.ceil(torch.log(lengths.float()) / math.log(BAND_GROWTH)).long() for lengths in (lengths_y, lengths_x)
    ]
    keys = classes[0] * (int(classes[1].max()) + 1) + classes[1]
    spans = torch.stack([lengths_y, lengths_x], 1)
    for key in keys.unique().tolist():
        spans[keys == key] = spans[keys == key].amax(0)
    terms = pooled_h * pooled_w * spans[:, 0] * spans[:, 1]
    ends = terms.cumsum(0)
    flat = features.permute(0, 2, 3, 1).contiguous().view(batch * height * width, channels)
    outputs, begin = [], 0
    while begin < count:
        limit = ends[begin] - terms[begin] + ROI_ALIGN_TERMS
        end = max(begin + 1, int(torch.searchsorted(ends, limit, right=True)))
        run = torch.arange(begin, end, device=rois.device)
        bags = _bags(run, spans[run], (first_row, weights_y, height), (first_column, weights_x, width), batch_index)
        pooled_run = F.embedding_bag(bags[0], flat, bags[2], mode="sum", per_sample_weights=bags[1].to(features.dtype))
        outputs.append(pooled_run.view(end - begin, pooled_h, pooled_w, channels))
        begin = end
    return (outputs[0] if len(outputs) == 1 else torch.cat(outputs)).permute(0, 3, 1, 2)


def _bags(
    rois: torch.Tensor,
    spans: torch.Tensor,
    rows: tuple[torch.Tensor, torch.Tensor, int],
    columns: tuple[torch.Tensor, torch.Tensor, int],
    batch_index: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The `embedding_bag` terms of RoIs `rois (n,)` (consecutive), bins padded to `spans (n, 2)` rows x columns:
    `(cells, weights, offsets)`; `cells` index the `(B * H * W)` channels-last feature rows, bin `(r, p, q)` sums
    `weights * rows` over `[offsets[i], offsets[i + 1])`, `i = (r * PH + p) * PW + q`. `rows` and `columns` are
    `_axis_bands`' `(first, weights, ...)` with the map's height / width."""
    (first_y, weights_y, height), (first_x, weights_x, width) = rows, columns
    pooled_h, pooled_w, device = first_y.shape[1], first_x.shape[1], rois.device
    sizes = pooled_h * pooled_w * spans[:, 0] * spans[:, 1]
    base = sizes.cumsum(0) - sizes  # each RoI's first term
    cells = torch.empty(int(sizes.sum()), dtype=torch.long, device=device)
    weights = torch.empty(len(cells), dtype=weights_y.dtype, device=device)
    offsets = torch.empty(len(rois), pooled_h * pooled_w, dtype=torch.long, device=device)
    for span_y, span_x in spans.unique(dim=0).tolist():
        group = ((spans[:, 0] == span_y) & (spans[:, 1] == span_x)).nonzero().view(-1)
        roi = rois[group]
        cells_y = (first_y[roi, :, None] + torch.arange(span_y, device=device)).clamp(max=height - 1)
        cells_x = (first_x[roi, :, None] + torch.arange(span_x, device=device)).clamp(max=width - 1)
        row_cells = (batch_index[roi, None, None] * height + cells_y) * width  # (n, PH, span_y)
        bag_cells = row_cells[:, :, None, :, None] + cells_x[:, None, :, None, :]  # (n, PH, PW, span_y, span_x)
        bag_weights = weights_y[roi, :, None, :span_y, None] * weights_x[roi, None, :, None, :span_x]
        size = pooled_h * pooled_w * span_y * span_x
        positions = base[group, None] + torch.arange(size, device=device)
        cells.index_copy_(0, positions.view(-1), bag_cells.reshape(-1))
        weights.index_copy_(0, positions.view(-1), bag_weights.reshape(-1))
        offsets.index_copy_(0, group, base[group, None] + torch.arange(0, size, span_y * span_x, device=device))
    return cells, weights, offsets.view(-1)


def boxes_to_rois(boxes: Sequence[torch.Tensor]) -> torch.Tensor:
    """mmdet `bbox2roi`: each image's boxes `boxes[i] (n_i, >= 4)` (extra columns, e.g. scores, dropped) ->
    `(sum n_i, 5)` RoIs, rows `(i, x1, y1, x2, y2)` image by image (`(0, 5)` for no image)."""
    rois = [torch.cat([box.new_full((len(box), 1), index), box[:, :4]], dim=1) for index, box in enumerate(boxes)]
    return torch.cat(rois) if rois else torch.zeros(0, 5)


def map_roi_levels(rois: torch.Tensor, num_levels: int, finest_scale: float = 56) -> torch.Tensor:
    """mmdet `SingleRoIExtractor.map_roi_levels`: `(N, 5)` RoIs -> `(N,)` int64 pyramid level
    `floor(log2(sqrt(w * h) / finest_scale + 1e-6))` clamped to `[0, num_levels - 1]` (float32; with 56 and 4 levels:
    below 112 px level 0, [112, 224) 1, [224, 448) 2, above 3)."""
    _check_boxes(rois, "rois", width=5)
    scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
    levels = torch.floor(torch.log2(scale / finest_scale + 1e-6))
    # Clamped after `.long()`, unlike mmdet: a NaN RoI goes to level 0 (and pools zeros there) instead of nowhere.
    return levels.long().clamp(min=0, max=num_levels - 1)


def multi_level_roi_align(
    features: Sequence[torch.Tensor],
    rois: torch.Tensor,
    output_size: int | Sequence[int],
    strides: Sequence[int],
    sampling_ratio: int = 0,
    aligned: bool = True,
    finest_scale: float = 56,
) -> torch.Tensor:
    """mmdet `SingleRoIExtractor` (`RoIAlign` layers): each RoI is pooled from the level `map_roi_levels` gives it
    (`features[l] (B, C, H_l, W_l)` with `spatial_scale = 1 / strides[l]`); `(N, 5)` RoIs -> `(N, C, PH, PW)`
    (channels-last memory, as `roi_align`), filled level by level (every RoI gets a level: mmdet's zero
    initialisation never shows). One level: plain `roi_align`. Channels-last `features` save `roi_align` a copy of
    each level per call."""
    if not features or len(features) != len(strides):
        raise ValueError(f"Got {len(features)} feature levels for {len(strides)} strides: give one stride per level.")
    if len(features) == 1:
        return roi_align(features[0], rois, output_size, 1 / strides[0], sampling_ratio, aligned)
    pooled_h, pooled_w = _pair(output_size, "output_size")
    levels = map_roi_levels(rois, len(features), finest_scale)
    output = features[0].new_empty(rois.shape[0], pooled_h, pooled_w, features[0].shape[1])  # every RoI has a level
    for level, (feature, stride) in enumerate(zip(features, strides, strict=True)):
        indices = (levels == level).nonzero().view(-1)
        if len(indices):
            pooled = roi_align(feature, rois[indices], output_size, 1 / stride, sampling_ratio, aligned)
            output.index_copy_(0, indices, pooled.permute(0, 2, 3, 1))
    return output.permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------------------------------------- masks


def paste_masks(
    masks: torch.Tensor, boxes: torch.Tensor, image_size: Sequence[int], threshold: float = 0.5
) -> torch.Tensor:
    """mmdet `FCNMaskHead.get_seg_masks` / `_do_paste_mask` on CPU (detectron2's paste): `(n, M, M)` or
    `(n, 1, M, M)` mask probabilities, `(n, 4)` float32 boxes in the output frame, `image_size = (H, W)` -> bool
    `(n, H, W)`.

    Pixel `(y, x)` samples its mask at `((x + 0.5 - x1) / (x2 - x1) * 2 - 1, (y + 0.5 - y1) / (y2 - y1) * 2 - 1)`
    (float32; an infinite coordinate becomes 0) with `grid_sample(bilinear, zeros, align_corners=False)`, and is set
    when the value is `>= threshold`. As mmdet's CPU path, box by box over the box's pixels
    `[floor(x1) - 1, ceil(x2) + 1) x [floor(y1) - 1, ceil(y2) + 1)` clipped to the image (memory: one box at a time);
    pixels further out are at most half-weighted by the border, so below a threshold >= 0.5 either way."""
    if not isinstance(masks, torch.Tensor) or not masks.is_floating_point() or masks.dim() not in (3, 4):
        raise ValueError("`masks` must be float probabilities of shape (n, M, M) or (n, 1, M, M).")
    if masks.dim() == 4:
        if masks.shape[1] != 1:
            raise ValueError(f"`masks` of shape (n, 1, M, M) must have 1 channel, got {tuple(masks.shape)}.")
        masks = masks[:, 0]
    _check_boxes(boxes, "boxes")
    if boxes.shape[0] != masks.shape[0]:
        raise ValueError(f"`masks` ({masks.shape[0]}) and `boxes` ({boxes.shape[0]}) differ in length.")
    height, width = _pair(tuple(int(v) for v in image_size), "image_size")
    boxes = boxes.float()
    pasted = torch.zeros(len(masks), height, width, dtype=torch.bool, device=masks.device)
    for i in range(len(masks)):
        box = boxes[i : i + 1]
        x0, y0 = (box[0, :2].floor() - 1).clamp(min=0).int().tolist()
        x1 = int(torch.clamp(box[0, 2].ceil() + 1, max=width))
        y1 = int(torch.clamp(box[0, 3].ceil() + 1, max=height))
        if x1 <= x0 or y1 <= y0:
            continue
        grid_x = (torch.arange(x0, x1, device=masks.device).float() + 0.5 - box[:, 0:1]) / (box[:, 2:3] - box[:, 0:1])
        grid_y = (torch.arange(y0, y1, device=masks.device).float() + 0.5 - box[:, 1:2]) / (box[:, 3:4] - box[:, 1:2])
        grid_x, grid_y = grid_x * 2 - 1, grid_y * 2 - 1
        grid_x = grid_x.masked_fill(torch.isinf(grid_x), 0)
        grid_y = grid_y.masked_fill(torch.isinf(grid_y), 0)
        grid = torch.stack(torch.broadcast_tensors(grid_x[:, None, :], grid_y[:, :, None]), dim=3)
        values = F.grid_sample(masks[i : i + 1, None].float(), grid, align_corners=False)
        pasted[i, y0:y1, x0:x1] = values[0, 0] >= threshold
    return pasted


# ------------------------------------------------------------------------------------ training: assign, sample


@dataclass(frozen=True)
class AssignResult:
    """mmdet's `AssignResult` for `N` candidate boxes (anchors or proposals) and `num_gts` gt boxes.

    `gt_indices (N,)` int64: 0 negative, -1 ignored, `k + 1` assigned to gt box `k`; `max_overlaps (N,)` float32: the
    candidate's highest IoU with any gt box (1 for gt boxes added as proposals); `labels (N,)` int64: the assigned gt
    box's label, -1 where none (None when no gt labels were given)."""

    num_gts: int
    gt_indices: torch.Tensor
    max_overlaps: torch.Tensor
    labels: torch.Tensor | None

    def add_gt(self, gt_labels: torch.Tensor) -> "AssignResult":
        """mmdet `AssignResult.add_gt_`: the gt boxes prepended as their own positives (indices `1..num_gts`, overlap
        1, their labels)."""
        own = torch.arange(1, len(gt_labels) + 1, dtype=torch.long, device=gt_labels.device)
        labels = None if self.labels is None else torch.cat([gt_labels.long(), self.labels])
        return AssignResult(
            self.num_gts,
            torch.cat([own, self.gt_indices]),
            torch.cat([self.max_overlaps.new_ones(len(gt_labels)), self.max_overlaps]),
            labels,
        )


def assign_wrt_overlaps(
    overlaps: torch.Tensor,
    gt_labels: torch.Tensor | None,
    pos_iou_thr: float,
    neg_iou_thr: float | tuple[float, float],
    min_pos_iou: float = 0.0,
    match_low_quality: bool = True,
    gt_max_assign_all: bool = True,
) -> AssignResult:
    """mmdet `MaxIoUAssigner.assign_wrt_overlaps`: `overlaps (num_gts, N)` (ignored candidates' columns at -1) ->
    `AssignResult`, by these rules in this order:

    1. every candidate starts ignored (-1);
    2. negative (0) when `0 <= max_overlap < neg_iou_thr` (or `lo <= max_overlap < hi` for a pair `(lo, hi)`);
    3. positive when `max_overlap >= pos_iou_thr`, assigned to its best gt box (the first one on ties);
    4. with `match_low_quality`, each gt box `i` whose best IoU is `>= min_pos_iou`, in increasing `i` (a later gt box
       overrides an earlier one), takes every candidate with exactly that IoU (`gt_max_assign_all`) or only its first
       best candidate. With `min_pos_iou = 0` (RetinaNet) a gt box that overlaps no candidate takes all the candidates
       with IoU 0, as in mmdet.

    Comparisons are in float32 against the thresholds as mmdet makes them (`tensor >= python_float`)."""
    num_gts, num_boxes = overlaps.shape
    gt_indices = overlaps.new_full((num_boxes,), -1, dtype=torch.long)
    if num_gts == 0 or num_boxes == 0:
        if num_gts == 0:
            gt_indices.fill_(0)
        labels = None if gt_labels is None else overlaps.new_full((num_boxes,), -1, dtype=torch.long)
        return AssignResult(num_gts, gt_indices, overlaps.new_zeros(num_boxes), labels)
    max_overlaps, argmax_overlaps = overlaps.max(dim=0)
    gt_max_overlaps, gt_argmax_overlaps = overlaps.max(dim=1)
    if isinstance(neg_iou_thr, (tuple, list)):
        negative = (max_overlaps >= neg_iou_thr[0]) & (max_overlaps < neg_iou_thr[1])
    else:
        negative = (max_overlaps >= 0) & (max_overlaps < neg_iou_thr)
    gt_indices.masked_fill_(negative, 0)
    positive = max_overlaps >= pos_iou_thr
    gt_indices = torch.where(positive, argmax_overlaps + 1, gt_indices)
    if match_low_quality:
        eligible = gt_max_overlaps >= min_pos_iou
        if gt_max_assign_all:
            matches = (overlaps == gt_max_overlaps[:, None]) & eligible[:, None]  # (num_gts, N) bool
            columns = matches.any(0).nonzero().view(-1)
            # The last gt box that takes each of these candidates (argmax: the first maximum of the flipped rows).
            last = num_gts - matches.index_select(1, columns).flip(0).to(torch.uint8).argmax(0)
            gt_indices = gt_indices.index_copy(0, columns, last)
        else:
            gt_numbers = torch.arange(1, num_gts + 1, device=overlaps.device)
            last = torch.zeros_like(gt_indices).scatter_reduce_(
                0, gt_argmax_overlaps[eligible], gt_numbers[eligible], "amax"
            )
            gt_indices = torch.where(last > 0, last, gt_indices)
    labels = None
    if gt_labels is not None:
        assigned = gt_indices > 0
        labels = torch.where(assigned, gt_labels.long()[(gt_indices - 1).clamp(min=0)], -1)
    return AssignResult(num_gts, gt_indices, max_overlaps, labels)


@dataclass(frozen=True)
class MaxIoUAssigner:
    """mmdet `MaxIoUAssigner` settings (thresholds on the IoU of candidates and gt boxes; see `assign_wrt_overlaps`).

    `ignore_iof_thr > 0` ignores the candidates whose intersection over their own area (`ignore_wrt_candidates`;
    otherwise over the ignored box's area) with a `gt_boxes_ignore` box (COCO crowd boxes) exceeds it; -1 (the
    authors' configs) turns it off. The authors' settings: `RETINANET_ASSIGNER`, `RPN_ASSIGNER`, `RCNN_ASSIGNER`."""

    pos_iou_thr: float
    neg_iou_thr: float | tuple[float, float]
    min_pos_iou: float = 0.0
    match_low_quality: bool = True
    gt_max_assign_all: bool = True
    ignore_iof_thr: float = -1.0
    ignore_wrt_candidates: bool = True

    def assign(
        self,
        boxes: torch.Tensor,
        gt_boxes: torch.Tensor,
        gt_labels: torch.Tensor | None = None,
        gt_boxes_ignore: torch.Tensor | None = None,
    ) -> AssignResult:
        """`boxes (N, 4)` candidates (a 5th score column, as proposals have, is dropped), `gt_boxes (num_gts, 4)`,
        `gt_labels (num_gts,)` -> `AssignResult` over the candidates."""
        if isinstance(boxes, torch.Tensor) and boxes.dim() == 2 and boxes.shape[1] == 5:
            boxes = boxes[:, :4]
        _check_boxes(gt_boxes, "gt_boxes")
        if gt_labels is not None:
            _check_length(gt_labels, "gt_labels", gt_boxes.shape[0], "gt_boxes")
        overlaps = box_iou(gt_boxes, boxes)
        if (
            self.ignore_iof_thr > 0
            and gt_boxes_ignore is not None
            and gt_boxes_ignore.numel() > 0
            and boxes.numel() > 0
        ):
            if self.ignore_wrt_candidates:
                ignore_overlaps = box_iou(boxes, gt_boxes_ignore, mode="iof").max(dim=1)[0]
            else:
                ignore_overlaps = box_iou(gt_boxes_ignore, boxes, mode="iof").max(dim=0)[0]
            overlaps[:, ignore_overlaps > self.ignore_iof_thr] = -1
        return assign_wrt_overlaps(
            overlaps,
            gt_labels,
            self.pos_iou_thr,
            self.neg_iou_thr,
            self.min_pos_iou,
            self.match_low_quality,
            self.gt_max_assign_all,
        )


# The authors' train_cfg (mmdet's retinanet_r50_fpn.py / mask_rcnn_r50_fpn.py).
RETINANET_ASSIGNER = MaxIoUAssigner(pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0.0)
RPN_ASSIGNER = MaxIoUAssigner(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3)
RCNN_ASSIGNER = MaxIoUAssigner(pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5)


@dataclass(frozen=True)
class SamplingResult:
    """mmdet's `SamplingResult`: which candidates a head trains on.

    `boxes (M, 4)`: the candidates (gt boxes first when they were added as proposals); `pos_indices (P,)` and
    `neg_indices (Q,)` int64 into them, increasing; `pos_boxes (P, 4)`, `neg_boxes (Q, 4)`; `pos_assigned_gt (P,)`
    the gt index (0-based) of each positive, `pos_gt_boxes (P, 4)` its box, `pos_gt_labels (P,)` its label (None when
    the assignment had no labels: the RPN); `pos_is_gt (P,)` bool, True for an added gt box."""

    boxes: torch.Tensor
    pos_indices: torch.Tensor
    neg_indices: torch.Tensor
    pos_assigned_gt: torch.Tensor
    pos_gt_boxes: torch.Tensor
    pos_gt_labels: torch.Tensor | None
    pos_is_gt: torch.Tensor

    @property
    def pos_boxes(self) -> torch.Tensor:
        return self.boxes[self.pos_indices]

    @property
    def neg_boxes(self) -> torch.Tensor:
        return self.boxes[self.neg_indices]

    @classmethod
    def from_indices(
        cls,
        assignment: AssignResult,
        boxes: torch.Tensor,
        gt_boxes: torch.Tensor,
        pos_indices: torch.Tensor,
        neg_indices: torch.Tensor,
        is_gt: torch.Tensor | None = None,
    ) -> "SamplingResult":
        """The result for chosen `pos_indices` / `neg_indices` (sorted and deduplicated here, as mmdet's `unique()`)
        of `boxes (M, 4)` assigned by `assignment`; `is_gt (M,)` marks added gt boxes (none when None)."""
        pos_indices, neg_indices = pos_indices.long().unique(), neg_indices.long().unique()
        pos_assigned_gt = assignment.gt_indices[pos_indices] - 1
        if bool((pos_assigned_gt < 0).any()) or bool((assignment.gt_indices[neg_indices] != 0).any()):
            raise ValueError("Sampled positives must be assigned to a gt box (index > 0) and negatives to none (0).")
        is_gt = torch.zeros(len(boxes), dtype=torch.bool, device=boxes.device) if is_gt is None else is_gt
        return cls(
            boxes=boxes,
            pos_indices=pos_indices,
            neg_indices=neg_indices,
            pos_assigned_gt=pos_assigned_gt,
            pos_gt_boxes=gt_boxes.reshape(-1, 4)[pos_assigned_gt],
            pos_gt_labels=None if assignment.labels is None else assignment.labels[pos_indices],
            pos_is_gt=is_gt[pos_indices],
        )


def pseudo_sample(assignment: AssignResult, boxes: torch.Tensor, gt_boxes: torch.Tensor) -> SamplingResult:
    """mmdet `PseudoSampler` (RetinaNet: no sampling): every assigned candidate is a positive, every negative one a
    negative, ignored ones neither."""
    return SamplingResult.from_indices(
        assignment,
        boxes[:, :4],
        gt_boxes,
        (assignment.gt_indices > 0).nonzero().view(-1),
        (assignment.gt_indices == 0).nonzero().view(-1),
    )


@dataclass(frozen=True)
class RandomSampler:
    """mmdet `RandomSampler(num, pos_fraction, neg_pos_ub, add_gt_as_proposals)`: at most `int(num * pos_fraction)`
    positives, drawn at random when there are more, then `num - #positives` negatives (at most `neg_pos_ub *
    max(#positives, 1)` when `neg_pos_ub >= 0`), drawn at random when there are more. With `add_gt_as_proposals` the
    gt boxes are prepended to the candidates as positives first (`AssignResult.add_gt`).

    The draw is mmdet's `torch.randperm(len(pool))[:count]` of the pool (candidates increasing), then sorted by
    `unique()`. It uses `generator` (a CPU generator; torch's global one when None, as mmdet), so with the same
    generator state and the same sequence of draws (per head, image by image; a pool no larger than its quota draws
    nothing) it takes the same candidates as mmdet on the same torch build (checked against the authors' training
    step); torch does not promise `randperm`'s stream across versions, so another build samples differently (equally
    valid, not the same). The authors' settings: `RPN_SAMPLER`, `RCNN_SAMPLER`."""

    num: int
    pos_fraction: float
    neg_pos_ub: int = -1
    add_gt_as_proposals: bool = False

    def sample(
        self,
        assignment: AssignResult,
        boxes: torch.Tensor,
        gt_boxes: torch.Tensor,
        gt_labels: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> SamplingResult:
        """`assignment` of the candidates `boxes (N, 4)` (a score column is dropped) to `gt_boxes (num_gts, 4)`
        -> `SamplingResult` (over `[gt_boxes; boxes]` with `add_gt_as_proposals` and at least one gt box, then
        `assignment` is extended by `add_gt(gt_labels)`, which needs `gt_labels`)."""
        boxes = boxes[:, :4]
        is_gt = torch.zeros(len(boxes), dtype=torch.bool, device=boxes.device)
        if self.add_gt_as_proposals and len(gt_boxes) > 0:
            if gt_labels is None:
                raise ValueError("`gt_labels` are needed to add the gt boxes as proposals (add_gt_as_proposals).")
            boxes = torch.cat([gt_boxes.to(boxes.dtype), boxes])
            assignment = assignment.add_gt(gt_labels)
            is_gt = torch.cat([torch.ones(len(gt_boxes), dtype=torch.bool, device=boxes.device), is_gt])
        pool = (assignment.gt_indices > 0).nonzero().view(-1)
        positives = self._choose(pool, int(self.num * self.pos_fraction), generator)
        num_negatives = self.num - len(positives)  # the pool has no duplicates: `unique()` keeps every draw
        if self.neg_pos_ub >= 0:
            num_negatives = min(num_negatives, int(self.neg_pos_ub * max(1, len(positives))))
        negatives = self._choose((assignment.gt_indices == 0).nonzero().view(-1), num_negatives, generator)
        return SamplingResult.from_indices(assignment, boxes, gt_boxes, positives, negatives, is_gt)

    @staticmethod
    def _choose(pool: torch.Tensor, count: int, generator: torch.Generator | None) -> torch.Tensor:
        """The whole `pool` when it has at most `count` entries, else `count` of them at random (mmdet's draw)."""
        if len(pool) <= count:
            return pool
        permutation = torch.randperm(len(pool), generator=generator)[:count].to(pool.device)
        return pool[permutation]


RPN_SAMPLER = RandomSampler(num=256, pos_fraction=0.5, neg_pos_ub=-1, add_gt_as_proposals=False)
RCNN_SAMPLER = RandomSampler(num=512, pos_fraction=0.25, neg_pos_ub=-1, add_gt_as_proposals=True)


def sampled_rois(samples: Sequence[SamplingResult], positives_only: bool = False) -> torch.Tensor:
    """mmdet `bbox2roi` of the sampled boxes of a batch: `(N, 5)` rows `(image_index, x1, y1, x2, y2)`, per image its
    positives then its negatives (`positives_only`: the positives, the mask head's RoIs); the row order of
    `rcnn_targets` and `mask_targets`."""
    return boxes_to_rois(
        [sample.pos_boxes if positives_only else torch.cat([sample.pos_boxes, sample.neg_boxes]) for sample in samples]
    )
