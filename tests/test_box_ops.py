"""`denseclip_hf.box_ops` against mmcv-full 1.7.2 / mmdet 2.28.2: their CPU ops' outputs stored in
`fixtures/official_mmcv_ops.*` and the authors' detectors' intermediate tensors (`fixtures/official_denseclip_det_*`;
the detectors' post-processing, `modeling_denseclip_detection`'s functions, from their stored head outputs), and NumPy
brute forces written from the formulas (plain loops, in this file)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import FIXTURES
from safetensors.torch import load_file

from denseclip_hf.box_ops import (
    MAX_LOG_RATIO,
    NMS_BLOCK,
    AnchorGenerator,
    batched_nms,
    box_iou,
    decode_deltas,
    encode_deltas,
    map_roi_levels,
    multi_level_roi_align,
    nms,
    paste_masks,
    roi_align,
)
from denseclip_hf.modeling_denseclip_detection import ImageFrame, dense_detections, rcnn_detections, rpn_proposals

RPN_ANCHORS = dict(strides=[4, 8, 16, 32, 64], ratios=[0.5, 1.0, 2.0], scales=[8])
RETINA_ANCHORS = dict(strides=[8, 16, 32, 64, 128], ratios=[0.5, 1.0, 2.0], octave_base_scale=4, scales_per_octave=3)
RCNN_STDS = (0.1, 0.1, 0.2, 0.2)


@pytest.fixture(scope="module")
def mmcv_ops() -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / "official_mmcv_ops.safetensors")


_DETECTORS: dict[str, dict[str, torch.Tensor]] = {}


def detector(name: str) -> dict[str, torch.Tensor]:
    """The tensors of `fixtures/official_denseclip_det_{name}.safetensors` (loaded once)."""
    if name not in _DETECTORS:
        _DETECTORS[name] = load_file(FIXTURES / f"official_denseclip_det_{name}.safetensors")
    return _DETECTORS[name]


def random_boxes(rng: np.random.Generator, count: int, extent: float = 100.0, size: float = 30.0) -> np.ndarray:
    """(count, 4) float32 boxes inside about `[0, extent]^2` with sides up to `size`."""
    xy = rng.uniform(0, extent, (count, 2))
    wh = rng.uniform(0, size, (count, 2))
    return np.concatenate([xy, xy + wh], 1).astype(np.float32)


# ------------------------------------------------------------------------------------------- mmcv's ops, stored


@pytest.mark.parametrize("output_size", [7, 14])
@pytest.mark.parametrize("stride", [4, 8])
def test_roi_align_matches_mmcv(mmcv_ops, output_size, stride):
    # 47 RoIs: regular, sub-pixel, zero-size, partly / fully outside, whole image, exact cell boundaries, large.
    features = mmcv_ops[f"inputs.roi_align.feat_stride{stride}"]
    output = roi_align(features, mmcv_ops["inputs.roi_align.rois"], output_size, 1 / stride)
    expected = mmcv_ops[f"expected.roi_align.out{output_size}_stride{stride}"]
    torch.testing.assert_close(output, expected, rtol=0, atol=1e-6)  # reached: 4.8e-7 (float rounding)
    assert output[28:32].abs().max() == 0 and expected[28:32].abs().max() == 0  # zero-size RoIs


@pytest.mark.parametrize("threshold", ["0.5", "0.7"])
def test_nms_matches_mmcv(mmcv_ops, threshold):
    boxes, scores = mmcv_ops["inputs.nms.boxes"], mmcv_ops["inputs.nms.scores"]
    keep = nms(boxes, scores, float(threshold))
    assert torch.equal(keep, mmcv_ops[f"expected.nms.iou{threshold}.keep"])
    assert torch.equal(torch.cat([boxes[keep], scores[keep, None]], 1), mmcv_ops[f"expected.nms.iou{threshold}.dets"])


@pytest.mark.parametrize(("path", "split_threshold"), [("batched_nms", 10000), ("batched_nms_split", 1000)])
def test_batched_nms_matches_mmcv(mmcv_ops, path, split_threshold):
    # 1500 boxes: one NMS on class-offset boxes below the split threshold, a per-class loop above it.
    boxes, scores, labels = (mmcv_ops[f"inputs.nms.{key}"] for key in ("boxes", "scores", "labels"))
    dets, keep = batched_nms(boxes, scores, labels, 0.5, split_threshold=split_threshold)
    assert torch.equal(keep, mmcv_ops[f"expected.{path}.iou0.5.keep"])
    assert torch.equal(dets, mmcv_ops[f"expected.{path}.iou0.5.dets"])


# ------------------------------------------------------------------------------------------------------- anchors


def brute_force_base_anchors(stride: int, ratios: list[float], scales: list[float]) -> np.ndarray:
    """mmdet's formulas in NumPy float32, ratio outer, scale inner."""
    rows = []
    for ratio in ratios:
        h_ratio = np.sqrt(np.float32(ratio))
        w_ratio = np.float32(1) / h_ratio
        for scale in scales:
            width = np.float32(stride) * w_ratio * np.float32(scale)
            height = np.float32(stride) * h_ratio * np.float32(scale)
            half = np.float32(0.5)
            rows.append([-half * width, -half * height, half * width, half * height])
    return np.array(rows, dtype=np.float32)


def test_retinanet_base_anchors():
    generator = AnchorGenerator(**RETINA_ANCHORS)
    scales = [4 * 2 ** (i / 3) for i in range(3)]  # float64, then float32
    assert generator.num_base_anchors == 9
    for stride, base in zip(RETINA_ANCHORS["strides"], generator.base_anchors, strict=True):
        np.testing.assert_array_equal(base.numpy(), brute_force_base_anchors(stride, [0.5, 1.0, 2.0], scales))
    # The stride-8 rows listed in the detection notes (section 2.3), 4 decimals.
    listed = [22.6274, 11.3137, 28.5088, 14.2544, 35.9188, 17.9594, 16, 16, 20.1587, 20.1587, 25.3984, 25.3984]
    listed += [11.3137, 22.6274, 14.2544, 28.5088, 17.9594, 35.9188]
    half_sizes = torch.tensor(listed).view(9, 2)
    torch.testing.assert_close(generator.base_anchors[0], torch.cat([-half_sizes, half_sizes], 1), rtol=0, atol=1e-4)


def test_rpn_base_anchors():
    generator = AnchorGenerator(**RPN_ANCHORS)
    assert generator.num_base_anchors == 3
    for stride, base in zip(RPN_ANCHORS["strides"], generator.base_anchors, strict=True):
        np.testing.assert_array_equal(base.numpy(), brute_force_base_anchors(stride, [0.5, 1.0, 2.0], [8]))
    listed = torch.tensor(
        [[-22.6274, -11.3137, 22.6274, 11.3137], [-16, -16, 16, 16], [-11.3137, -22.6274, 11.3137, 22.6274]]
    )
    torch.testing.assert_close(generator.base_anchors[0], listed, rtol=0, atol=1e-4)


def test_grid_anchors_match_brute_force():
    generator = AnchorGenerator(**RETINA_ANCHORS)
    sizes = [(4, 5), (2, 3), (1, 2), (1, 1), (1, 1)]
    for (height, width), stride, base, grid in zip(
        sizes, RETINA_ANCHORS["strides"], generator.base_anchors, generator.grid_anchors(sizes), strict=True
    ):
        expected = [
            [base[a, k].item() + (x if k % 2 == 0 else y) * stride for k in range(4)]
            for y in range(height)
            for x in range(width)
            for a in range(9)
        ]
        assert grid.dtype == torch.float32
        np.testing.assert_array_equal(grid.numpy(), np.array(expected, dtype=np.float32))


def test_valid_flags_match_brute_force():
    generator = AnchorGenerator(**RPN_ANCHORS)
    sizes = [(12, 10), (6, 5), (3, 3), (2, 2), (1, 1)]  # a 48 x 40 batch grid
    for pad_shape in [(48, 40), (33, 17), (20, 40, 3)]:
        for (height, width), stride, flags in zip(
            sizes, RPN_ANCHORS["strides"], generator.valid_flags(sizes, pad_shape), strict=True
        ):
            valid_h, valid_w = min(-(-pad_shape[0] // stride), height), min(-(-pad_shape[1] // stride), width)
            expected = [y < valid_h and x < valid_w for y in range(height) for x in range(width) for _ in range(3)]
            assert flags.tolist() == expected


@pytest.mark.parametrize(
    ("name", "anchors", "first_stride"), [("maskrcnn", RPN_ANCHORS, 4), ("retinanet", RETINA_ANCHORS, 8)]
)
def test_valid_flags_match_the_authors_training(name, anchors, first_stride):
    tensors = detector(name)
    batch_h, batch_w = tensors["meta.train.batch_input_shape"].tolist()
    sizes = [(batch_h // first_stride, batch_w // first_stride)]
    while len(sizes) < 5:  # FPN levels: strided convolutions / pooling round up
        sizes.append(((sizes[-1][0] + 1) // 2, (sizes[-1][1] + 1) // 2))
    generator = AnchorGenerator(**anchors)
    for image in range(2):
        pad_shape = tensors[f"meta.train.img{image}.pad_shape"].tolist()
        flags = torch.cat(generator.valid_flags(sizes, pad_shape))
        assert torch.equal(flags, tensors[f"expected_train.img{image}.valid_flags"].bool())
        assert not flags.all()  # the batch grid is larger than each image


# ----------------------------------------------------------------------------------------------------- box coding


def brute_force_decode(rois: np.ndarray, deltas: np.ndarray, stds, max_shape) -> np.ndarray:
    """delta2bbox per box and class in float64."""
    out = np.zeros_like(deltas, dtype=np.float64)
    for n in range(len(rois)):
        x1, y1, x2, y2 = (float(v) for v in rois[n])
        for k in range(deltas.shape[1] // 4):
            dx, dy, dw, dh = (float(deltas[n, 4 * k + i]) * stds[i] for i in range(4))
            dw, dh = (min(max(d, -MAX_LOG_RATIO), MAX_LOG_RATIO) for d in (dw, dh))
            cx, cy = (x1 + x2) / 2 + (x2 - x1) * dx, (y1 + y2) / 2 + (y2 - y1) * dy
            w, h = (x2 - x1) * math.exp(dw), (y2 - y1) * math.exp(dh)
            box = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
            if max_shape is not None:
                box = [min(max(v, 0), max_shape[1 - i % 2]) for i, v in enumerate(box)]
            out[n, 4 * k : 4 * k + 4] = box
    return out


@pytest.mark.parametrize("num_classes", [1, 3])
@pytest.mark.parametrize("max_shape", [None, (60, 80)])
@pytest.mark.parametrize("stds", [(1.0, 1.0, 1.0, 1.0), RCNN_STDS])
def test_decode_matches_brute_force(num_classes, max_shape, stds):
    rng = np.random.default_rng(num_classes)
    rois = random_boxes(rng, 40, extent=80, size=40) + np.float32(1)
    deltas = rng.normal(0, 2, (40, 4 * num_classes)).astype(np.float32)
    deltas[:5, 2::4] = 30  # far beyond the clamp in both directions
    deltas[5:10, 3::4] = -30
    decoded = decode_deltas(torch.from_numpy(rois), torch.from_numpy(deltas), stds=stds, max_shape=max_shape)
    expected = brute_force_decode(rois, deltas, stds, max_shape)
    np.testing.assert_allclose(decoded.numpy(), expected, rtol=1e-5, atol=1e-3)


def test_decode_clamps_the_size_ratio_both_ways():
    rois = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    decoded = decode_deltas(rois, torch.tensor([[0.0, 0.0, 100.0, -100.0]]))
    # |log(16 / 1000)|: widths grow at most 62.5 times and shrink at most 62.5 times.
    width, height = (decoded[0, 2] - decoded[0, 0]).item(), (decoded[0, 3] - decoded[0, 1]).item()
    assert width == pytest.approx(625.0, rel=1e-6) and height == pytest.approx(0.32, rel=1e-6)
    clipped = decode_deltas(rois, torch.tensor([[0.0, 0.0, 100.0, -100.0]]), max_shape=(15, 30, 3))
    assert clipped[0].tolist() == pytest.approx([0.0, 9.84, 30.0, 10.16], rel=1e-6)


def test_encode_decode_round_trip():
    rng = np.random.default_rng(0)
    proposals, targets = (torch.from_numpy(random_boxes(rng, 50)) for _ in range(2))
    proposals[:, 2:] += 5  # sizes 5-35: width and height ratios within the decode clamp (62.5)
    targets[:, 2:] += 5
    for stds in [(1.0, 1.0, 1.0, 1.0), RCNN_STDS]:
        deltas = encode_deltas(proposals, targets, stds=stds)
        torch.testing.assert_close(decode_deltas(proposals, deltas, stds=stds), targets, rtol=1e-5, atol=1e-4)
        width_ratio = (targets[:, 2] - targets[:, 0]) / (proposals[:, 2] - proposals[:, 0])
        torch.testing.assert_close(deltas[:, 2] * stds[2], torch.log(width_ratio), rtol=1e-5, atol=1e-6)
    assert decode_deltas(proposals[:0], torch.zeros(0, 8)).shape == (0, 8)


# ----------------------------------------------------------------------------------------------------- overlaps


@pytest.mark.parametrize("mode", ["iou", "iof"])
def test_box_iou_matches_brute_force(mode):
    rng = np.random.default_rng(1)
    boxes1, boxes2 = random_boxes(rng, 30, 50, 25), random_boxes(rng, 20, 50, 25)
    boxes1[:3, 2:] = boxes1[:3, :2]  # zero-size boxes: overlap 0 / eps
    boxes2[0] = boxes1[5]  # identical boxes
    expected = np.zeros((30, 20))
    for i, (x1, y1, x2, y2) in enumerate(boxes1.astype(np.float64)):
        for j, (u1, v1, u2, v2) in enumerate(boxes2.astype(np.float64)):
            inter = max(0.0, min(x2, u2) - max(x1, u1)) * max(0.0, min(y2, v2) - max(y1, v1))
            area1, area2 = (x2 - x1) * (y2 - y1), (u2 - u1) * (v2 - v1)
            expected[i, j] = inter / max(area1 + area2 - inter if mode == "iou" else area1, 1e-6)
    overlaps = box_iou(torch.from_numpy(boxes1), torch.from_numpy(boxes2), mode)
    np.testing.assert_allclose(overlaps.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert overlaps[5, 0] == 1 and box_iou(torch.zeros(0, 4), torch.from_numpy(boxes2)).shape == (0, 20)


# ---------------------------------------------------------------------------------------------------------- NMS


def brute_force_nms(boxes: np.ndarray, scores: torch.Tensor, threshold: float) -> list[int]:
    """mmcv's CPU kernel written out in NumPy float32: rank by `scores.sort(descending=True)` (the kernel's call),
    then for each kept box, in rank order, drop later boxes with `inter / (area_i + area_j - inter) > threshold`."""
    order = scores.sort(descending=True)[1].numpy()
    x1, y1, x2, y2 = (boxes[:, k] for k in range(4))
    areas = (x2 - x1) * (y2 - y1)
    selected = np.ones(len(boxes), dtype=bool)
    with np.errstate(invalid="ignore", divide="ignore"):
        for rank, i in enumerate(order):
            if not selected[rank]:
                continue
            for later in range(rank + 1, len(order)):
                j = order[later]
                width = max(np.float32(0), min(x2[i], x2[j]) - max(x1[i], x1[j]))
                height = max(np.float32(0), min(y2[i], y2[j]) - max(y1[i], y1[j]))
                inter = width * height
                if inter / (areas[i] + areas[j] - inter) > np.float32(threshold):
                    selected[later] = False
    return order[selected].tolist()


def nms_case(kind: str) -> tuple[np.ndarray, torch.Tensor]:
    rng = np.random.default_rng(len(kind))
    if kind == "clustered":  # more boxes than one block, overlapping chains
        boxes = random_boxes(rng, NMS_BLOCK + 90, extent=60, size=40)
    elif kind == "separated":  # groups far apart along x (as class-offset boxes): the per-run column ranges
        boxes = random_boxes(rng, NMS_BLOCK + 90, extent=20, size=15)
        boxes[:, 0::2] += np.float32(100) * rng.integers(0, 6, (len(boxes), 1)).astype(np.float32)
    else:  # duplicates, zero-size boxes (0 / 0 overlaps never suppress) and nested boxes
        boxes = np.repeat(random_boxes(rng, 12), 3, axis=0)
        boxes[:6, 2:] = boxes[:6, :2]
        boxes[-4:] = [[0, 0, 10, 10], [0, 0, 10, 7.5], [0, 0, 10, 5], [2, 2, 3, 3]]
    scores = torch.from_numpy(rng.integers(0, 8, len(boxes)).astype(np.float32) / 8)  # many ties
    return boxes, scores


@pytest.mark.parametrize("kind", ["clustered", "separated", "degenerate"])
@pytest.mark.parametrize("threshold", [0.3, 0.5])
def test_nms_matches_brute_force(kind, threshold):
    boxes, scores = nms_case(kind)
    keep = nms(torch.from_numpy(boxes), scores, threshold)
    assert keep.tolist() == brute_force_nms(boxes, scores, threshold)


def test_nms_suppresses_only_above_the_threshold():
    # IoU of these two boxes is exactly 0.5 in float32: kept at threshold 0.5 (strict >), dropped below it.
    boxes = torch.tensor([[0.0, 0.0, 2.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    scores = torch.tensor([0.9, 0.8])
    assert nms(boxes, scores, 0.5).tolist() == [0, 1]
    assert nms(boxes, scores, 0.4999).tolist() == [0]
    assert nms(boxes[:0], scores[:0], 0.5).tolist() == []


@pytest.mark.parametrize("split_threshold", [10000, 100])
def test_batched_nms_matches_brute_force(split_threshold):
    boxes, scores = nms_case("clustered")
    labels = torch.from_numpy(np.random.default_rng(3).integers(0, 4, len(boxes)))
    dets, keep = batched_nms(torch.from_numpy(boxes), scores, labels, 0.5, split_threshold=split_threshold)
    offsets = labels.numpy().astype(np.float32) * (boxes.max() + np.float32(1))
    shifted = boxes + offsets[:, None]
    if len(boxes) < split_threshold:  # one NMS over all classes, on the offset boxes
        expected = brute_force_nms(shifted, scores, 0.5)
    else:  # per class, then the kept rows re-sorted by score with torch's sort
        kept = sorted(
            int(rows[i])
            for label in np.unique(labels.numpy())
            for rows in [np.flatnonzero(labels.numpy() == label)]
            for i in brute_force_nms(shifted[rows], scores[rows], 0.5)
        )
        expected = [kept[i] for i in scores[kept].sort(descending=True)[1].tolist()]
    assert keep.tolist() == expected
    assert torch.equal(dets, torch.cat([torch.from_numpy(boxes)[keep], scores[keep, None]], 1))
    empty = batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5)
    assert empty[0].shape == (0, 5) and empty[1].shape == (0,)


# ------------------------------------------------------------------------------------------------------ RoIAlign


def brute_force_roi_align(features, rois, output_size, scale, sampling_ratio=0, aligned=True) -> np.ndarray:
    """mmcv's CPU RoIAlign (avg) in float64 loops: per RoI, channel, bin and sample."""
    _, channels, height, width = features.shape
    out = np.zeros((len(rois), channels, output_size, output_size))

    def bilinear(plane, y, x):
        if y < -1 or y > height or x < -1 or x > width:
            return 0.0
        y, x = max(y, 0.0), max(x, 0.0)
        y_low, x_low = int(y), int(x)
        if y_low >= height - 1:
            y_low = y_high = height - 1
            y = float(y_low)
        else:
            y_high = y_low + 1
        if x_low >= width - 1:
            x_low = x_high = width - 1
            x = float(x_low)
        else:
            x_high = x_low + 1
        ly, lx = y - y_low, x - x_low
        hy, hx = 1 - ly, 1 - lx
        return (
            hy * hx * plane[y_low, x_low]
            + hy * lx * plane[y_low, x_high]
            + ly * hx * plane[y_high, x_low]
            + ly * lx * plane[y_high, x_high]
        )

    offset = 0.5 if aligned else 0.0
    for n, (b, rx1, ry1, rx2, ry2) in enumerate(rois.tolist()):
        sx, sy = rx1 * scale - offset, ry1 * scale - offset
        rw, rh = rx2 * scale - offset - sx, ry2 * scale - offset - sy
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        bw, bh = rw / output_size, rh / output_size
        gh = sampling_ratio or math.ceil(rh / output_size)
        gw = sampling_ratio or math.ceil(rw / output_size)
        for c in range(channels):
            plane = features[int(b), c]
            for ph in range(output_size):
                for pw in range(output_size):
                    total = 0.0
                    for iy in range(gh):
                        y = sy + ph * bh + (iy + 0.5) * bh / gh
                        for ix in range(gw):
                            total += bilinear(plane, y, sx + pw * bw + (ix + 0.5) * bw / gw)
                    out[n, c, ph, pw] = total / max(gh * gw, 1)
    return out


def random_rois(rng: np.random.Generator, count: int, batch: int, height: int, width: int) -> np.ndarray:
    """RoIs in image pixels (stride 4 map of `height x width`): regular, sub-pixel, zero-size, partly and fully
    outside, and the whole map."""
    xy = rng.uniform(-8, 4 * width, (count, 2))
    wh = rng.exponential(12, (count, 2))
    wh[: count // 6] *= 0.05  # sub-pixel
    wh[count // 6 : count // 6 + 2] = 0  # zero size
    boxes = np.concatenate([xy, xy + wh], 1)
    boxes[-2] = [-30, -30, -10, -10]  # fully outside
    boxes[-1] = [0, 0, 4 * width, 4 * height]
    return np.concatenate([rng.integers(0, batch, (count, 1)), boxes], 1)


@pytest.mark.parametrize(
    ("output_size", "sampling_ratio", "aligned"), [(3, 0, True), (4, 0, True), (3, 2, True), (3, 0, False)]
)
def test_roi_align_matches_brute_force(output_size, sampling_ratio, aligned):
    rng = np.random.default_rng(output_size + 10 * sampling_ratio + aligned)
    features = rng.normal(size=(2, 2, 9, 13))
    rois = random_rois(rng, 24, 2, 9, 13)
    output = roi_align(torch.from_numpy(features), torch.from_numpy(rois), output_size, 0.25, sampling_ratio, aligned)
    expected = brute_force_roi_align(features, rois, output_size, 0.25, sampling_ratio, aligned)
    assert output.dtype == torch.float64
    np.testing.assert_allclose(output.numpy(), expected, rtol=1e-12, atol=1e-12)


def test_roi_align_gradient():
    rng = np.random.default_rng(5)
    features = torch.from_numpy(rng.normal(size=(2, 2, 6, 7))).requires_grad_()
    rois = torch.from_numpy(random_rois(rng, 8, 2, 6, 7))
    assert torch.autograd.gradcheck(lambda x: roi_align(x, rois, 2, 0.25), (features,))
    # rois get no gradient, as in mmcv
    rois.requires_grad_()
    assert not roi_align(features.detach(), rois, 2, 0.25).requires_grad


def test_roi_align_groups_and_chunks_like_one_pass(monkeypatch):
    # Bands of very different sizes and a budget of a few RoIs per run: the same numbers as one run.
    rng = np.random.default_rng(6)
    features = torch.from_numpy(rng.normal(size=(1, 3, 40, 50)).astype(np.float32))
    rois = torch.from_numpy(random_rois(rng, 30, 1, 40, 50).astype(np.float32))
    rois[:5, 3:] = rois[:5, 1:3] + 150
    whole = roi_align(features, rois, 7, 0.25)
    monkeypatch.setattr("denseclip_hf.box_ops.ROI_ALIGN_TERMS", 3000)
    torch.testing.assert_close(roi_align(features, rois, 7, 0.25), whole, rtol=0, atol=1e-6)
    channels_last = features.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(roi_align(channels_last, rois, 7, 0.25), whole, rtol=0, atol=1e-6)
    assert roi_align(features, rois[:0], 7, 0.25).shape == (0, 3, 7, 7)


@pytest.mark.parametrize(
    ("side", "level"), [(0.0, 0), (111.9, 0), (112.0, 1), (223.9, 1), (224.0, 2), (447.0, 2), (448.0, 3), (2000.0, 3)]
)
def test_map_roi_levels(side, level):
    # floor(log2(sqrt(w h) / 56 + 1e-6)), clamped to the 4 levels.
    rois = torch.tensor([[0.0, 10.0, 20.0, 10.0 + side, 20.0 + side], [0.0, 0.0, 0.0, side * 2, side / 2]])
    assert map_roi_levels(rois, 4).tolist() == [level, level]


def test_multi_level_roi_align_pools_each_roi_from_its_level():
    rng = np.random.default_rng(7)
    features = [torch.from_numpy(rng.normal(size=(2, 3, 64 // 2**i, 48 // 2**i)).astype(np.float32)) for i in range(4)]
    xy = rng.uniform(0, 150, (40, 2))
    sides = np.exp(rng.uniform(np.log(20), np.log(600), (40, 1)))
    rois = torch.from_numpy(np.concatenate([rng.integers(0, 2, (40, 1)), xy, xy + sides], 1).astype(np.float32))
    output = multi_level_roi_align(features, rois, 7, [4, 8, 16, 32])
    levels = map_roi_levels(rois, 4)
    assert len(levels.unique()) == 4
    for level in range(4):
        expected = roi_align(features[level], rois[levels == level], 7, 1 / 2 ** (level + 2))
        torch.testing.assert_close(output[levels == level], expected, rtol=0, atol=0)
    torch.testing.assert_close(
        multi_level_roi_align(features[:1], rois, 7, [4]), roi_align(features[0], rois, 7, 0.25)
    )


def test_a_nan_roi_pools_zeros():
    # mmdet's extractor leaves its row at zero (no level matches a NaN); here it goes to level 0 and pools zeros.
    features = [torch.randn(1, 2, 16, 16), torch.randn(1, 2, 8, 8)]
    rois = torch.tensor([[0.0, math.nan, 1, 5, 5], [0, 1, 1, 30, 30]])
    assert map_roi_levels(rois, 2).tolist() == [0, 0]
    output = multi_level_roi_align(features, rois, 2, [4, 8])
    assert output[0].abs().max() == 0 and output[1].abs().max() > 0
    assert roi_align(features[0], rois[:1], 2, 0.25).abs().max() == 0


# ------------------------------------------------------------------------------------------------------ mask paste


def brute_force_paste(masks: np.ndarray, boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """Every pixel of the image: its centre in the box's normalised frame (float32, as mmdet), then
    `grid_sample(bilinear, zeros, align_corners=False)` written out in float64, `>= 0.5`."""
    size = masks.shape[-1]
    out = np.zeros((len(masks), height, width), dtype=bool)
    for n, (x1, y1, x2, y2) in enumerate(boxes):
        gx = (np.arange(width, dtype=np.float32) + np.float32(0.5) - x1) / (x2 - x1) * np.float32(2) - np.float32(1)
        gy = (np.arange(height, dtype=np.float32) + np.float32(0.5) - y1) / (y2 - y1) * np.float32(2) - np.float32(1)
        for i in range(height):
            for j in range(width):
                ix, iy = ((float(gx[j]) + 1) * size - 1) / 2, ((float(gy[i]) + 1) * size - 1) / 2
                x0, y0 = math.floor(ix), math.floor(iy)
                value = 0.0
                for yy, wy in ((y0, y0 + 1 - iy), (y0 + 1, iy - y0)):
                    for xx, wx in ((x0, x0 + 1 - ix), (x0 + 1, ix - x0)):
                        if 0 <= yy < size and 0 <= xx < size:
                            value += wy * wx * masks[n, yy, xx]
                out[n, i, j] = value >= 0.5
    return out


def test_paste_masks_matches_brute_force():
    rng = np.random.default_rng(8)
    masks = rng.uniform(0, 1, (6, 5, 5)).astype(np.float32)
    boxes = np.array(
        [
            [3.2, 4.7, 20.5, 15.1],
            [0, 0, 30, 24],
            [-5, 10, 8.3, 30],
            [25.5, 2, 40, 9.9],
            [10, 10, 11.5, 12],
            [1, 1, 2, 2],
        ],
        dtype=np.float32,
    )
    pasted = paste_masks(torch.from_numpy(masks)[:, None], torch.from_numpy(boxes), (24, 30))
    assert pasted.dtype == torch.bool and pasted.shape == (6, 24, 30)
    np.testing.assert_array_equal(pasted.numpy(), brute_force_paste(masks, boxes, 24, 30))
    assert torch.equal(paste_masks(torch.from_numpy(masks), torch.from_numpy(boxes), (24, 30)), pasted)


@pytest.mark.parametrize("image", [0, 1])
def test_paste_masks_matches_the_authors_mask_rcnn(image):
    tensors = detector("maskrcnn")
    raw, labels = tensors[f"expected.img{image}.det_bboxes_raw"], tensors[f"expected.img{image}.det_labels_raw"]
    scale_factor = tensors[f"meta.img{image}.scale_factor"]
    boxes = (raw[:, :4] * scale_factor) / scale_factor  # the model's float32 round trip through the input frame
    probabilities = tensors[f"expected.img{image}.mask_logits_label"].sigmoid()
    height, width = tensors[f"meta.img{image}.ori_shape"].tolist()[:2]
    pasted = paste_masks(probabilities, boxes, (height, width))
    class_major = [i for label in range(int(labels.max()) + 1) for i in range(len(labels)) if labels[i] == label]
    expected = tensors[f"expected.img{image}.det_masks"].bool()
    assert expected.any() and torch.equal(pasted[class_major], expected)


# ------------------------------------------------- the authors' detectors: their post-processing from stored outputs


def assert_detections_close(dets: torch.Tensor, expected: torch.Tensor) -> None:
    """Same rows in the same order with the same scores; coordinates to float32 rounding. (For 1-5% of the boxes the
    fixtures' coordinates differ from a decode of the stored head outputs in the last 1-4 bits, <= 1.5e-5: the
    fixtures' machine rounded `exp(dw)` / `exp(dh)` 1 ulp away from the correctly rounded float32 value that torch
    gives here, for every CPU capability; decoding with that exp off by one ulp reproduces their bits. Selections,
    order and scores are exact.)"""
    assert dets.shape == expected.shape
    assert torch.equal(dets[:, 4], expected[:, 4])
    torch.testing.assert_close(dets[:, :4], expected[:, :4], rtol=0, atol=2e-5)


def frame(tensors: dict[str, torch.Tensor], image: int) -> ImageFrame:
    """The fixture image's geometry (boxes go back to the original image)."""
    size = tuple(tensors[f"meta.img{image}.img_shape"][:2].tolist())
    return ImageFrame(
        size, tensors[f"meta.img{image}.scale_factor"], tuple(tensors[f"meta.img{image}.ori_shape"][:2].tolist())
    )


@pytest.mark.parametrize("name", ["maskrcnn", "clip_maskrcnn"])
@pytest.mark.parametrize("image", [0, 1])
def test_rpn_proposals_of_the_authors_mask_rcnn(name, image):
    # RPNHead._get_bboxes_single: sigmoid, top 1000 per level by sort, decode clipped to the image, w > 0 and h > 0,
    # batched_nms with the level as class (iou 0.7), first 1000.
    tensors = detector(name)
    cls_scores = [tensors[f"expected.img{image}.rpn_cls_scores.{level}"][0] for level in range(5)]
    bbox_preds = [tensors[f"expected.img{image}.rpn_bbox_preds.{level}"][0] for level in range(5)]
    anchors = AnchorGenerator(**RPN_ANCHORS).grid_anchors([scores.shape[1:] for scores in cls_scores])
    proposals = rpn_proposals(
        cls_scores,
        bbox_preds,
        anchors,
        frame(tensors, image).image_size,
        nms_pre=1000,
        max_proposals=1000,
        iou_threshold=0.7,
        min_box_size=0,
    )
    assert_detections_close(proposals, tensors[f"expected.img{image}.rpn_proposals"])


@pytest.mark.parametrize("name", ["maskrcnn", "clip_maskrcnn"])
@pytest.mark.parametrize("image", [0, 1])
def test_rcnn_head_of_the_authors_mask_rcnn(name, image):
    tensors = detector(name)
    proposals = tensors[f"expected.img{image}.rpn_proposals"]
    cls_score, bbox_pred = tensors[f"expected.img{image}.roi_cls_score"], tensors[f"expected.img{image}.roi_bbox_pred"]
    # SingleRoIExtractor (P2-P5, 7x7) + the Shared2FC box head's weights reproduce the head's outputs.
    features = [tensors[f"expected.img{image}.neck_outputs.{level}"] for level in range(4)]
    rois = torch.cat([torch.zeros(len(proposals), 1), proposals[:, :4]], 1)
    x = multi_level_roi_align(features, rois, 7, [4, 8, 16, 32]).flatten(1)
    weights = {
        key[len("state_dict.roi_head.bbox_head.") :]: value for key, value in tensors.items() if "bbox_head" in key
    }
    for i in range(2):
        x = F.relu(F.linear(x, weights[f"shared_fcs.{i}.weight"], weights[f"shared_fcs.{i}.bias"]))
    torch.testing.assert_close(
        F.linear(x, weights["fc_cls.weight"], weights["fc_cls.bias"]), cls_score, rtol=1e-5, atol=1e-4
    )
    torch.testing.assert_close(
        F.linear(x, weights["fc_reg.weight"], weights["fc_reg.bias"]), bbox_pred, rtol=1e-5, atol=1e-5
    )
    # get_bboxes: softmax, class-specific decode clipped to the image, / scale_factor, multiclass_nms (> 0.05).
    boxes, scores, labels = rcnn_detections(
        proposals[:, :4],
        cls_score,
        bbox_pred,
        frame(tensors, image),
        box_coder_stds=RCNN_STDS,
        score_threshold=0.05,
        iou_threshold=0.5,
        max_detections=100,
    )
    assert_detections_close(torch.cat([boxes, scores[:, None]], 1), tensors[f"expected.img{image}.det_bboxes_raw"])
    assert torch.equal(labels, tensors[f"expected.img{image}.det_labels_raw"])


@pytest.mark.parametrize("name", ["retinanet", "clip_retinanet"])
@pytest.mark.parametrize("image", [0, 1])
@pytest.mark.parametrize(("score_threshold", "case"), [(0.05, ""), (0.01, "dense.")])
def test_detections_of_the_authors_retinanet(name, image, score_threshold, case):
    # mmdet 2.28: sigmoid, (anchor, class) pairs above the threshold, top 1000 per level by sort, decode clipped to
    # the image, / scale_factor, batched_nms (iou 0.5), first 100.
    tensors = detector(name)
    cls_scores = [tensors[f"expected.img{image}.cls_scores.{level}"][0] for level in range(5)]
    bbox_preds = [tensors[f"expected.img{image}.bbox_preds.{level}"][0] for level in range(5)]
    anchors = AnchorGenerator(**RETINA_ANCHORS).grid_anchors([scores.shape[1:] for scores in cls_scores])
    boxes, scores, labels = dense_detections(
        cls_scores,
        bbox_preds,
        anchors,
        frame(tensors, image),
        score_threshold=score_threshold,
        nms_pre=1000,
        iou_threshold=0.5,
        max_detections=100,
    )
    assert_detections_close(
        torch.cat([boxes, scores[:, None]], 1), tensors[f"expected.img{image}.{case}det_bboxes_raw"]
    )
    assert torch.equal(labels, tensors[f"expected.img{image}.{case}det_labels_raw"])


# ------------------------------------------------------------------------------------------------------ bad input

BOXES = torch.zeros(3, 4)
SCORES = torch.zeros(3)
FEATURES = torch.zeros(1, 2, 4, 4)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: nms(torch.zeros(3, 5), SCORES, 0.5), r"`boxes` must have shape \(N, 4\)"),
        (lambda: nms(BOXES, torch.zeros(2), 0.5), "one entry per row of `boxes`"),
        (lambda: nms(BOXES.long(), SCORES, 0.5), "floating-point"),
        (lambda: nms(BOXES.double(), SCORES, 0.5), "float32"),
        (lambda: nms(BOXES, SCORES, 1.5), r"in \[0, 1\]"),
        (lambda: batched_nms(BOXES, SCORES, torch.zeros(3), 0.5), "integer tensor of class indices"),
        (lambda: batched_nms(BOXES, SCORES, torch.zeros(4, dtype=torch.long), 0.5), "`idxs`"),
        (lambda: box_iou(BOXES, torch.zeros(2, 3)), "`boxes2` must have shape"),
        (lambda: box_iou(BOXES, BOXES, mode="giou"), "'iou' or 'iof'"),
        (lambda: decode_deltas(BOXES, torch.zeros(3, 6)), r"\(N, 4 \* num_classes\)"),
        (lambda: decode_deltas(BOXES, torch.zeros(2, 4)), "differ in length"),
        (lambda: encode_deltas(BOXES, torch.zeros(2, 4)), "differ in length"),
        (lambda: roi_align(torch.zeros(2, 4, 4), torch.zeros(1, 5), 7, 0.25), r"\(B, C, H, W\)"),
        (lambda: roi_align(FEATURES, torch.zeros(1, 4), 7, 0.25), r"`rois` must have shape \(N, 5\)"),
        (lambda: roi_align(FEATURES, torch.tensor([[1.0, 0, 0, 1, 1]]), 7, 0.25), "batch indices"),
        (lambda: roi_align(FEATURES, torch.tensor([[0.0, 5, 0, 1, 1]]), 7, 0.25), "x2 >= x1"),
        (lambda: roi_align(FEATURES, torch.zeros(1, 5), 0, 0.25), "`output_size`"),
        (lambda: roi_align(FEATURES, torch.zeros(1, 5), 7, 0.25, sampling_ratio=-1), "`sampling_ratio`"),
        (lambda: multi_level_roi_align([FEATURES], torch.zeros(1, 5), 7, [4, 8]), "one stride per level"),
        (lambda: paste_masks(torch.zeros(2, 3, 5, 5), BOXES[:2], (8, 8)), "1 channel"),
        (lambda: paste_masks(torch.zeros(2, 5, 5), BOXES, (8, 8)), "differ in length"),
        (lambda: paste_masks(torch.zeros(3, 5, 5), BOXES, (8, 0)), "`image_size`"),
        (lambda: AnchorGenerator([8], [1.0]), "either `scales`"),
        (lambda: AnchorGenerator([8], [1.0], scales=[1]).grid_anchors([(2, 2), (1, 1)]), "feature-map sizes"),
    ],
)
def test_bad_input_raises_a_clear_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
