"""The evaluation job of `examples/evaluate_det.py`: a DenseCLIP detector (RetinaNet or Mask R-CNN) on a COCO
folder, a Hub dataset in COCO format or the synthetic scenes, scored with COCO AP by `pycocotools`, with Accelerate
(CPU, one or many GPUs).

`evaluate_detector(args)` loads the model's config, its processor and the validation split
([`DetectionDataArguments`]), checks that their classes agree, runs [`detection_results`] (the authors' test, each
image once over all processes) and [`coco_metrics`] (against COCO's own annotation file for a COCO folder, else the
dataset's annotations), and writes into `--output_dir`:

| file | content |
|---|---|
| `eval_results.json` | COCO AP (bbox, and segm for Mask R-CNN; mmdet's names), the protocol, model id and revision |
| `eval_results.md` | the same as a Markdown report with the metrics table |
| `coco_results.json` | every detection in the COCO results format (the authors' `results2json`), written atomically |
| `eval_predictions.png` | the first validation images: ground truth and predictions (boxes, names, scores, masks) |
"""

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger

from ..configuration_denseclip_detection import DenseClipMaskRCNNConfig, DenseClipRetinaNetConfig
from ..file_utils import write_text_atomically
from ..image_processing_denseclip_detection import DenseClipDetectionImageProcessor
from ..modeling_denseclip_detection import DenseClipForInstanceSegmentation, DenseClipForObjectDetection
from ..visualization import save_figure
from .arguments import parse_argument_groups
from .detection_data import DetectionDataArguments
from .detection_evaluation import (
    METRIC_SUFFIXES,
    coco_metrics,
    default_iou_types,
    detection_picture,
    detection_results,
    ground_truth_of,
    predict_detections,
)
from .evaluation_job import (
    EvaluatedModelArguments,
    EvaluationOutputArguments,
    check_dataset_classes,
    default_output_dir,
    hub_commit_hash,
    load_evaluated_config,
)
from .launch import check_launch, configure_logging

logger = get_logger(__name__)

SCRIPT = "examples/evaluate_det.py"
RESULTS_NAME = "eval_results.json"
REPORT_NAME = "eval_results.md"
COCO_RESULTS_NAME = "coco_results.json"
PICTURE_NAME = "eval_predictions.png"
DETECTOR_CLASSES = {
    DenseClipRetinaNetConfig: DenseClipForObjectDetection,
    DenseClipMaskRCNNConfig: DenseClipForInstanceSegmentation,
}
METRIC_TITLES = dict(zip(METRIC_SUFFIXES, ("AP", "AP50", "AP75", "APs", "APm", "APl"), strict=True))


@dataclass
class DetectionPictureArguments:
    """The picture of predictions."""

    _argument_group_name = "picture"

    visualization_threshold: float = field(
        default=0.3, metadata={"help": "Draw the predictions scoring above it in eval_predictions.png."}
    )

    def __post_init__(self):
        if not 0 <= self.visualization_threshold < 1:
            raise ValueError(f"--visualization_threshold must be in [0, 1), got {self.visualization_threshold}.")


@dataclass
class DetectionEvaluationArguments:
    """All arguments of `examples/evaluate_det.py`, one dataclass per concern; `output_dir` defaults to
    `outputs/evaluation/<model folder name>`."""

    model: EvaluatedModelArguments
    data: DetectionDataArguments = field(default_factory=DetectionDataArguments)
    run: EvaluationOutputArguments = field(default_factory=EvaluationOutputArguments)
    picture: DetectionPictureArguments = field(default_factory=DetectionPictureArguments)

    def __post_init__(self):
        if self.run.output_dir is None:
            self.run.output_dir = default_output_dir(self.model.model_name_or_path)


def parse_detection_evaluation_args(argv: list[str] | None = None) -> DetectionEvaluationArguments:
    """Parses `argv` (default: `sys.argv[1:]`); invalid arguments exit with the usage and a clear message."""
    return parse_argument_groups(
        DetectionEvaluationArguments, "Evaluate a DenseCLIP detector (RetinaNet, Mask R-CNN) with COCO AP.", argv
    )


def load_detection_processor(model_name_or_path: str, revision: str | None) -> DenseClipDetectionImageProcessor:
    """The model's saved detection processor (the authors' test pipeline); a `ValueError` with the fix without one."""
    try:
        return DenseClipDetectionImageProcessor.from_pretrained(model_name_or_path, revision=revision)
    except OSError as error:
        raise ValueError(
            f"{model_name_or_path!r} has no preprocessor_config.json: evaluation prepares images as the model's own "
            "processor does. Save one next to the model (`DenseClipDetectionImageProcessor().save_pretrained(folder)`"
            ", the authors' 1333 x 800 test pipeline)."
        ) from error


def evaluate_detector(args: DetectionEvaluationArguments) -> dict:
    """Evaluates the detector on the validation split and writes the outputs; returns the contents of
    `eval_results.json`."""
    model_args, run_args = args.model, args.run
    config = load_evaluated_config(
        model_args.model_name_or_path,
        model_args.revision,
        tuple(DETECTOR_CLASSES),
        "detection (RetinaNet or Mask R-CNN: convert the authors' checkpoint, or train one with "
        "examples/train_det.py)",
    )
    commit_hash = hub_commit_hash(model_args.model_name_or_path, model_args.revision)
    processor = load_detection_processor(model_args.model_name_or_path, model_args.revision)
    accelerator = Accelerator(mixed_precision="bf16" if run_args.bf16 else None)
    check_launch(accelerator, SCRIPT)
    configure_logging(accelerator)
    logger.info(accelerator.state, main_process_only=False)
    with accelerator.main_process_first():
        data = args.data.load()
    check_dataset_classes(config, data.id2label, hint=" (--coco_dir, --dataset_name)")

    model = DETECTOR_CLASSES[type(config)].from_pretrained(model_args.model_name_or_path, revision=model_args.revision)
    model.to(accelerator.device).eval()
    if run_args.channels_last:
        model.to(memory_format=torch.channels_last)
    iou_types = default_iou_types(model)
    logger.info(
        f"***** Evaluating {model_args.model_name_or_path} on {len(data.validation)} images ({args.data.source}): "
        f"COCO {'/'.join(iou_types)} AP, resize {dict(processor.size)}, {run_args.per_device_eval_batch_size} images "
        f"per forward x {accelerator.num_processes} processes, precision {accelerator.mixed_precision} *****"
    )
    start_time = time.time()
    with accelerator.autocast():
        results = detection_results(
            model,
            processor,
            data.validation,
            accelerator,
            batch_size=run_args.per_device_eval_batch_size,
            category_ids=data.category_ids,
        )
    metrics = coco_metrics(
        ground_truth_of(data.validation, data.validation_annotation_file),
        results,
        iou_types,
        category_ids=data.category_ids,
        image_ids=data.validation["image_id"],
    )
    runtime = time.time() - start_time
    summary = {
        "model_name_or_path": model_args.model_name_or_path,
        "revision": model_args.revision,
        "commit_hash": commit_hash,
        "architecture": model.architecture,
        "dataset": {
            "source": args.data.source,
            "coco_dir": args.data.coco_dir,
            "dataset_name": args.data.dataset_name,
            "dataset_config_name": args.data.dataset_config_name,
            "validation_split": args.data.validation_split,
            "annotation_file": data.validation_annotation_file,
            "max_eval_samples": args.data.max_eval_samples,
        },
        "eval_samples": len(data.validation),
        "protocol": {
            "resize": dict(processor.size),
            "size_divisor": processor.size_divisor,
            "images_per_forward": run_args.per_device_eval_batch_size,
            "score_threshold": config.score_threshold,
            "nms_iou_threshold": config.nms_iou_threshold,
            "max_detections": config.max_detections,
            "iou_types": list(iou_types),
            "evaluator": "pycocotools COCOeval",
        },
        "mixed_precision": accelerator.mixed_precision,
        "channels_last": run_args.channels_last,
        "num_processes": accelerator.num_processes,
        "num_detections": len(results),
        **{f"eval_{name}": value for name, value in metrics.items()},
        "eval_runtime_seconds": round(runtime, 2),
    }
    logger.info(f"COCO AP ({len(data.validation)} images):\n{format_detection_metrics(metrics)}")
    if accelerator.is_main_process:
        _write_outputs(summary, metrics, results, model, processor, data, args, accelerator)
    accelerator.wait_for_everyone()
    return summary


def format_detection_metrics(metrics: dict[str, float]) -> str:
    """A Markdown table of COCO AP in percent, one row per IoU type: `| bbox | 37.8 | 58.0 | ... |`."""
    iou_types = [name.removesuffix("_mAP") for name in metrics if name.endswith("_mAP")]
    lines = [
        "| IoU type | " + " | ".join(METRIC_TITLES.values()) + " |",
        "|---|" + "---|" * len(METRIC_TITLES),
    ]
    for iou_type in iou_types:
        values = [metrics[f"{iou_type}_{suffix}"] for suffix in METRIC_SUFFIXES]
        lines.append(f"| {iou_type} | " + " | ".join("-" if v < 0 else f"{100 * v:.1f}" for v in values) + " |")
    return "\n".join(lines)


def _write_outputs(summary, metrics, results, model, processor, data, args, accelerator) -> None:
    """Writes `eval_results.json`, `eval_results.md`, `coco_results.json` and (with `--num_visualized_images`)
    `eval_predictions.png`."""
    output_dir = Path(args.run.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomically(output_dir / COCO_RESULTS_NAME, json.dumps(results))
    write_text_atomically(output_dir / RESULTS_NAME, json.dumps(summary, indent=2) + "\n")
    report = [
        f"# COCO evaluation of `{summary['model_name_or_path']}`",
        "",
        f"- revision: {summary['revision'] or 'default'}",
        f"- dataset: {summary['dataset']['source']} ({summary['eval_samples']} validation images)",
        f"- protocol: the authors' test (resize {summary['protocol']['resize']}, score threshold "
        f"{summary['protocol']['score_threshold']}, at most {summary['protocol']['max_detections']} detections per "
        f"image), {summary['protocol']['images_per_forward']} image(s) per forward; pycocotools COCOeval",
        f"- precision: {summary['mixed_precision']}; {summary['num_detections']} detections in {COCO_RESULTS_NAME}",
        "",
        format_detection_metrics(metrics),
        "",
    ]
    write_text_atomically(output_dir / REPORT_NAME, "\n".join(report))
    count = min(args.run.num_visualized_images, len(data.validation))
    if count:
        examples = list(data.validation.select(range(count)))
        with accelerator.autocast():
            detections = predict_detections(model, processor, [example["image"] for example in examples])
        picture = detection_picture(examples, detections, model.config, args.picture.visualization_threshold)
        save_figure(picture, output_dir / PICTURE_NAME)
    logger.info(f"Wrote the results to {output_dir}")


__all__ = [
    "DetectionEvaluationArguments",
    "DetectionPictureArguments",
    "evaluate_detector",
    "format_detection_metrics",
    "load_detection_processor",
    "parse_detection_evaluation_args",
]
