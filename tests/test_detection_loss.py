"""Eq. 8: the detection targets and loss against a NumPy brute force (the authors' box rule, per cell and box)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from denseclip_hf import detection_score_map_loss, detection_targets


def brute_force_targets(boxes: np.ndarray, labels: np.ndarray, num_labels: int, size, stride: int):
    """Loops over every box and cell, with the authors' rule: coordinates // stride (truncated), clamped to the last
    cell, end exclusive."""
    targets = np.zeros((size[0] * size[1], num_labels))
    mask = np.zeros(size[0] * size[1], dtype=bool)
    for box, label in zip(boxes, labels, strict=True):
        x1, y1, x2, y2 = (int(value / stride) for value in box)
        x1, x2 = (min(max(x, 0), size[1] - 1) for x in (x1, x2))
        y1, y2 = (min(max(y, 0), size[0] - 1) for y in (y1, y2))
        for i in range(size[0]):
            for j in range(size[1]):
                if y1 <= i < y2 and x1 <= j < x2:
                    targets[i * size[1] + j, label] = 1
                    mask[i * size[1] + j] = True
    return targets, mask


def random_boxes(generator: np.random.Generator, count: int, height: int, width: int, num_labels: int):
    corners = generator.uniform(0, [width, height, width, height], size=(count, 4))
    boxes = np.concatenate([np.minimum(corners[:, :2], corners[:, 2:]), np.maximum(corners[:, :2], corners[:, 2:])], 1)
    return boxes, generator.integers(0, num_labels, size=count)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("count", [0, 1, 5])
def test_targets_match_brute_force(seed, count):
    generator = np.random.default_rng(seed)
    height, width, num_labels, stride = 36, 52, 3, 4
    boxes, labels = random_boxes(generator, count, height, width, num_labels)
    size = (height // stride, width // stride)
    targets, mask = detection_targets(torch.tensor(boxes), torch.tensor(labels), num_labels, size, stride)
    expected_targets, expected_mask = brute_force_targets(boxes, labels, num_labels, size, stride)
    assert targets.shape == (size[0] * size[1], num_labels) and mask.shape == (size[0] * size[1],)
    np.testing.assert_array_equal(targets.numpy(), expected_targets)
    np.testing.assert_array_equal(mask.numpy(), expected_mask)


def test_box_edges_follow_the_authors_rule():
    # Stride 4: x1 = 3.9 truncates to cell 0, x2 = 8 ends before cell 2; y2 = 12 on a 2-row grid clamps to row 1, so
    # only row 0 is inside (the authors' clamp to the last cell leaves the last row out).
    targets, mask = detection_targets(torch.tensor([[3.9, 0.0, 8.0, 12.0]]), torch.tensor([1]), 2, (2, 3), 4)
    assert mask.tolist() == [True, True, False, False, False, False]
    assert targets[:2].tolist() == [[0.0, 1.0], [0.0, 1.0]] and targets[2:].sum() == 0


@pytest.mark.parametrize("seed", range(3))
def test_loss_matches_brute_force(seed):
    generator = np.random.default_rng(seed)
    batch, num_labels, image_size, temperature = 3, 4, (32, 48), 0.07
    score_map = torch.tensor(generator.uniform(-1, 1, size=(batch, num_labels, 2, 3)), dtype=torch.float32)
    boxes, labels = zip(*(random_boxes(generator, count, *image_size, num_labels) for count in (2, 0, 3)), strict=True)
    loss = detection_score_map_loss(
        score_map, [torch.tensor(b) for b in boxes], [torch.tensor(l_) for l_ in labels], image_size, temperature
    )
    # Independent: upsample with torch (bilinear, align_corners=False), then sigmoid and BCE in NumPy.
    size = (image_size[0] // 4, image_size[1] // 4)
    logits = F.interpolate(score_map / temperature, size=size, mode="bilinear", align_corners=False).numpy()
    total, count = 0.0, 0
    for image in range(batch):
        targets, mask = brute_force_targets(boxes[image], labels[image], num_labels, size, 4)
        probabilities = 1 / (1 + np.exp(-logits[image].reshape(num_labels, -1).T.astype(np.float64)))
        bce = -(targets * np.log(probabilities) + (1 - targets) * np.log(1 - probabilities))
        total += bce[mask].sum()
        count += mask.sum() * num_labels
    assert loss.item() == pytest.approx(total / count, rel=1e-5)


def test_loss_without_boxes_is_zero_and_has_gradients():
    score_map = torch.randn(2, 3, 4, 4, requires_grad=True)
    empty = [torch.zeros(0, 4), torch.zeros(0, 4)]
    loss = detection_score_map_loss(score_map, empty, [torch.zeros(0, dtype=torch.long)] * 2, (16, 16))
    loss.backward()
    assert loss.item() == 0.0 and score_map.grad is not None


@pytest.mark.parametrize(
    ("boxes", "labels", "message"),
    [(torch.zeros(2, 3), torch.zeros(2), "boxes must be"), (torch.zeros(1, 4), torch.tensor([5]), "class ids")],
)
def test_bad_boxes_raise(boxes, labels, message):
    with pytest.raises(ValueError, match=message):
        detection_targets(boxes, labels, 3, (4, 4))


def test_loss_needs_one_boxes_tensor_per_image():
    with pytest.raises(ValueError, match="one boxes and one labels tensor per image"):
        detection_score_map_loss(torch.zeros(2, 3, 4, 4), [torch.zeros(0, 4)], [torch.zeros(0)], (16, 16))
