"""The detectors' training parts (assignment, sampling, targets, losses) against the authors' mmdet 2.28.2 training
step stored in `fixtures/official_denseclip_det_*` (`expected_train.*`, `expected_loss.*`), and against NumPy brute
forces written from mmdet's rules (plain loops, in this file).

The fixtures store the inputs of the R-CNN losses (box head and mask head outputs on the sampled RoIs) and of Eq. 8,
so those losses are compared with the authors' values here. They do not store the RPN / RetinaNet head outputs on the
training batch: `anchor_head_losses` is checked against a NumPy computation on random inputs here, and its targets
against the fixtures; comparing it with `expected_loss.loss_{rpn_,}{cls,bbox}.<level>` needs the detection models'
training forward (a test for the models' module, once they exist).
"""

import functools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import FIXTURES
from test_box_ops import RETINA_ANCHORS, RPN_ANCHORS, detector

from denseclip_hf.box_ops import (
    RCNN_ASSIGNER,
    RCNN_SAMPLER,
    RETINANET_ASSIGNER,
    RPN_ASSIGNER,
    RPN_SAMPLER,
    AnchorGenerator,
    AssignResult,
    MaxIoUAssigner,
    RandomSampler,
    SamplingResult,
    pseudo_sample,
    sampled_rois,
)
from denseclip_hf.loss_denseclip import detection_score_map_loss, detection_targets
from denseclip_hf.loss_denseclip_detection import (
    FLOAT32_EPS,
    RCNN_BOX_STDS,
    RCNNTargets,
    anchor_head_losses,
    anchor_targets,
    classification_accuracy,
    detection_loss_names,
    l1_loss,
    mask_loss,
    mask_targets,
    rcnn_losses,
    rcnn_targets,
    sigmoid_cross_entropy_loss,
    sigmoid_focal_loss,
    total_detection_loss,
)

NUM_CLASSES = 5  # the fixtures' tiny detectors
MASK_RCNNS = ["maskrcnn", "clip_maskrcnn"]
RETINANETS = ["retinanet", "clip_retinanet"]


def fixture_json(name: str) -> dict:
    return json.loads((FIXTURES / f"official_denseclip_det_{name}.json").read_text())


def batch_anchors(name: str) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """The anchors of the fixture's padded training batch per level, and each image's valid flags per level."""
    tensors = detector(name)
    settings, first_stride = (RPN_ANCHORS, 4) if "maskrcnn" in name else (RETINA_ANCHORS, 8)
    batch_h, batch_w = tensors["meta.train.batch_input_shape"].tolist()
    sizes = [(batch_h // first_stride, batch_w // first_stride)]
    while len(sizes) < 5:  # FPN levels: strided convolutions / pooling round up
        sizes.append(((sizes[-1][0] + 1) // 2, (sizes[-1][1] + 1) // 2))
    generator = AnchorGenerator(**settings)
    flags = [generator.valid_flags(sizes, tensors[f"meta.train.img{i}.pad_shape"].tolist()) for i in range(2)]
    return generator.grid_anchors(sizes), flags


def gts(name: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    tensors = detector(name)
    return [tensors[f"inputs.train.img{i}.gt_bboxes"] for i in range(2)], [
        tensors[f"inputs.train.img{i}.gt_labels"] for i in range(2)
    ]


@functools.cache
def authors_sampling(name: str):
    """The authors' Mask R-CNN training step replayed: RPN targets (assign, sample), then the R-CNN assignment and
    sampling over [gt; stored proposals], image by image, drawing from one generator seeded like their run
    (`torch.manual_seed(train_seed)` before the forward)."""
    tensors = detector(name)
    generator = torch.Generator().manual_seed(fixture_json(name)["train_seed"])
    anchors, flags = batch_anchors(name)
    boxes, labels = gts(name)
    rpn = anchor_targets(anchors, flags, boxes, None, 1, RPN_ASSIGNER, RPN_SAMPLER, generator=generator)
    rcnn = []
    for image in range(2):
        proposals = tensors[f"expected_train.img{image}.rpn_proposals"]
        assignment = RCNN_ASSIGNER.assign(proposals, boxes[image], labels[image])
        rcnn.append(RCNN_SAMPLER.sample(assignment, proposals, boxes[image], labels[image], generator))
    return rpn, rcnn


def stored_rcnn_samples(name: str) -> list[SamplingResult]:
    """The R-CNN samples from the fixture's stored indices (independent of the random draw)."""
    tensors = detector(name)
    boxes, labels = gts(name)
    samples = []
    for image in range(2):
        proposals = tensors[f"expected_train.img{image}.rpn_proposals"][:, :4]
        assignment = RCNN_ASSIGNER.assign(proposals, boxes[image], labels[image]).add_gt(labels[image])
        candidates = torch.cat([boxes[image], proposals])
        is_gt = torch.arange(len(candidates)) < len(boxes[image])
        positives, negatives = (tensors[f"expected_train.img{image}.rcnn_{kind}_inds"] for kind in ("pos", "neg"))
        samples.append(SamplingResult.from_indices(assignment, candidates, boxes[image], positives, negatives, is_gt))
    return samples


def encode_numpy(proposals: np.ndarray, targets: np.ndarray, stds=(1.0, 1.0, 1.0, 1.0)) -> np.ndarray:
    """mmdet's DeltaXYWH encoding in float64, box by box."""
    out = np.zeros((len(proposals), 4))
    for n, ((x1, y1, x2, y2), (u1, v1, u2, v2)) in enumerate(zip(proposals.tolist(), targets.tolist(), strict=True)):
        pw, ph, gw, gh = x2 - x1, y2 - y1, u2 - u1, v2 - v1
        deltas = [((u1 + u2) - (x1 + x2)) / 2 / pw, ((v1 + v2) - (y1 + y2)) / 2 / ph, np.log(gw / pw), np.log(gh / ph)]
        out[n] = np.array(deltas) / np.array(stds)
    return out


# ---------------------------------------------------------------------------------- the authors' training step


@pytest.mark.parametrize("name", RETINANETS)
def test_retinanet_targets_match_the_authors(name):
    tensors = detector(name)
    anchors, flags = batch_anchors(name)
    boxes, labels = gts(name)
    targets = anchor_targets(anchors, flags, boxes, labels, NUM_CLASSES, RETINANET_ASSIGNER)
    positives_per_image = []
    for image in range(2):
        expected = tensors[f"expected_train.img{image}.assigned_gt_inds"].long()  # over the valid anchors
        assignment, sample = targets.assignments[image], targets.samples[image]
        assert torch.equal(assignment.gt_indices, expected)
        # PseudoSampler: every positive and every negative, nothing else.
        assert torch.equal(sample.pos_indices, (expected > 0).nonzero().view(-1))
        assert torch.equal(sample.neg_indices, (expected == 0).nonzero().view(-1))
        valid = torch.cat(flags[image])
        image_labels = torch.cat([level[image] for level in targets.labels])
        image_weights = torch.cat([level[image] for level in targets.label_weights])
        expected_labels = torch.full((len(valid),), NUM_CLASSES)
        expected_labels[valid.nonzero().view(-1)[expected > 0]] = labels[image][expected[expected > 0] - 1]
        assert torch.equal(image_labels, expected_labels)
        assert torch.equal(
            image_weights, torch.zeros(len(valid)).index_fill_(0, valid.nonzero().view(-1)[expected >= 0], 1)
        )
        positives_per_image.append(int((expected > 0).sum()))
    assert targets.avg_factor == sum(max(count, 1) for count in positives_per_image)
    # The authors' per-level box losses are 0 exactly on the levels without a positive anchor.
    for level, level_labels in enumerate(targets.labels):
        has_positives = bool((level_labels < NUM_CLASSES).any())
        assert has_positives == (tensors[f"expected_loss.loss_bbox.{level}"].item() > 0)


@pytest.mark.parametrize("name", MASK_RCNNS)
def test_rpn_targets_match_the_authors(name):
    tensors = detector(name)
    rpn, _ = authors_sampling(name)
    anchors, flags = batch_anchors(name)
    boxes, _ = gts(name)
    counts = 0
    for image in range(2):
        expected = tensors[f"expected_train.img{image}.rpn_assigned_gt_inds"].long()
        assert torch.equal(rpn.assignments[image].gt_indices, expected)
        positives = tensors[f"expected_train.img{image}.rpn_pos_inds"]
        negatives = tensors[f"expected_train.img{image}.rpn_neg_inds"]
        # Targets over all anchors of the batch grid, from the stored samples: label 0 = foreground, 1 = background.
        valid_rows = torch.cat(flags[image]).nonzero().view(-1)
        image_labels = torch.cat([level[image] for level in rpn.labels])
        image_weights = torch.cat([level[image] for level in rpn.label_weights])
        image_deltas = torch.cat([level[image] for level in rpn.bbox_targets])
        image_box_weights = torch.cat([level[image] for level in rpn.bbox_weights])
        assert torch.equal((image_labels == 0).nonzero().view(-1), valid_rows[positives])
        assert torch.equal(image_weights.nonzero().view(-1), valid_rows[torch.cat([positives, negatives]).sort()[0]])
        assert torch.equal(image_box_weights.nonzero()[:, 0].unique(), valid_rows[positives])
        matched = boxes[image][tensors[f"expected_train.img{image}.rpn_pos_assigned_gt_inds"]]
        expected_deltas = encode_numpy(torch.cat(anchors)[valid_rows[positives]].numpy(), matched.numpy())
        np.testing.assert_allclose(image_deltas[valid_rows[positives]].numpy(), expected_deltas, rtol=1e-5, atol=1e-6)
        assert image_deltas.index_fill(0, valid_rows[positives], 0).abs().max() == 0  # zero off the positives
        counts += max(len(positives), 1) + max(len(negatives), 1)
    assert rpn.avg_factor == counts == 512  # sampling: positives + negatives, 256 per image
    # The authors' per-level RPN box losses are 0 exactly on the levels without a positive anchor.
    for level, level_labels in enumerate(rpn.labels):
        assert bool((level_labels == 0).any()) == (tensors[f"expected_loss.loss_rpn_bbox.{level}"].item() > 0)


@pytest.mark.parametrize("name", MASK_RCNNS)
@pytest.mark.parametrize("image", [0, 1])
def test_rcnn_assignment_matches_the_authors(name, image):
    tensors = detector(name)
    boxes, labels = gts(name)
    proposals = tensors[f"expected_train.img{image}.rpn_proposals"]  # (n, 5): the score column is dropped
    assignment = RCNN_ASSIGNER.assign(proposals, boxes[image], labels[image]).add_gt(labels[image])
    prefix = f"expected_train.img{image}.rcnn_"
    assert torch.equal(assignment.gt_indices, tensors[prefix + "assigned_gt_inds"])
    assert torch.equal(assignment.max_overlaps, tensors[prefix + "max_overlaps"])  # bit for bit
    assert torch.equal(assignment.labels, tensors[prefix + "assigned_labels"])


@pytest.mark.parametrize("name", MASK_RCNNS)
def test_samplers_draw_what_the_authors_drew(name):
    # Same torch build (the fixture's torch 2.13 CPU), same seed, same sequence of draws (RPN image 0, 1, then R-CNN
    # image 0, 1; only the negative pools exceed their quotas): the same candidates, bit for bit. Another torch
    # release may change randperm's stream (RandomSampler's docstring); the deterministic parts are tested below.
    tensors = detector(name)
    rpn, rcnn = authors_sampling(name)
    for image in range(2):
        prefix = f"expected_train.img{image}."
        assert torch.equal(rpn.samples[image].pos_indices, tensors[prefix + "rpn_pos_inds"])
        assert torch.equal(rpn.samples[image].neg_indices, tensors[prefix + "rpn_neg_inds"])
        assert torch.equal(rpn.samples[image].pos_assigned_gt, tensors[prefix + "rpn_pos_assigned_gt_inds"])
        assert torch.equal(rcnn[image].pos_indices, tensors[prefix + "rcnn_pos_inds"])
        assert torch.equal(rcnn[image].neg_indices, tensors[prefix + "rcnn_neg_inds"])
        assert torch.equal(rcnn[image].pos_assigned_gt, tensors[prefix + "rcnn_pos_assigned_gt_inds"])
        assert torch.equal(rcnn[image].pos_is_gt, tensors[prefix + "rcnn_pos_is_gt"].bool())


@pytest.mark.parametrize("name", MASK_RCNNS)
@pytest.mark.parametrize("image", [0, 1])
@pytest.mark.parametrize("head", ["rpn", "rcnn"])
def test_sampler_counts_and_pools_match_the_authors(name, image, head):
    # What does not depend on the random draw: how many, from which pool, sorted, and (R-CNN) the gt boxes first.
    tensors = detector(name)
    prefix = f"expected_train.img{image}.{head}_"
    sampler = RPN_SAMPLER if head == "rpn" else RCNN_SAMPLER
    assigned = tensors[prefix + "assigned_gt_inds"].long()
    positives, negatives = tensors[prefix + "pos_inds"], tensors[prefix + "neg_inds"]
    pool_pos, pool_neg = int((assigned > 0).sum()), int((assigned == 0).sum())
    assert len(positives) == min(pool_pos, int(sampler.num * sampler.pos_fraction))
    assert len(negatives) == min(pool_neg, sampler.num - len(positives))
    for chosen, pool in ((positives, assigned > 0), (negatives, assigned == 0)):
        assert pool[chosen].all() and torch.equal(chosen, chosen.unique())
    num_gts = len(gts(name)[0][image])
    if head == "rcnn":  # [gt; proposals]: every gt box is its own positive
        assert torch.equal(positives[:num_gts], torch.arange(num_gts))
        assert torch.equal(tensors[prefix + "pos_is_gt"].bool(), positives < num_gts)
    # Our sampler on the stored assignment with these pools: the same counts, whatever the generator.
    for seed in (0, 1):
        generator = torch.Generator().manual_seed(seed)
        if head == "rpn":
            anchors, _ = batch_anchors(name)
            candidates = torch.cat(anchors)[torch.cat(batch_anchors(name)[1][image])]
            assignment = AssignResult(num_gts, assigned, torch.zeros(len(assigned)), None)
            sample = sampler.sample(assignment, candidates, gts(name)[0][image], generator=generator)
        else:
            proposals = tensors[f"expected_train.img{image}.rpn_proposals"]
            assignment = AssignResult(num_gts, assigned[num_gts:], torch.zeros(len(proposals)), None)
            sample = sampler.sample(assignment, proposals, *(part[image] for part in gts(name)), generator)
            assert torch.equal(sample.pos_indices[:num_gts], torch.arange(num_gts))
        assert len(sample.pos_indices) == len(positives) and len(sample.neg_indices) == len(negatives)
        assert (
            torch.equal(sample.neg_indices, sample.neg_indices.unique()) and (assigned[sample.neg_indices] == 0).all()
        )


@pytest.mark.parametrize("name", MASK_RCNNS)
def test_rcnn_targets_match_the_authors(name):
    tensors = detector(name)
    samples = stored_rcnn_samples(name)
    targets = rcnn_targets(samples, NUM_CLASSES)
    assert torch.equal(targets.labels, tensors["expected_train.rcnn_labels"])
    assert torch.equal(targets.label_weights, tensors["expected_train.rcnn_label_weights"])
    assert torch.equal(targets.bbox_weights, tensors["expected_train.rcnn_bbox_weights"])
    # The log of a few width / height ratios differs by one float32 ulp from the reference machine's (its libm);
    # every other target is bit for bit.
    torch.testing.assert_close(targets.bbox_targets, tensors["expected_train.rcnn_bbox_targets"], rtol=3e-7, atol=1e-7)
    # Independent: positives of each image first, their gt label and encoded gt box, then background.
    boxes, labels = gts(name)
    expected_labels, expected_deltas = [], []
    for image, sample in enumerate(samples):
        assigned = tensors[f"expected_train.img{image}.rcnn_pos_assigned_gt_inds"]
        candidates = torch.cat([boxes[image], tensors[f"expected_train.img{image}.rpn_proposals"][:, :4]])
        positives = candidates[tensors[f"expected_train.img{image}.rcnn_pos_inds"]].numpy()
        expected_labels += [labels[image][assigned], torch.full((len(sample.neg_indices),), NUM_CLASSES)]
        expected_deltas += [encode_numpy(positives, boxes[image][assigned].numpy(), RCNN_BOX_STDS)]
        expected_deltas += [np.zeros((len(sample.neg_indices), 4))]
    assert torch.equal(targets.labels, torch.cat(expected_labels))
    np.testing.assert_allclose(targets.bbox_targets.numpy(), np.concatenate(expected_deltas), rtol=1e-5, atol=1e-6)
    # The RoIs in the targets' order: per image its positives, then its negatives.
    rois = sampled_rois(samples)
    assert rois.shape == (len(targets.labels), 5) and torch.equal(rois[:, 0], (torch.arange(1024) >= 512).float())
    assert torch.equal(rois[:512, 1:], torch.cat([samples[0].pos_boxes, samples[0].neg_boxes]))


@pytest.mark.parametrize("name", MASK_RCNNS)
def test_mask_targets_match_the_authors(name):
    tensors = detector(name)
    samples = stored_rcnn_samples(name)
    gt_masks = [tensors[f"inputs.train.img{i}.gt_masks"] for i in range(2)]
    targets = mask_targets(samples, gt_masks)
    assert torch.equal(targets, tensors["expected_train.rcnn_mask_targets"].float())
    positive_rois = sampled_rois(samples, positives_only=True)
    assert len(positive_rois) == len(targets) == int((tensors["expected_train.rcnn_labels"] < NUM_CLASSES).sum())


@pytest.mark.parametrize("name", MASK_RCNNS)
def test_rcnn_losses_match_the_authors(name):
    tensors = detector(name)
    targets = RCNNTargets(*(tensors[f"expected_train.rcnn_{key}"] for key in RCNNTargets._fields))
    positives = targets.labels < NUM_CLASSES
    # The fixture keeps the box deltas of the positives only, the rows the loss reads: the others are random here.
    bbox_pred = torch.randn(len(targets.labels), 4 * NUM_CLASSES, generator=torch.Generator().manual_seed(0))
    bbox_pred[positives] = tensors["expected_train.rcnn_bbox_pred_pos"]
    losses = rcnn_losses(tensors["expected_train.rcnn_cls_score"], bbox_pred, targets)
    assert list(losses) == ["loss_cls", "acc", "loss_bbox"]
    for key, value in losses.items():
        assert value.item() == pytest.approx(tensors[f"expected_loss.{key}"].item(), rel=1e-5)


@pytest.mark.parametrize("name", MASK_RCNNS)
def test_mask_loss_matches_the_authors(name):
    tensors = detector(name)
    labels = tensors["expected_train.rcnn_labels"]
    labels = labels[labels < NUM_CLASSES]
    logits = torch.randn(len(labels), NUM_CLASSES, 28, 28, generator=torch.Generator().manual_seed(0))
    logits[torch.arange(len(labels)), labels] = tensors["expected_train.rcnn_mask_logits_label"]  # the read channel
    logits[:4] = tensors["expected_train.rcnn_mask_logits_first"]  # all channels of the first 4, as stored
    loss = mask_loss(logits, tensors["expected_train.rcnn_mask_targets"].float(), labels)
    assert loss.item() == pytest.approx(tensors["expected_loss.loss_mask"].item(), rel=1e-5)


@pytest.mark.parametrize(("name", "key"), [("retinanet", "loss_seg"), ("maskrcnn", "loss_aux_seg")])
def test_score_map_loss_matches_the_authors(name, key):
    tensors = detector(name)
    boxes, labels = gts(name)
    batch_size = tuple(tensors["meta.train.batch_input_shape"].tolist())
    size = (batch_size[0] // 4, batch_size[1] // 4)
    for image in range(2):
        targets, mask = detection_targets(boxes[image], labels[image], NUM_CLASSES, size)
        expected = tensors["expected_train.seg_target"][image].flatten(1).T.float()
        assert torch.equal(targets, expected)
        assert torch.equal(mask, tensors["expected_train.seg_mask"][image].flatten().bool())
    # The stored map is already divided by tau (the authors' s / tau before the upsampling).
    loss = detection_score_map_loss(tensors["expected_train.score_map"], boxes, labels, batch_size, temperature=1.0)
    assert loss.item() == pytest.approx(tensors[f"expected_loss.{key}"].item(), rel=1e-5)


@pytest.mark.parametrize("name", MASK_RCNNS + RETINANETS)
def test_loss_names_and_total_match_the_authors(name):
    tensors, info = detector(name), fixture_json(name)
    architecture = "mask_rcnn" if "maskrcnn" in name else "retinanet"
    names = detection_loss_names(architecture, score_map_loss=not name.startswith("clip"))
    assert list(names) == [key for key in info["log_vars"] if key != "loss"]  # mmdet's keys, in its order
    losses = {}
    for key in names:
        levels = [
            tensors[f"expected_loss.{key}.{level}"] for level in range(5) if f"expected_loss.{key}.{level}" in tensors
        ]
        losses[key] = levels or tensors[f"expected_loss.{key}"]
    total, values = total_detection_loss(losses)
    for key in names:
        assert values[key].item() == pytest.approx(info["log_vars"][key], rel=1e-6)
    assert total.item() == pytest.approx(tensors["expected_loss.total"].item(), rel=1e-6)  # acc is not summed


# ------------------------------------------------------------------------------------------- NumPy brute forces


def overlaps_float32(boxes1: np.ndarray, boxes2: np.ndarray, mode: str = "iou") -> np.ndarray:
    """mmdet's bbox_overlaps in NumPy float32 scalars, pair by pair, in its operation order."""
    out = np.zeros((len(boxes1), len(boxes2)), dtype=np.float32)
    for i, (x1, y1, x2, y2) in enumerate(boxes1):
        for j, (u1, v1, u2, v2) in enumerate(boxes2):
            inter = max(np.float32(0), min(x2, u2) - max(x1, u1)) * max(np.float32(0), min(y2, v2) - max(y1, v1))
            area1 = (x2 - x1) * (y2 - y1)
            union = area1 + (u2 - u1) * (v2 - v1) - inter if mode == "iou" else area1
            out[i, j] = inter / max(union, np.float32(1e-6))
    return out


def brute_force_assign(assigner: MaxIoUAssigner, boxes, gt_boxes, gt_labels, ignore=None):
    """mmdet's MaxIoUAssigner rules, candidate by candidate and gt by gt."""
    iou = overlaps_float32(gt_boxes, boxes)
    if assigner.ignore_iof_thr > 0 and ignore is not None and len(ignore) and len(boxes):
        iof = overlaps_float32(boxes, ignore, "iof")
        for j in range(len(boxes)):
            if iof[j].max() > np.float32(assigner.ignore_iof_thr):
                iou[:, j] = -1
    num_gts, num_boxes = iou.shape
    assigned = np.full(num_boxes, 0 if num_gts == 0 else -1)
    max_overlaps = np.zeros(num_boxes, dtype=np.float32)
    if num_gts and num_boxes:
        low, high = assigner.neg_iou_thr if isinstance(assigner.neg_iou_thr, tuple) else (0.0, assigner.neg_iou_thr)
        for j in range(num_boxes):
            best = int(np.argmax(iou[:, j]))  # the first best gt
            max_overlaps[j] = iou[best, j]
            if np.float32(low) <= iou[best, j] < np.float32(high):
                assigned[j] = 0
            if iou[best, j] >= np.float32(assigner.pos_iou_thr):
                assigned[j] = best + 1
        if assigner.match_low_quality:
            for i in range(num_gts):
                if iou[i].max() >= np.float32(assigner.min_pos_iou):
                    if assigner.gt_max_assign_all:
                        for j in range(num_boxes):
                            if iou[i, j] == iou[i].max():
                                assigned[j] = i + 1
                    else:
                        assigned[int(np.argmax(iou[i]))] = i + 1
    labels = np.array([gt_labels[k - 1] if k > 0 else -1 for k in assigned], dtype=np.int64)
    return assigned, max_overlaps, labels


def tied_boxes(rng: np.random.Generator, count: int) -> np.ndarray:
    """Integer boxes on a small grid, some repeated (exact IoU ties) and some of zero width."""
    corners = rng.integers(0, 24, size=(count, 2))
    sizes = rng.integers(0, 12, size=(count, 2))
    boxes = np.concatenate([corners, corners + sizes], 1).astype(np.float32)
    boxes[rng.integers(0, count, size=count // 4)] = boxes[rng.integers(0, count, size=count // 4)]
    return boxes


ASSIGNERS = {
    "retinanet": RETINANET_ASSIGNER,
    "rpn": RPN_ASSIGNER,
    "rcnn": RCNN_ASSIGNER,
    "first_best_only": MaxIoUAssigner(0.5, 0.4, 0.1, gt_max_assign_all=False),
    "no_low_quality": MaxIoUAssigner(0.5, 0.3, 0.3, match_low_quality=False),
    "negative_band": MaxIoUAssigner(0.6, (0.1, 0.4), 0.2),
    "ignore_crowd": MaxIoUAssigner(0.5, 0.4, 0.0, ignore_iof_thr=0.5),
}


@pytest.mark.parametrize("setting", ASSIGNERS)
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("num_gts", [0, 1, 6])
def test_assigner_matches_brute_force(setting, seed, num_gts):
    rng = np.random.default_rng(seed)
    boxes = tied_boxes(rng, 60)
    gt_boxes = tied_boxes(rng, num_gts)
    if num_gts > 1:
        gt_boxes[1] = gt_boxes[0]  # identical gt boxes: the first wins the best-gt ties, the last the low-quality ones
        gt_boxes[-1] = [100, 100, 110, 108]  # overlaps no candidate: with min_pos_iou 0 it takes every IoU-0 one
    gt_labels = rng.integers(0, 4, size=num_gts)
    ignore = tied_boxes(rng, 3)
    assigner = ASSIGNERS[setting]
    result = assigner.assign(*(torch.from_numpy(a) for a in (boxes, gt_boxes, gt_labels, ignore)))
    assigned, max_overlaps, labels = brute_force_assign(assigner, boxes, gt_boxes, gt_labels, ignore)
    np.testing.assert_array_equal(result.gt_indices.numpy(), assigned)
    np.testing.assert_array_equal(result.max_overlaps.numpy(), max_overlaps)
    np.testing.assert_array_equal(result.labels.numpy(), labels)
    if setting == "retinanet" and num_gts > 1:
        assert (result.gt_indices == num_gts).sum() == (overlaps_float32(gt_boxes, boxes)[-1] == 0).sum() > 0


def test_assigner_without_candidates_or_labels():
    empty = RPN_ASSIGNER.assign(torch.zeros(0, 4), torch.tensor([[0.0, 0, 4, 4]]), torch.tensor([2]))
    assert empty.gt_indices.shape == empty.max_overlaps.shape == empty.labels.shape == (0,)
    unlabelled = RPN_ASSIGNER.assign(torch.tensor([[0.0, 0, 4, 4], [8, 8, 9, 9]]), torch.tensor([[0.0, 0, 4, 4]]))
    assert unlabelled.labels is None and unlabelled.gt_indices.tolist() == [1, 0]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("num", "pos_fraction", "neg_pos_ub"), [(16, 0.25, -1), (8, 0.5, 2), (400, 0.5, -1)])
def test_random_sampler_counts_pools_and_order(seed, num, pos_fraction, neg_pos_ub):
    rng = np.random.default_rng(seed)
    gt_indices = torch.from_numpy(rng.choice([-1, 0, 0, 0, 1, 2], size=300))
    assignment = AssignResult(2, gt_indices, torch.zeros(300), torch.where(gt_indices > 0, 3, -1))
    gt_boxes = torch.tensor([[0.0, 0, 10, 10], [5, 5, 20, 30]])
    boxes = torch.from_numpy(tied_boxes(rng, 300))
    for add_gt in (False, True):
        sampler = RandomSampler(num, pos_fraction, neg_pos_ub, add_gt_as_proposals=add_gt)
        sample = sampler.sample(assignment, boxes, gt_boxes, torch.tensor([3, 3]), torch.Generator().manual_seed(seed))
        extended = torch.cat([torch.tensor([1, 2]), gt_indices]) if add_gt else gt_indices
        pool_pos, pool_neg = int((extended > 0).sum()), int((extended == 0).sum())
        num_pos = min(pool_pos, int(num * pos_fraction))
        num_neg = min(pool_neg, num - num_pos, *([neg_pos_ub * max(num_pos, 1)] if neg_pos_ub >= 0 else []))
        assert len(sample.pos_indices) == num_pos and len(sample.neg_indices) == num_neg
        assert (extended[sample.pos_indices] > 0).all() and (extended[sample.neg_indices] == 0).all()
        assert torch.equal(sample.pos_indices, sample.pos_indices.unique())
        assert torch.equal(sample.boxes, torch.cat([gt_boxes, boxes]) if add_gt else boxes)
        assert torch.equal(sample.pos_is_gt, sample.pos_indices < 2 if add_gt else torch.zeros(num_pos, dtype=bool))
        assert torch.equal(sample.pos_gt_boxes, gt_boxes[extended[sample.pos_indices] - 1])
        assert (sample.pos_gt_labels == 3).all()
        if pool_neg > num - num_pos:  # drawn: another generator state draws other candidates
            other = sampler.sample(
                assignment, boxes, gt_boxes, torch.tensor([3, 3]), torch.Generator().manual_seed(99)
            )
            assert not torch.equal(other.neg_indices, sample.neg_indices)


def brute_force_anchor_targets(anchors, valid, gt_boxes, gt_labels, samples, num_classes):
    """One image's targets over all anchors from its sampled positives / negatives (indices into the valid anchors)."""
    rows = np.nonzero(valid)[0]
    labels, weights = np.full(len(anchors), num_classes), np.zeros(len(anchors))
    deltas, delta_weights = np.zeros((len(anchors), 4)), np.zeros((len(anchors), 4))
    for index, gt in zip(samples.pos_indices.tolist(), samples.pos_assigned_gt.tolist(), strict=True):
        row = rows[index]
        labels[row] = 0 if gt_labels is None else gt_labels[gt]
        weights[row], delta_weights[row] = 1, 1
        deltas[row] = encode_numpy(anchors[row : row + 1], gt_boxes[gt : gt + 1])[0]
    weights[rows[samples.neg_indices.numpy()]] = 1
    return labels, weights, deltas, delta_weights


@pytest.mark.parametrize("head", ["retinanet", "rpn"])
@pytest.mark.parametrize("seed", range(2))
def test_anchor_targets_match_brute_force(head, seed):
    rng = np.random.default_rng(seed)
    generator = AnchorGenerator(strides=[8, 16], ratios=[0.5, 1.0, 2.0], scales=[2, 4])
    sizes = [(6, 5), (3, 3)]
    anchors = generator.grid_anchors(sizes)
    flags = [generator.valid_flags(sizes, pad) for pad in ((48, 40), (32, 24), (40, 40))]
    counts = (3, 0, 2)  # an image without gt boxes: all negatives, and it counts as 1 in the normaliser
    gt_boxes = [torch.from_numpy(tied_boxes(rng, count) * 1.5 + np.float32([0, 0, 2, 2])) for count in counts]
    gt_labels = [torch.from_numpy(rng.integers(0, 3, size=count)) for count in counts]
    if head == "retinanet":
        targets = anchor_targets(anchors, flags, gt_boxes, gt_labels, 3, RETINANET_ASSIGNER)
    else:
        sampler, generator_ = RandomSampler(24, 0.5), torch.Generator().manual_seed(seed)
        targets = anchor_targets(anchors, flags, gt_boxes, None, 1, RPN_ASSIGNER, sampler, generator=generator_)
    num_classes = 3 if head == "retinanet" else 1
    all_anchors = torch.cat(anchors).numpy()
    expected_factor = 0
    for image in range(3):
        valid = torch.cat(flags[image]).numpy()
        assigner = RETINANET_ASSIGNER if head == "retinanet" else RPN_ASSIGNER
        image_gts = (gt_boxes[image].numpy(), gt_labels[image].numpy())
        assigned = brute_force_assign(assigner, all_anchors[valid], *image_gts)[0]
        sample = targets.samples[image]
        np.testing.assert_array_equal(targets.assignments[image].gt_indices.numpy(), assigned)
        if head == "retinanet":
            np.testing.assert_array_equal(sample.pos_indices.numpy(), np.nonzero(assigned > 0)[0])
            np.testing.assert_array_equal(sample.neg_indices.numpy(), np.nonzero(assigned == 0)[0])
            expected_factor += max((assigned > 0).sum(), 1)
        else:
            assert (assigned[sample.pos_indices] > 0).all() and (assigned[sample.neg_indices] == 0).all()
            assert len(sample.pos_indices) == min((assigned > 0).sum(), 12)
            assert len(sample.neg_indices) == min((assigned == 0).sum(), 24 - len(sample.pos_indices))
            expected_factor += max(len(sample.pos_indices), 1) + max(len(sample.neg_indices), 1)
        labels = None if head == "rpn" else gt_labels[image].numpy()
        expected = brute_force_anchor_targets(all_anchors, valid, gt_boxes[image].numpy(), labels, sample, num_classes)
        for key, value in zip(("labels", "label_weights", "bbox_targets", "bbox_weights"), expected, strict=True):
            got = torch.cat([level[image] for level in getattr(targets, key)]).numpy()
            np.testing.assert_allclose(got, value, rtol=1e-5, atol=1e-6)
    assert targets.avg_factor == expected_factor
    assert [level.shape for level in targets.labels] == [(3, 6 * 5 * 6), (3, 3 * 3 * 6)]


def numpy_sigmoid_losses(logits, labels, weights, avg_factor, focal: bool, gamma=2.0, alpha=0.25) -> float:
    """Element by element in float64: one-hot targets without the background column, BCE, the focal factor."""
    total = 0.0
    for n in range(logits.shape[0]):
        for c in range(logits.shape[1]):
            x, t = float(logits[n, c]), float(labels[n] == c)
            p = 1 / (1 + np.exp(-x))
            loss = -(t * np.log(p) + (1 - t) * np.log(1 - p))
            if focal:
                loss *= (alpha * t + (1 - alpha) * (1 - t)) * ((1 - p) * t + p * (1 - t)) ** gamma
            total += loss * float(weights[n])
    return total / (avg_factor + float(FLOAT32_EPS))


@pytest.mark.parametrize("classification", ["focal", "sigmoid_cross_entropy"])
def test_anchor_head_losses_match_numpy(classification):
    rng = np.random.default_rng(3)
    generator = AnchorGenerator(strides=[8, 16], ratios=[0.5, 1.0, 2.0], scales=[4])
    sizes = [(4, 5), (2, 3)]
    anchors = generator.grid_anchors(sizes)
    flags = [generator.valid_flags(sizes, pad) for pad in ((32, 40), (24, 32))]
    gt_boxes = [torch.tensor([[4.0, 2, 30, 20], [10, 12, 22, 30]]), torch.tensor([[0.0, 0, 16, 16]])]
    num_channels = 4 if classification == "focal" else 1
    if classification == "focal":
        labels = [torch.tensor([1, 3]), torch.tensor([0])]
        targets = anchor_targets(anchors, flags, gt_boxes, labels, num_channels, RETINANET_ASSIGNER)
    else:
        generator_ = torch.Generator().manual_seed(0)
        targets = anchor_targets(
            anchors, flags, gt_boxes, None, 1, RPN_ASSIGNER, RandomSampler(16, 0.5), generator=generator_
        )
    cls_scores = [
        torch.from_numpy(rng.normal(0, 2, (2, 3 * num_channels, *size)).astype(np.float32)) for size in sizes
    ]
    bbox_preds = [torch.from_numpy(rng.normal(0, 1, (2, 12, *size)).astype(np.float32)) for size in sizes]
    for prediction in cls_scores + bbox_preds:
        prediction.requires_grad_()
    losses_cls, losses_bbox = anchor_head_losses(cls_scores, bbox_preds, targets, classification)
    assert len(losses_cls) == len(losses_bbox) == 2
    sum(losses_cls + losses_bbox).backward()
    for bbox_pred, box_weights in zip(bbox_preds, targets.bbox_weights, strict=True):
        # Box gradients reach exactly the positives' deltas, laid out (image, a * 4 + k, y, x).
        reached = bbox_pred.grad.view(2, 3, 4, *bbox_pred.shape[2:]).permute(0, 3, 4, 1, 2).reshape(2, -1, 4) != 0
        assert torch.equal(reached, box_weights > 0)
    for level, (cls_score, bbox_pred) in enumerate(zip(cls_scores, bbox_preds, strict=True)):
        cls_score, bbox_pred = cls_score.detach(), bbox_pred.detach()
        batch, _, height, width = cls_score.shape
        # Row (image, y, x, a) of the level: channel a * C + c of cls_score, a * 4 + k of bbox_pred.
        logits = np.array(
            [
                [cls_score[b, a * num_channels + c, y, x] for c in range(num_channels)]
                for b in range(batch)
                for y in range(height)
                for x in range(width)
                for a in range(3)
            ]
        )
        deltas = np.array(
            [
                [bbox_pred[b, a * 4 + k, y, x] for k in range(4)]
                for b in range(batch)
                for y in range(height)
                for x in range(width)
                for a in range(3)
            ]
        )
        labels = targets.labels[level].reshape(-1).numpy()
        weights = targets.label_weights[level].reshape(-1).numpy()
        expected_cls = numpy_sigmoid_losses(logits, labels, weights, targets.avg_factor, classification == "focal")
        assert losses_cls[level].item() == pytest.approx(expected_cls, rel=1e-5)
        box_targets = targets.bbox_targets[level].reshape(-1, 4).numpy()
        box_weights = targets.bbox_weights[level].reshape(-1, 4).numpy()
        expected_bbox = (np.abs(deltas - box_targets) * box_weights).sum() / targets.avg_factor
        assert losses_bbox[level].item() == pytest.approx(expected_bbox, rel=1e-5, abs=1e-12)
    assert sum(float((level < num_channels).sum()) for level in targets.labels) > 0


@pytest.mark.parametrize("loss", [sigmoid_focal_loss, sigmoid_cross_entropy_loss])
def test_sigmoid_losses_match_numpy(loss):
    rng = np.random.default_rng(5)
    logits = rng.normal(0, 3, (40, 3)).astype(np.float32)
    labels = rng.integers(0, 4, 40)  # 3 = background
    weights = rng.choice([0.0, 1.0], 40).astype(np.float32)
    value = loss(torch.from_numpy(logits), torch.from_numpy(labels), torch.from_numpy(weights), 7)
    expected = numpy_sigmoid_losses(logits, labels, weights, 7, focal=loss is sigmoid_focal_loss)
    assert value.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("gamma, alpha", [(2.0, 0.25), (1.5, 0.6), (0.0, 0.25)])
def test_sigmoid_focal_loss_gradient(gamma, alpha):
    # The closed-form backward against finite differences (float64), and against autograd through mmdet's formula
    # (float32), with saturated logits (+-30) among them.
    generator = torch.Generator().manual_seed(11)
    logits = torch.randn(30, 4, generator=generator, dtype=torch.float64) * 3
    logits[0, :2] = torch.tensor([30.0, -30.0], dtype=torch.float64)
    labels = torch.randint(0, 5, (30,), generator=generator)
    labels[0] = 0
    weights = torch.rand(30, generator=generator, dtype=torch.float64)

    def loss(x):
        return sigmoid_focal_loss(x, labels, weights, 3.0, gamma, alpha)

    assert torch.autograd.gradcheck(loss, (logits.clone().requires_grad_(),), eps=1e-6, atol=1e-8)
    x32 = logits.float().requires_grad_()
    value = sigmoid_focal_loss(x32, labels, weights.float(), 3.0, gamma, alpha)
    value.backward()
    reference = logits.float().requires_grad_()
    targets = F.one_hot(labels, 5)[:, :4].float()
    p = reference.sigmoid()
    pt = (1 - p) * targets + p * (1 - targets)
    elementwise = F.binary_cross_entropy_with_logits(reference, targets, reduction="none")
    elementwise = elementwise * ((alpha * targets + (1 - alpha) * (1 - targets)) * pt.pow(gamma))
    expected = (elementwise * weights.float().view(-1, 1)).sum() / (3.0 + FLOAT32_EPS)
    expected.backward()
    assert torch.equal(value, expected)  # the value: mmdet's formula bit for bit (in place, from the labels)
    torch.testing.assert_close(x32.grad, reference.grad, rtol=1e-5, atol=1e-7)


def test_rpn_label_zero_is_the_foreground():
    # One logit per anchor; label 0 (foreground) has target 1, label 1 (background) target 0.
    logits = torch.tensor([[2.0], [2.0]])
    losses = [sigmoid_cross_entropy_loss(logits[i : i + 1], torch.tensor([i]), None, 1) for i in range(2)]
    assert losses[0].item() == pytest.approx(np.log1p(np.exp(-2.0)), rel=1e-6)
    assert losses[1].item() == pytest.approx(np.log1p(np.exp(2.0)), rel=1e-6)


def test_rcnn_losses_match_numpy():
    rng = np.random.default_rng(7)
    count, num_classes = 12, 3
    cls_score = rng.normal(0, 2, (count, num_classes + 1)).astype(np.float32)
    bbox_pred = rng.normal(0, 1, (count, 4 * num_classes)).astype(np.float32)
    labels = np.array([0, 2, 1, 1, 3, 3, 3, 0, 3, 3, 2, 3])
    weights = np.ones(count, dtype=np.float32)
    deltas = rng.normal(0, 1, (count, 4)).astype(np.float32) * (labels < num_classes)[:, None]
    targets = RCNNTargets(
        torch.from_numpy(labels),
        torch.from_numpy(weights),
        torch.from_numpy(deltas),
        torch.from_numpy((labels < num_classes)[:, None].repeat(4, 1).astype(np.float32)),
    )
    losses = rcnn_losses(torch.from_numpy(cls_score), torch.from_numpy(bbox_pred), targets)
    log_softmax = cls_score - np.log(np.exp(cls_score.astype(np.float64)).sum(1, keepdims=True))
    assert losses["loss_cls"].item() == pytest.approx(-np.mean(log_softmax[np.arange(count), labels]), rel=1e-5)
    assert losses["acc"].item() == pytest.approx(100 * np.mean(cls_score.argmax(1) == labels), rel=1e-6)
    expected_bbox = sum(
        np.abs(bbox_pred[n, 4 * labels[n] : 4 * labels[n] + 4] - deltas[n]).sum()
        for n in range(count)
        if labels[n] < num_classes
    )
    assert losses["loss_bbox"].item() == pytest.approx(expected_bbox / count, rel=1e-5)  # over ALL sampled RoIs
    # Without positives: 0, still connected to the graph.
    background = RCNNTargets(torch.full((count,), num_classes), *targets[1:])
    pred = torch.from_numpy(bbox_pred).requires_grad_()
    empty = rcnn_losses(torch.from_numpy(cls_score), pred, background)["loss_bbox"]
    empty.backward()
    assert empty.item() == 0 and pred.grad is not None


def test_mask_loss_and_accuracy_match_numpy():
    rng = np.random.default_rng(9)
    logits = rng.normal(0, 2, (3, 4, 5, 5)).astype(np.float32)
    targets = rng.integers(0, 2, (3, 5, 5)).astype(np.float32)
    labels = np.array([2, 0, 3])
    chosen = logits[np.arange(3), labels].astype(np.float64)
    expected = np.mean(np.maximum(chosen, 0) - chosen * targets + np.log1p(np.exp(-np.abs(chosen))))
    value = mask_loss(torch.from_numpy(logits), torch.from_numpy(targets), torch.from_numpy(labels))
    assert value.item() == pytest.approx(expected, rel=1e-5)
    assert mask_loss(torch.zeros(0, 4, 5, 5), torch.zeros(0, 5, 5), torch.zeros(0, dtype=torch.long)).item() == 0
    assert classification_accuracy(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1])).item() == 50.0


def test_l1_loss_and_empty_targets():
    predictions, targets = torch.tensor([[1.0, -2.0], [0.5, 0.0]]), torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    weights = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    assert l1_loss(predictions, targets, weights, 2).item() == pytest.approx((1 + 2 + 1) / 2, rel=1e-6)
    empty = torch.zeros(0, 4, requires_grad=True)
    assert l1_loss(empty, torch.zeros(0, 4), None, 1).item() == 0


def test_mask_targets_clip_proposals_to_the_mask():
    # A positive box reaching beyond the bitmap is clipped to it first: the target then covers the whole bitmap.
    masks = torch.ones(1, 8, 6, dtype=torch.uint8)
    assignment = AssignResult(1, torch.tensor([1]), torch.ones(1), torch.tensor([0]))
    sample = pseudo_sample(assignment, torch.tensor([[-4.0, -4.0, 10.0, 12.0]]), torch.tensor([[0.0, 0, 6, 8]]))
    assert torch.equal(mask_targets([sample], [masks], mask_size=4), torch.ones(1, 4, 4))


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: detection_loss_names("yolo"), ValueError, "architecture must be one of"),
        (lambda: total_detection_loss({"acc": torch.tensor(1.0)}), ValueError, "No key containing 'loss'"),
        (lambda: total_detection_loss({"loss_cls": 1.0}), TypeError, "must be a tensor or a non-empty list"),
        (
            lambda: sigmoid_focal_loss(torch.zeros(2, 3), torch.tensor([0, 4]), None, 1),
            ValueError,
            r"labels must be in 0\.\.3",
        ),
        (lambda: l1_loss(torch.zeros(2, 4), torch.zeros(3, 4), None, 1), ValueError, "must have one shape"),
        (
            lambda: RandomSampler(8, 0.5, add_gt_as_proposals=True).sample(
                AssignResult(1, torch.tensor([0]), torch.zeros(1), None), torch.zeros(1, 4), torch.ones(1, 4)
            ),
            ValueError,
            "gt_labels` are needed",
        ),
        (
            lambda: SamplingResult.from_indices(
                AssignResult(1, torch.tensor([0, 1]), torch.zeros(2), None),
                torch.zeros(2, 4),
                torch.ones(1, 4),
                torch.tensor([0]),
                torch.tensor([1]),
            ),
            ValueError,
            "Sampled positives must be assigned",
        ),
        (
            lambda: anchor_targets(
                [torch.zeros(4, 4)], [[torch.ones(3, dtype=bool)]], [torch.zeros(0, 4)], None, 1, RPN_ASSIGNER
            ),
            ValueError,
            "valid_flags\\[0\\] cover 3 anchors",
        ),
        (
            lambda: anchor_targets(
                [torch.zeros(4, 4)], [[torch.zeros(4, dtype=bool)]], [torch.zeros(0, 4)], None, 1, RPN_ASSIGNER
            ),
            ValueError,
            "has no valid anchor",
        ),
        (
            lambda: rcnn_losses(torch.zeros(3, 4), torch.zeros(3, 8), RCNNTargets(*(torch.zeros(3),) * 4)),
            ValueError,
            "4 \\* 3 columns",
        ),
        (lambda: mask_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 5, 5), torch.zeros(2)), ValueError, "mask_logits"),
        (lambda: mask_targets([], [torch.zeros(1, 4, 4)]), ValueError, "one gt_masks tensor per image"),
    ],
)
def test_bad_input_raises_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()
