"""The detection ops of `denseclip_hf.box_ops` at Mask R-CNN / RetinaNet sizes on COCO (an 800 x 1333 input), each
timed side by side with one 3x3 256->256 convolution on P2 (200 x 336): the FPN output conv and the RPN conv of a
Mask R-CNN forward are two of those, the ResNet and the rest of the heads come on top.

    PYTHONPATH=src python benchmarks/box_ops.py [--repeats 5] [--threads N] [--output benchmarks/results/box_ops.json]

Random inputs: boxes with sides log-uniform in [16, 400] px, RoIs with sides log-uniform in [16, 112] px (all on P2)
or [16, 800] px (the 4 levels P2-P5), masks on boxes of 20-600 px.
"""

import argparse
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from configs import save_results

from denseclip_hf.box_ops import batched_nms, multi_level_roi_align, nms, paste_masks, roi_align

HEIGHT, WIDTH = 800, 1344  # padded input
STRIDES = [4, 8, 16, 32]


def random_boxes(generator: torch.Generator, count: int, smallest: float, largest: float) -> torch.Tensor:
    """(count, 4) boxes inside the input, sides log-uniform in [smallest, largest]."""
    sides = torch.exp(torch.empty(count, 2).uniform_(math.log(smallest), math.log(largest), generator=generator))
    corner = torch.rand(count, 2, generator=generator) * (torch.tensor([WIDTH, HEIGHT]) - sides).clamp(min=0)
    return torch.cat([corner, corner + sides], 1)


def as_rois(boxes: torch.Tensor) -> torch.Tensor:
    return torch.cat([boxes.new_zeros(len(boxes), 1), boxes], 1)


def calls(generator: torch.Generator) -> dict[str, tuple[str, Callable[[], object]]]:
    """Row name -> (case, call)."""
    boxes = random_boxes(generator, 5000, 16, 400)
    scores = torch.rand(5000, generator=generator)
    labels = torch.randint(0, 80, (5000,), generator=generator)
    # R-CNN: 1000 proposals decoded per class (jittered copies), 80 classes -> the per-class path (> 10000 boxes).
    proposals = random_boxes(generator, 1000, 16, 400)
    per_class = (proposals[:, None] + torch.randn(1000, 80, 4, generator=generator) * 4).reshape(-1, 4)
    per_class_labels = torch.arange(80).repeat(1000)
    per_class_scores = torch.rand(80000, generator=generator)
    pyramid = [torch.randn(1, 256, HEIGHT // s, WIDTH // s, generator=generator) for s in STRIDES]
    pyramid_cl = [level.contiguous(memory_format=torch.channels_last) for level in pyramid]
    small_rois = as_rois(random_boxes(generator, 1000, 16, 112))
    rois = as_rois(random_boxes(generator, 1000, 16, 800))
    mask_rois = as_rois(random_boxes(generator, 100, 16, 800))
    mask_boxes = random_boxes(generator, 100, 20, 600)
    masks = torch.rand(100, 1, 28, 28, generator=generator)
    weight = torch.randn(256, 256, 3, 3, generator=generator) / 48
    return {
        "conv 3x3 256->256 on P2 (yardstick)": (
            "1 x 256 x 200 x 336",
            lambda: F.conv2d(pyramid[0], weight, padding=1),
        ),
        "nms": ("5000 boxes, IoU 0.5", lambda: nms(boxes, scores, 0.5)),
        "batched_nms (one NMS, offset boxes)": (
            "5000 boxes, 80 classes",
            lambda: batched_nms(boxes, scores, labels, 0.5),
        ),
        "batched_nms (per-class loop)": (
            "1000 x 80 candidates",
            lambda: batched_nms(per_class, per_class_scores, per_class_labels, 0.5),
        ),
        "roi_align, P2": ("1000 RoIs 7x7, NCHW", lambda: roi_align(pyramid[0], small_rois, 7, 0.25)),
        "roi_align, P2 channels-last": ("1000 RoIs 7x7", lambda: roi_align(pyramid_cl[0], small_rois, 7, 0.25)),
        "multi_level_roi_align, P2-P5": (
            "1000 RoIs 7x7, NCHW",
            lambda: multi_level_roi_align(pyramid, rois, 7, STRIDES),
        ),
        "multi_level_roi_align, P2-P5 channels-last": (
            "1000 RoIs 7x7",
            lambda: multi_level_roi_align(pyramid_cl, rois, 7, STRIDES),
        ),
        "multi_level_roi_align (masks), P2-P5": (
            "100 RoIs 14x14, NCHW",
            lambda: multi_level_roi_align(pyramid, mask_rois, 14, STRIDES),
        ),
        "multi_level_roi_align (masks), P2-P5 channels-last": (
            "100 RoIs 14x14",
            lambda: multi_level_roi_align(pyramid_cl, mask_rois, 14, STRIDES),
        ),
        "paste_masks": ("100 masks 28x28 on 800 x 1333", lambda: paste_masks(masks, mask_boxes, (800, 1333))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/box_ops.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    rows = []
    cases = calls(generator)
    times = {name: [] for name in cases}
    for _, call in cases.values():
        call()  # warm-up
    for _ in range(args.repeats):  # round robin, so that load changes hit every row alike
        for name, (_, call) in cases.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    yardstick = statistics.median(next(iter(times.values())))
    for name, (case, _) in cases.items():
        median = statistics.median(times[name])
        rows.append({"op": name, "case": case, "ms": median * 1e3, "vs_conv": median / yardstick})
        print(rows[-1], flush=True)
    lines = ["| op | case | ms | / P2 conv |", "|---|---|---|---|"]
    lines += [f"| {row['op']} | {row['case']} | {row['ms']:.1f} | {row['vs_conv']:.3f} |" for row in rows]
    save_results(args.output, rows, "\n".join(lines) + "\n", repeats=args.repeats)


if __name__ == "__main__":
    main()
