"""Inference speed of the DenseCLIP detectors (RN50 RetinaNet and Mask R-CNN, 80 COCO classes, random weights) at the
paper's input (an 800 x 1333 image, padded to 800 x 1344): this package's default path against the same model
computing as the authors' code (text tower on every forward, `authors.text_as_the_authors`), side by side in one run,
with the time of each stage and the share of the plain-PyTorch NMS, RoIAlign and mask pasting.

    PYTHONPATH=src python benchmarks/detection.py [--repeats 2] [--models retinanet mask_rcnn]
        [--output benchmarks/results/detection.json]

A run is what the authors' `simple_test` does for one image (batch 1, `rescale=True`): the forward (which ends with
the test post-processing: selection, decoding, NMS, and for Mask R-CNN the RoI heads and mask head on the final boxes)
and the processor's post-processing (`threshold=0.0`, the authors' final detections; Mask R-CNN: masks pasted on the
image). Stages (exclusive times): image encoder; text tower; prompting (context decoder, score map); FPN; heads (the
RetinaNet head; RPN, box and mask heads); NMS (`batched_nms`: RPN and class-wise); RoIAlign (box and mask RoIs); mask
paste; other (anchors, selection, decoding, RoI bookkeeping). Random weights would leave the post-processing little to
do, so the classifiers are calibrated once from a forward (RetinaNet: logits of mean -4.6, the focal-loss prior, and
std 1, so that every level fills its 1000 candidates; Mask R-CNN: class logits of std 3, so that most RoIs have a class
above 0.05), then 100 detections (and masks) per image come out, as from a trained COCO model. The two paths
alternate; each time is the median of `--repeats`, each stage the mean. Ratios are what to read: the machine's load
changes absolute times.
"""

import argparse
import statistics
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from authors import text_as_the_authors
from configs import CLIP_TEXT, save_results
from stage_timer import StageTimer
from torch import nn
from transformers import CLIPTokenizer

import denseclip_hf.image_processing_denseclip_detection as processing_module
import denseclip_hf.modeling_denseclip_detection as modeling_module
from denseclip_hf import (
    CLIP_TOKENIZER_PATH,
    DenseClipDetectionImageProcessor,
    DenseClipForInstanceSegmentation,
    DenseClipForObjectDetection,
    DenseClipMaskRCNNConfig,
    DenseClipRetinaNetConfig,
    tokenize_class_names,
)
from denseclip_hf.convert_denseclip_original_to_hf import COCO_CLASS_NAMES

IMAGE = (800, 1333)  # the test pipeline's output for a 1333 x 800 image (scale 1)
PADDED = (800, 1344)
MODELS = {"retinanet": DenseClipForObjectDetection, "mask_rcnn": DenseClipForInstanceSegmentation}
STAGES = ["image encoder", "text tower", "prompting", "FPN", "heads", "NMS", "RoIAlign", "mask paste", "other"]


def config(name: str) -> DenseClipRetinaNetConfig | DenseClipMaskRCNNConfig:
    """RN50 (the default image encoder, 42 x 42 grid), CLIP's text tower, COCO's 80 classes, the authors' settings."""
    tokenizer = CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_PATH)
    return MODELS[name].config_class(
        text_config=CLIP_TEXT,
        id2label=dict(enumerate(COCO_CLASS_NAMES)),
        class_token_ids=tokenize_class_names(list(COCO_CLASS_NAMES), tokenizer, 5),
    )


def calibrate(model: nn.Module, inputs: dict[str, torch.Tensor]) -> None:
    """Rescales the classifier of random weights as a trained one scores (see the module docstring)."""
    with torch.no_grad():
        outputs = model(**inputs)
        if isinstance(model, DenseClipForObjectDetection):
            logits = torch.cat([level.flatten() for level in outputs.class_logits])
            classifier, mean, std = model.head.classifier, -4.6, 1.0
        else:
            logits = torch.cat(outputs.roi_class_logits).flatten()
            classifier, mean, std = model.box_head.classifier, 0.0, 3.0
        scale = std / logits.std()
        classifier.weight.mul_(scale)
        classifier.bias.copy_((classifier.bias - logits.mean()) * scale + mean)


def instrument(timer: StageTimer, detectors: tuple[nn.Module, ...]) -> None:
    """Times the stages of `STAGES` in `detectors` (forward hooks) and in the package's module functions."""
    for detector in detectors:
        timer.module(detector.denseclip.image_encoder, "image encoder")
        timer.module(detector.denseclip.text_encoder, "text tower")
        timer.module(detector.denseclip, "prompting")  # the base model minus its image encoder and text tower
        timer.module(detector.fpn, "FPN")
        for head in ("head", "rpn", "box_head", "mask_head"):
            timer.module(getattr(detector, head, None), "heads")
    timer.function(modeling_module, "batched_nms", "NMS")
    timer.function(modeling_module, "multi_level_roi_align", "RoIAlign")
    timer.function(processing_module, "paste_masks", "mask paste")


def post_process(model: nn.Module, outputs) -> list[dict]:
    processor = DenseClipDetectionImageProcessor()
    if isinstance(model, DenseClipForObjectDetection):
        return processor.post_process_object_detection(outputs, threshold=0.0)
    return processor.post_process_instance_segmentation(outputs, threshold=0.0, return_binary_maps=True)


def _detections(result: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels and scores of one image's post-processed result (object detection or instance segmentation format)."""
    if "labels" in result:
        return result["labels"], result["scores"]
    segments = result["segments_info"]
    return torch.tensor([segment["label_id"] for segment in segments]), torch.tensor([s["score"] for s in segments])


def differences(ours: list[dict], theirs: list[dict]) -> dict:
    """Whether both paths detect the same (labels, and masks, equal) and their largest score / box differences."""
    (labels, scores), (their_labels, their_scores) = _detections(ours[0]), _detections(theirs[0])
    same = torch.equal(labels, their_labels)
    if "segmentation" in ours[0]:
        same = same and torch.equal(ours[0]["segmentation"], theirs[0]["segmentation"])
    return {
        "identical_detections": bool(same),
        "detections": len(labels),
        "max_score_difference": (scores - their_scores).abs().max().item() if same else float("nan"),
        "max_box_difference": (ours[0]["boxes"] - theirs[0]["boxes"]).abs().max().item() if same else float("nan"),
    }


def measure(name: str, repeats: int) -> dict:
    torch.manual_seed(0)
    model = MODELS[name](config(name)).eval()
    inputs = {
        "pixel_values": torch.randn(1, 3, *PADDED),
        "image_sizes": torch.tensor([IMAGE]),
        "scale_factors": torch.ones(1, 4),
        "original_sizes": torch.tensor([IMAGE]),
    }
    calibrate(model, inputs)
    authors = MODELS[name](model.config).eval()
    authors.load_state_dict(model.state_dict())
    text_as_the_authors(authors.denseclip)
    timer = StageTimer(STAGES)
    instrument(timer, (model, authors))

    def call(detector: nn.Module) -> Callable[[], list[dict]]:
        return lambda: post_process(detector, detector(**inputs))

    runs = {"default": call(model), "authors": call(authors)}
    with torch.no_grad():
        results = {path: timer.run(run)[2] for path, run in runs.items()}  # warm-up (and the text cache)
        times, stages = defaultdict(list), defaultdict(list)
        for _ in range(repeats):
            for path, run in runs.items():
                total, per_stage, _ = timer.run(run)
                times[path].append(total)
                stages[path].append(per_stage)
    row = {"model": f"{name} RN50", "input": f"{PADDED[0]}x{PADDED[1]}"}
    for path in runs:
        row[f"{path}_s"] = statistics.median(times[path])
        row[f"{path}_stages_s"] = {stage: statistics.mean(run[stage] for run in stages[path]) for stage in STAGES}
    row["speedup"] = row["authors_s"] / row["default_s"]
    default_stages = row["default_stages_s"]
    row["ops_share"] = {
        stage: default_stages[stage] / sum(default_stages.values()) for stage in ("NMS", "RoIAlign", "mask paste")
    }
    row.update(differences(results["default"], results["authors"]))
    print(
        f"{row['model']}: default {row['default_s']:.2f} s, as the authors {row['authors_s']:.2f} s -> "
        f"{row['speedup']:.2f}x; {row['detections']} detections, identical: {row['identical_detections']}",
        flush=True,
    )
    return row


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | input | default (s) | as the authors (s) | speed-up | detections | identical | max box diff. |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['input']} | {row['default_s']:.2f} | {row['authors_s']:.2f} | "
            f"{row['speedup']:.2f}x | {row['detections']} | {'yes' if row['identical_detections'] else 'no'} | "
            f"{row['max_box_difference']:.1e} px |"
        )
    lines += ["", "Time per stage (s, mean of the repeats; share of the default path's run in brackets):", ""]
    lines.append("| model | path | " + " | ".join(STAGES) + " |")
    lines.append("|---|---|" + "---|" * len(STAGES))
    for row in rows:
        for path, label in (("default", "default"), ("authors", "as the authors")):
            stages = row[f"{path}_stages_s"]
            total = sum(stages.values())
            cells = [f"{stages[stage]:.3f} ({stages[stage] / total:.0%})" for stage in STAGES]
            lines.append(f"| {row['model']} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/detection.json"))
    args = parser.parse_args()
    rows = [measure(name, args.repeats) for name in args.models]
    save_results(args.output, rows, markdown(rows), repeats=args.repeats, image=list(IMAGE), padded=list(PADDED))


if __name__ == "__main__":
    main()
