"""This package's detectors against the DenseCLIP authors' own detection code (their mmdet 2.28 detectors, built
from their repository), on the same random weights, side by side: inference on one 1333 x 800 image and one training
step (batch 2), RN50 RetinaNet and Mask R-CNN, 80 COCO classes (issues 18 and 19).

    PYTHONPATH=src python benchmarks/authors_detection_side_by_side.py \\
        [--det_python ~/.cache/denseclip-peer/venv-det/bin/python] \\
        [--denseclip_src ~/.cache/denseclip-peer/official] \\
        [--models retinanet mask_rcnn] [--rounds 1] [--repeats 1] [--train_steps 1] [--no_train] [--quick] \\
        [--malloc retain] [--workdir DIR] \\
        [--output benchmarks/results/authors_detection_side_by_side.json]

Optional: it needs the reference venv that `benchmarks/authors_detection/setup.sh` builds (mmdet 2.28.2 on mmcv 1.7.2
lite, CPU torch) and the authors' repository exported to `--denseclip_src` (`detection/configs`,
`detection/denseclip`). Both paths also come from the environment (`DET_PY`, `DENSECLIP_SRC`); without them the script
says what is missing and exits with status 2. None of the authors' code is copied: `authors_detection/
official_detectors.py` builds their configs `retinanet_denseclip_r50_fpn_1x_coco.py` and
`mask_rcnn_denseclip_r50_fpn_1x_coco.py` through mmdet's registries in the reference venv, randomizes every weight
(seed 7) and calibrates the final classifier from one forward so that 100 detections (and masks) come out as from a
trained model; this package's converter converts that state dict for the package side.

Same operators on both sides: mmcv lite has no compiled ops, so `authors_detection/ops_shim.py` gives mmcv the
package's plain-PyTorch NMS (`box_ops.nms` as `mmcv._ext.nms`) and RoIAlign (`box_ops.roi_align` as
`mmcv.ops.roi_align.roi_align`), proven equal to mmcv's CPU kernels; mmcv's and mmdet's Python code around them runs
unchanged. The stage tables give those operators' share.

Every phase is its own process (its peak resident memory is its own), 2 threads; the authors' and the package's phases
alternate for `--rounds` rounds, each timing the median over all rounds of `--repeats` calls (`--train_steps` steps)
after a first untimed one (`--quick`: the first one is timed too, which then includes first-call costs on both
sides: the package's text-embedding cache, optimizer state; a rough check, about half the time). What is timed:

- "inference": one 800 x 1333 image padded to 800 x 1344 (a fixed synthetic picture; both sides get the same
  normalized, padded tensor from the package's processor, and the authors the img_metas of their test pipeline for
  it), `torch.no_grad`. Authors: `model(img=[x], img_metas=[[meta]], return_loss=False, rescale=True)` (what their
  `test.py` runs per image: `simple_test`, boxes per class, masks pasted on the image). Package: `model(**inputs)`
  then the processor's post-processing (`threshold=0.0`: the authors' final detections; masks pasted as binary maps).
  The detections are compared: count, order (the package's, partitioned per class as mmdet's `bbox2result` does),
  labels, boxes and scores, masks.
- "train step": batch 2 at 800 x 1333 (padded to 800 x 1344), 10 random boxes per image (and box-shaped masks for
  Mask R-CNN), forward with the losses, backward, gradient clipping, optimizer step; train mode. Authors: their
  config's AdamW through mmcv's `build_optimizer` (lr_mult 0.1 backbone, 0 text encoder, no decay on norms),
  `model(..., return_loss=True)`, `_parse_losses`, the gradients clipped to their `grad_clip` (0.1) over every
  parameter with a gradient (mmcv's `OptimizerHook`). Package: what `examples/train_det.py` runs with the coco-*
  recipe (`benchmarks/detection_training.py`'s default path): the recipe's fused AdamW, text tower frozen, clip 0.1.
  Peak resident memory of each process.

The package side also runs both with its convolution weights in channels-last memory ("channels-last" rows:
`--channels_last` of `examples/evaluate_det.py` and `examples/train_det.py`), inference with its detections compared
again, its training step in a process of its own. Where pasted masks differ from the authors', the table says how
close to the mask threshold the package's mask probabilities are at those pixels (`_threshold_band`). `--malloc
retain` runs both sides' processes with glibc keeping freed memory for reuse (`authors_side_by_side.ALLOCATORS`).

Ratios (authors / package) are what to read; on a busy 2-core machine they move by 10-25%, so run it on an idle one.
"""

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from authors_side_by_side import (
    _machine,
    _median,
    _peak_gib,
    _phase,
    add_allocator_argument,
    allocator_environment,
    alternating_phases,
    check_reference_environment,
    save_side_by_side,
)
from stage_timer import StageTimer

HERE = Path(__file__).resolve().parent
PACKAGE_SRC = HERE.parent / "src"
IMAGE = (800, 1333)
STAGES = ["image encoder", "text tower", "prompting", "FPN", "heads", "NMS", "RoIAlign", "mask paste", "other"]
RECIPES = {"retinanet": "coco-retinanet-denseclip-rn50", "mask_rcnn": "coco-maskrcnn-denseclip-rn50"}
SPEED_TARGET, MEMORY_TARGET = 1.3, 0.8  # issues 18 and 19: speed-ups (authors / package), memory (package / authors)
BOX_TOLERANCE = 1e-3  # pixels
CHANNELS_LAST_INFERENCE, CHANNELS_LAST_TRAINING = "inference, channels-last", "train step, channels-last"
MASK_BANDS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)  # distances from the mask threshold (`_threshold_band`)
RUNS = ["inference", CHANNELS_LAST_INFERENCE, "train step", CHANNELS_LAST_TRAINING]


# ------------------------------------------------------------------------------------------------------------ inputs
def _repeat(call, count: int, warmup: int) -> tuple[list, object]:
    """`call()` `warmup + count` times: the results of the last `count` calls, and the first call's result."""
    results, first = [], None
    for index in range(warmup + count):
        result = call()
        if index == 0:
            first = result
        if index >= warmup:
            results.append(result)
    return results, first


def _timed_call(call) -> tuple[float, object]:
    """`call()`'s seconds and result."""
    start = time.perf_counter()
    result = call()
    return time.perf_counter() - start, result


def prepare_inputs(workdir: Path) -> None:
    """The processor's tensors for one synthetic 1333 x 800 picture (`inputs.pt`) and a training batch of 2 images
    with 10 random boxes each and their box-shaped masks (`train_batch.pt`), shared by both sides."""
    import numpy as np
    import torch
    from detection_training import labels
    from PIL import Image

    from denseclip_hf import DenseClipDetectionImageProcessor

    if (workdir / "train_batch.pt").exists():
        return
    rng = np.random.default_rng(0)
    coarse = Image.fromarray(rng.integers(0, 256, (25, 42, 3), dtype=np.uint8)).resize(IMAGE[::-1], Image.BILINEAR)
    picture = np.clip(np.asarray(coarse, dtype=np.int16) + rng.integers(-24, 25, (*IMAGE, 3)), 0, 255)
    inputs = DenseClipDetectionImageProcessor()(Image.fromarray(picture.astype(np.uint8)), return_tensors="pt")
    torch.save(dict(inputs), workdir / "inputs.pt")
    generator = torch.Generator().manual_seed(0)
    batch = {
        "pixel_values": torch.randn(2, 3, *inputs["pixel_values"].shape[-2:], generator=generator),
        "image_sizes": torch.tensor([IMAGE] * 2),
        "labels": labels(*IMAGE, True, generator),
    }
    torch.save(batch, workdir / "train_batch.pt")


# ---------------------------------------------------------------------------------------------------- authors' side
def _authors(name: str, workdir: Path):
    """The authors' detector with the weights of `workdir/ckpt.pth` (randomized and calibrated there once)."""
    import torch

    torch.set_num_threads(2)
    sys.path.insert(0, str(HERE / "authors_detection"))
    import official_detectors

    official_detectors.setup(str(PACKAGE_SRC))
    config, model = official_detectors.build(name)
    checkpoint = workdir / "ckpt.pth"
    if checkpoint.exists():
        model.load_state_dict(torch.load(checkpoint, weights_only=False)["state_dict"])
    else:
        official_detectors.randomize_(model, seed=7)
        inputs = torch.load(workdir.parent / "inputs.pt")
        official_detectors.calibrate_(model, inputs["pixel_values"], [_metas(inputs, 0)])
        torch.save({"state_dict": model.state_dict(), "meta": {"CLASSES": tuple(model.CLASSES)}}, checkpoint)
    return config, model


def _metas(inputs: dict, index: int) -> dict:
    """mmdet's img_metas of image `index` of the processor's tensors (what their test / train pipeline records)."""
    import numpy as np

    height, width = inputs["image_sizes"][index].tolist()
    padded = tuple(inputs["pixel_values"].shape[-2:])
    original = inputs["original_sizes"][index].tolist() if "original_sizes" in inputs else (height, width)
    factors = inputs["scale_factors"][index] if "scale_factors" in inputs else [1.0] * 4
    return {
        "img_shape": (height, width, 3),
        "ori_shape": (*original, 3),
        "pad_shape": (*padded, 3),
        "batch_input_shape": padded,
        "scale_factor": np.asarray(factors, dtype=np.float32),
        "flip": False,
        "flip_direction": None,
    }


def _instrument_authors(timer: StageTimer, model) -> None:
    """The stages of `STAGES` in the authors' detector. Heads: their layers (mmdet's dense heads call their own
    `forward` directly, which hooks do not see); NMS: the kernel (`mmcv._ext.nms`; mmcv's `batched_nms` around it
    counts as other); RoIAlign: `mmcv.ops.roi_align.roi_align`; mask paste: mmdet's `_do_paste_mask`."""
    from mmdet.models.roi_heads.mask_heads import fcn_mask_head

    timer.module(model.backbone, "image encoder")
    timer.module(model.text_encoder, "text tower")
    timer.function(model, "extract_feat", "prompting")  # minus the backbone, text tower and neck inside it
    timer.module(model.neck, "FPN")
    heads = [model.bbox_head] if hasattr(model, "bbox_head") else []
    if hasattr(model, "roi_head"):
        heads += [model.rpn_head, model.roi_head.bbox_head, model.roi_head.mask_head]
    for head in heads:
        for module in head.modules():
            if next(module.children(), None) is None:  # the layers (a ModuleList is iterated, never called)
                timer.module(module, "heads")
    timer.function(sys.modules["mmcv._ext"], "nms", "NMS")
    timer.function(sys.modules["mmcv.ops.roi_align"], "roi_align", "RoIAlign")
    timer.function(fcn_mask_head, "_do_paste_mask", "mask paste")


def _authors_detections(result) -> dict:
    """One image's result of the authors' test (per-class box arrays, and per-class mask lists) as tensors, classes
    in order (mmdet's `bbox2result` layout)."""
    import numpy as np
    import torch

    boxes, masks = result if isinstance(result, tuple) else (result, None)
    detections = {
        "boxes": torch.from_numpy(np.concatenate(boxes)),
        "labels": torch.cat([torch.full((len(rows),), label) for label, rows in enumerate(boxes)]),
    }
    if masks is not None:
        detections["masks"] = torch.from_numpy(np.stack([mask for per_class in masks for mask in per_class]))
    return detections


def authors_infer(name: str, workdir: Path, repeats: int, warmup: int) -> dict:
    import torch

    _, model = _authors(name, workdir)
    inputs = torch.load(workdir.parent / "inputs.pt")
    image, metas = inputs["pixel_values"], [_metas(inputs, 0)]
    timer = StageTimer(STAGES)
    _instrument_authors(timer, model)

    def call():
        return model(img=[image], img_metas=[metas], return_loss=False, rescale=True)

    with torch.no_grad():
        runs, first = _repeat(lambda: timer.run(call), repeats, warmup)
    output_file = workdir / "authors_detections.pt"
    if not output_file.exists():
        torch.save(_authors_detections(first[2][0]), output_file)
    return {
        "times": {"inference": [total for total, _, _ in runs]},
        "stages": [stages for _, stages, _ in runs],
        "peak_rss_gib": _peak_gib(),
    }


def authors_train(name: str, workdir: Path, steps: int, warmup: int) -> dict:
    import numpy as np
    import torch

    config, model = _authors(name, workdir)  # first: it installs the op shim that mmcv and mmdet need
    from mmcv.runner import build_optimizer
    from mmdet.core import BitmapMasks

    model.train()
    optimizer = build_optimizer(model, config.optimizer)
    clip = config.optimizer_config.grad_clip
    batch = torch.load(workdir.parent / "train_batch.pt")
    images = batch["pixel_values"]
    metas = [_metas(batch, index) for index in range(len(images))]
    targets = {
        "gt_bboxes": [target["boxes"] for target in batch["labels"]],
        "gt_labels": [target["class_labels"] for target in batch["labels"]],
    }
    if hasattr(model, "roi_head"):  # masks padded as mmdet's Pad pads them
        height, width = images.shape[-2:]
        targets["gt_masks"] = []
        for target in batch["labels"]:
            masks = target["masks"].numpy()
            padding = ((0, 0), (0, height - masks.shape[1]), (0, width - masks.shape[2]))
            targets["gt_masks"].append(BitmapMasks(np.pad(masks, padding), height, width))

    def step():  # mmcv's train_step, then its OptimizerHook
        loss, _ = model._parse_losses(model(img=images, img_metas=metas, return_loss=True, **targets))
        optimizer.zero_grad()
        loss.backward()
        parameters = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
        torch.nn.utils.clip_grad_norm_(parameters, **clip)
        optimizer.step()

    return {
        "times": {"train step": [seconds for seconds, _ in _repeat(lambda: _timed_call(step), steps, warmup)[0]]},
        "peak_rss_gib": _peak_gib(),
    }


# ---------------------------------------------------------------------------------------------------- package's side
def _package_model(name: str, workdir: Path):
    import torch
    from detection import MODELS

    torch.set_num_threads(2)
    folder = workdir / "converted"
    if not (folder / "config.json").exists():
        from denseclip_hf import convert_denseclip_checkpoint

        convert_denseclip_checkpoint(workdir / "ckpt.pth", output_dir=folder)
    return MODELS[name].from_pretrained(folder)


def _compare(ours: dict, theirs: dict, masks_at=None) -> dict:
    """The package's detections (by score, as the processor gives them) against the authors' (per class). Where masks
    differ, `masks_at(threshold)` (the package's masks at another mask threshold) tells how close to the threshold
    the differing pixels' mask probabilities are (`_threshold_band`)."""
    import torch

    labels = ours["labels"] if "labels" in ours else torch.tensor([s["label_id"] for s in ours["segments_info"]])
    scores = ours["scores"] if "scores" in ours else torch.tensor([s["score"] for s in ours["segments_info"]])
    order = torch.sort(labels, stable=True)[1]  # bbox2result: each class's rows in the head's order
    comparison = {"detections": len(labels), "authors_detections": len(theirs["labels"])}
    same = len(labels) == len(theirs["labels"]) and torch.equal(labels[order], theirs["labels"].to(labels.dtype))
    if same:
        box_difference = (ours["boxes"][order] - theirs["boxes"][:, :4]).abs().max().item()
        comparison["max_box_difference_px"] = box_difference
        comparison["max_score_difference"] = (scores[order] - theirs["boxes"][:, 4]).abs().max().item()
        same = box_difference <= BOX_TOLERANCE
        if "masks" in theirs:
            different = (ours["segmentation"][order] != theirs["masks"]).sum(dim=(1, 2))
            comparison["masks_differing"] = int((different > 0).sum())
            comparison["mask_pixels_differing"] = int(different.sum())
            if comparison["masks_differing"] and masks_at is not None:
                comparison["differing_pixels_within"] = _threshold_band(ours, theirs["masks"], order, masks_at)
            same = same and comparison["masks_differing"] == 0
    comparison["identical"] = bool(same)
    return comparison


def _threshold_band(ours: dict, theirs, order, masks_at) -> float | None:
    """The smallest distance `d` of `MASK_BANDS` such that every pixel where the package's masks differ from the
    authors' takes the authors' value at the mask threshold `t - d` or `t + d`: the package's mask probability there
    lies within `d` of the threshold `t`, where a float-rounding difference in the mask head or in the box the mask
    is pasted in can move it across. `None`: some pixel is further away."""
    differing = ours["segmentation"][order] != theirs
    for band in MASK_BANDS:
        below, above = (masks_at(ours["mask_threshold"] + sign * band)[order] for sign in (-1, 1))
        if bool(((below == theirs) | (above == theirs))[differing].all()):
            return band
    return None


def package_infer(name: str, workdir: Path, repeats: int, warmup: int) -> dict:
    import torch
    from detection import STAGES as PACKAGE_STAGES
    from detection import instrument, post_process

    from denseclip_hf import DenseClipDetectionImageProcessor

    assert PACKAGE_STAGES == STAGES
    model = _package_model(name, workdir).eval()
    inputs = torch.load(workdir.parent / "inputs.pt")
    timer = StageTimer(STAGES)
    instrument(timer, (model,))

    def call():
        outputs = model(**inputs)
        return outputs, post_process(model, outputs)

    def compare(outputs, detections: list[dict]) -> dict:
        def masks_at(threshold: float):
            processor = DenseClipDetectionImageProcessor()
            return processor.post_process_instance_segmentation(
                outputs, threshold=0.0, mask_threshold=threshold, return_binary_maps=True
            )[0]["segmentation"]

        mask_threshold = getattr(model.config, "mask_threshold", None)
        return _compare({**detections[0], "mask_threshold": mask_threshold}, theirs, masks_at)

    theirs = torch.load(workdir / "authors_detections.pt")
    with torch.no_grad():
        runs, first = _repeat(lambda: timer.run(call), repeats, warmup)
        comparison = {"inference": compare(*first[2])}
        model.to(memory_format=torch.channels_last)  # the fastest path (`--channels_last`), on the same weights
        fastest, first = _repeat(lambda: _timed_call(call), repeats, warmup)
        comparison[CHANNELS_LAST_INFERENCE] = compare(*first[1])
    return {
        "times": {"inference": [total for total, _, _ in runs], CHANNELS_LAST_INFERENCE: [t for t, _ in fastest]},
        "stages": [stages for _, stages, _ in runs],
        "comparison": comparison,
        "peak_rss_gib": _peak_gib(),
    }


def package_train(name: str, workdir: Path, steps: int, warmup: int, channels_last: bool = False) -> dict:
    import torch
    from detection_training import RECIPES as TRAINING_RECIPES

    from denseclip_hf.training.optimization import build_optimizer
    from denseclip_hf.training.recipes import DETECTION_RECIPES

    recipe = DETECTION_RECIPES[TRAINING_RECIPES[name]]
    model = _package_model(name, workdir).train()
    if channels_last:  # `examples/train_det.py --channels_last`
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(
        model, recipe.learning_rate, recipe.weight_decay, recipe.image_encoder_lr_multiplier, device_type="cpu"
    )
    batch = torch.load(workdir.parent / "train_batch.pt")
    if name == "retinanet":
        batch["labels"] = [
            {key: value for key, value in target.items() if key != "masks"} for target in batch["labels"]
        ]

    def step():  # benchmarks/detection_training.py's default path (examples/train_det.py's step)
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    run = CHANNELS_LAST_TRAINING if channels_last else "train step"
    return {
        "times": {run: [seconds for seconds, _ in _repeat(lambda: _timed_call(step), steps, warmup)[0]]},
        "peak_rss_gib": _peak_gib(),
    }


# ------------------------------------------------------------------------------------------------------------ driver
def _reference_paths(args) -> tuple[str, str]:
    python = os.path.expanduser(
        args.det_python or os.environ.get("DET_PY") or "~/.cache/denseclip-peer/venv-det/bin/python"
    )
    source = os.path.expanduser(
        args.denseclip_src or os.environ.get("DENSECLIP_SRC") or "~/.cache/denseclip-peer/official"
    )
    check_reference_environment(
        "the authors' detection code",
        ("--det_python (or DET_PY)", python, "bash benchmarks/authors_detection/setup.sh"),
        ("detection", source, "(github.com/raoyongming/DenseCLIP) there"),
        [],
    )
    return python, source


def _mean_stages(runs: list[dict]) -> dict:
    return {stage: statistics.mean(run[stage] for run in runs) for stage in STAGES}


def _masks_cell(comparison: dict) -> str:
    if "masks_differing" not in comparison:
        return ""
    cell = f"{comparison['masks_differing']} ({comparison['mask_pixels_differing']} px)"
    if comparison["masks_differing"]:
        band = comparison.get("differing_pixels_within")
        cell += f", each within {band:.0e} of the threshold" if band else ", NOT at the threshold"
    return cell


def summarize(results: dict) -> tuple[list[dict], str]:
    rows = []
    lines = [
        "| model | run | authors | package | ratio | target | detections (authors / package) | identical | "
        "max box diff. | masks differing (pixels) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        authors, package = result["authors"], result["package"]
        for run in RUNS:
            if run not in package:
                continue
            theirs, ours = _median(authors[run.split(",")[0]]), _median(package[run])  # the authors' default path
            row = {"model": name, "run": run, "authors_s": theirs, "package_s": ours, "speedup": theirs / ours}
            row["target"] = SPEED_TARGET
            goal = f">= {SPEED_TARGET}x: {'met' if theirs / ours >= SPEED_TARGET else 'NOT met'}"
            cells = ["", "", "", ""]
            comparison = result.get("comparison", {}).get(run)
            if comparison:
                row.update(comparison)
                cells = [
                    f"{comparison['authors_detections']} / {comparison['detections']}",
                    "yes" if comparison["identical"] else "NO",
                    f"{comparison['max_box_difference_px']:.1e} px" if "max_box_difference_px" in comparison else "",
                    _masks_cell(comparison),
                ]
            rows.append(row)
            lines.append(
                f"| {name} | {run} | {theirs:.2f} s | {ours:.2f} s | {theirs / ours:.2f}x | {goal} | "
                + " | ".join(cells)
                + " |"
            )
        for run, peaks in result.get("train_peak_gib", {}).items():
            theirs, ours = result["train_peak_gib"]["train step"]["authors"], peaks["package"]
            ratio = ours / theirs
            label = run.replace("train step", "train peak RSS")
            row = {"model": name, "run": label, "authors_gib": theirs, "package_gib": ours, "ratio": ratio}
            rows.append({**row, "target": MEMORY_TARGET})
            goal = f"<= {MEMORY_TARGET}x: {'met' if ratio <= MEMORY_TARGET else 'NOT met'}"
            lines.append(f"| {name} | {label} | {theirs:.2f} GiB | {ours:.2f} GiB | {ratio:.2f}x | {goal} | | | | |")
    lines += ["", "Inference time per stage (s, mean over the timed calls; share of the run in brackets):", ""]
    lines.append("| model | side | " + " | ".join(STAGES) + " |")
    lines.append("|---|---|" + "---|" * len(STAGES))
    for name, result in results.items():
        for side in ("authors", "package"):
            if not result["stages"][side]:
                continue
            stages = _mean_stages(result["stages"][side])
            result[f"{side}_stages_s"] = stages
            total = sum(stages.values())
            cells = [f"{stages[stage]:.2f} ({stages[stage] / total:.0%})" for stage in STAGES]
            lines.append(f"| {name} | {side} | " + " | ".join(cells) + " |")
            rows.append(
                {"model": name, "run": f"inference stages ({side})", **{f"{s}_s": v for s, v in stages.items()}}
            )
    return rows, "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phase", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--det_python", help="python of the reference venv (setup.sh); or DET_PY")
    parser.add_argument("--denseclip_src", help="the authors' repository, exported; or DENSECLIP_SRC")
    parser.add_argument("--models", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1, help="timed inference calls per phase (after a first one)")
    parser.add_argument(
        "--train_steps", type=int, default=1, help="timed training steps per phase (after a first one)"
    )
    parser.add_argument("--no_train", action="store_true", help="inference only")
    add_allocator_argument(parser)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="time the first call and step too (no untimed one before): a rough check in about half the time",
    )
    parser.add_argument("--workdir", type=Path, help="where the weights and outputs go (default: a temporary folder)")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "authors_detection_side_by_side.json")
    args = parser.parse_args()
    if args.phase:  # inside a phase process (the reference venv's python or this package's)
        phase, name, workdir, count, warmup = (
            args.phase[0],
            args.phase[1],
            Path(args.phase[2]),
            *map(int, args.phase[3:]),
        )
        functions = {
            "authors_infer": authors_infer,
            "authors_train": authors_train,
            "package_infer": package_infer,
            "package_train": package_train,
            "package_train_channels_last": lambda *phase: package_train(*phase, channels_last=True),
        }
        print("@@RESULT@@" + json.dumps(functions[phase](name, workdir, count, warmup)))
        return

    det_python, source = _reference_paths(args)
    env = dict(os.environ, DENSECLIP_SRC=source, PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_SRC), str(HERE), env.get("PYTHONPATH")]))
    allocator = allocator_environment(env, args)
    started, machine_before = datetime.datetime.now(datetime.timezone.utc), _machine()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="authors-detection-"))
    root.mkdir(parents=True, exist_ok=True)
    prepare_inputs(root)
    results = {}
    for name in args.models:
        workdir = root / name
        workdir.mkdir(exist_ok=True)
        result = results[name] = {"authors": {}, "package": {}, "stages": {"authors": [], "package": []}}
        phases = alternating_phases(det_python, args)
        if not args.no_train:  # the fastest path's training step, a process of its own (its own peak memory)
            phases.append(("package", sys.executable, "package_train_channels_last", args.train_steps))
        peaks = {}
        for _ in range(args.rounds):
            for side, python, phase, count in phases:
                print(f"{name}: {phase} ...", file=sys.stderr, flush=True)
                out = _phase(
                    python, [phase, name, str(workdir), str(count), "0" if args.quick else "1"], env, script=__file__
                )
                for run, times in out["times"].items():
                    result[side].setdefault(run, []).extend(times)
                result["stages"][side].extend(out.get("stages", []))
                print(f"{name}: {phase}: {json.dumps(out)}", file=sys.stderr, flush=True)
                if "comparison" in out:
                    result["comparison"] = out["comparison"]
                if "_train" in phase:
                    run = next(iter(out["times"]))
                    run_peaks = peaks.setdefault(run, {})
                    run_peaks[side] = max(run_peaks.get(side, 0.0), out["peak_rss_gib"])
        if not args.no_train:
            result["train_peak_gib"] = peaks
    rows, markdown = summarize(results)
    runs = f"{args.rounds} round(s) x {args.repeats} inference call(s)"
    runs += "" if args.no_train else f" and {args.train_steps} training step(s)"
    runs += " (--quick: the first ones, timed)" if args.quick else " after a first untimed one"
    runs += f", {allocator}"
    against = (
        "the authors' detection code (mmdet 2.28.2, mmcv 1.7.2 lite + the package's NMS and RoIAlign on both sides)"
    )
    save_side_by_side(args, against, runs, started, machine_before, rows, markdown, results, quick=args.quick)


if __name__ == "__main__":
    main()
