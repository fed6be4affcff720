"""COCO evaluation of the DenseCLIP detectors: the authors' test path on a dataset, results in the COCO results format
their code writes, and `pycocotools`' COCO AP.

[`detection_results`] runs the authors' test (the processor's pipeline, the model's post-processing, every final
detection: `threshold=0.0`) on each image of a dataset (the features of `detection_features`), spread over the
processes of an `Accelerator`, and returns what the authors' `results2json` writes: per detection `{"image_id",
"category_id" (the dataset's id of the class), "bbox": [x, y, w, h], "score"}`, plus `"segmentation"` (compressed RLE,
counts as str) for Mask R-CNN. [`coco_metrics`] scores results with `pycocotools`' `COCOeval` against a COCO
ground truth (a json dict, e.g. COCO's own annotation file, or one built from the dataset by [`coco_ground_truth`]).
[`evaluate_detection`] does both: the validation of a training run and `examples/evaluate_det.py` call it.

Processes: process `p` of `n` takes images `p, p + n, p + 2n, ...` (no padding, so each image is run exactly once, also
when the count does not divide), and one `gather_object` at the end gives every process all results, in dataset order.
The model's own methods run (not a DDP forward, whose collectives would need equal call counts), after every process
took the main process's buffers (`share_main_process_buffers`).

Metric names are mmdet's (`CocoDataset.evaluate`): `{iou_type}_mAP`, `_mAP_50`, `_mAP_75`, `_mAP_s`, `_mAP_m`,
`_mAP_l` for `iou_type` in `bbox`, `segm` (`COCOeval.stats[0:6]`: AP at IoU 0.50:0.95, 0.50, 0.75, and for small,
medium, large objects), as fractions in [0, 1] (-1 where the ground truth has no object of that size). As mmdet does,
segm results are scored without their `bbox`, so that COCO takes each detection's area from its mask. `COCOeval`'s
default `maxDets` (1, 10, 100) are kept: mmdet's (100, 300, 1000) give the same AP as long as no image has more than
100 detections (the models' `max_detections` is 100).
"""

import contextlib
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import extract_model_from_parallel, gather_object
from datasets import Dataset
from PIL import Image
from tqdm.auto import tqdm

from ..image_processing_denseclip_detection import DenseClipDetectionImageProcessor
from ..modeling_denseclip_detection import DenseClipForInstanceSegmentation
from ..synthetic import encode_mask
from ..visualization import detection_grid, palette_for
from .evaluation import share_main_process_buffers

IOU_TYPES = ("bbox", "segm")
METRIC_SUFFIXES = ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l")


def predicts_masks(model: torch.nn.Module) -> bool:
    """Whether `model` (possibly wrapped by Accelerate) is a Mask R-CNN, whose results carry masks."""
    return isinstance(extract_model_from_parallel(model), DenseClipForInstanceSegmentation)


def default_iou_types(model: torch.nn.Module) -> tuple[str, ...]:
    """`("bbox", "segm")` for Mask R-CNN, `("bbox",)` for RetinaNet (the authors' `--eval bbox [segm]`)."""
    return IOU_TYPES if predicts_masks(model) else IOU_TYPES[:1]


@torch.no_grad()
def predict_detections(
    model: torch.nn.Module, processor: DenseClipDetectionImageProcessor, images: Sequence[Any]
) -> list[dict[str, torch.Tensor]]:
    """The authors' final detections of `images` (one forward for the batch; the processor pads the images to the
    largest, so only a batch of one is exactly the authors' test, which runs one image per GPU).

    Returns:
        Per image, on the CPU, in the original image's frame, by decreasing score: `"boxes"` `(n, 4)` float32
        `(x1, y1, x2, y2)`, `"scores"` `(n,)`, `"labels"` `(n,)` int64 (contiguous class indices) and, for Mask R-CNN,
        `"masks"` `(n, height, width)` bool (each pasted at the mask threshold, overlaps allowed).
    """
    detector = extract_model_from_parallel(model)
    device = next(detector.parameters()).device
    inputs = processor(images=list(images), return_tensors="pt").to(device)
    was_training = detector.training
    detector.eval()
    outputs = detector(**inputs)
    detector.train(was_training)
    detections = processor.post_process_object_detection(outputs, threshold=0.0)
    if predicts_masks(detector):
        pasted = processor.post_process_instance_segmentation(outputs, threshold=0.0, return_binary_maps=True)
        for detection, instances in zip(detections, pasted, strict=True):
            detection["masks"] = instances["segmentation"]
    return [{name: value.cpu() for name, value in detection.items()} for detection in detections]


def to_coco_results(
    detection: dict[str, torch.Tensor], image_id: int, category_ids: Sequence[int] | None = None
) -> list[dict[str, Any]]:
    """One image's detections ([`predict_detections`]) -> COCO results as the authors' `results2json` writes them:
    `bbox` `[x1, y1, x2 - x1, y2 - y1]` (the float32 coordinates as Python floats, differences in float64, no +1),
    `score`, `category_id` = `category_ids[label]` (the label itself without `category_ids`) and, with masks,
    `segmentation` = `pycocotools.mask.encode` of the mask with counts decoded to str (the segm score is the box's)."""
    results = []
    masks = detection.get("masks")
    for index, (box, score, label) in enumerate(
        zip(detection["boxes"].tolist(), detection["scores"].tolist(), detection["labels"].tolist(), strict=True)
    ):
        x1, y1, x2, y2 = box
        result = {
            "image_id": int(image_id),
            "category_id": int(label if category_ids is None else category_ids[label]),
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "score": float(score),
        }
        if masks is not None:
            result["segmentation"] = encode_mask(masks[index].numpy())
        results.append(result)
    return results


def detection_results(
    model: torch.nn.Module,
    processor: DenseClipDetectionImageProcessor,
    dataset: Dataset,
    accelerator: Accelerator,
    batch_size: int = 1,
    progress: bool = True,
    category_ids: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """COCO results of `model` on every image of `dataset` (columns `image`, `image_id`), on every process.

    Each process runs its share of the images ([`predict_detections`], `batch_size` images per forward; 1 is the
    authors' test), and the results of all processes are gathered: every process returns the same list, every image's
    detections exactly once, in dataset order ([`to_coco_results`]; `category_ids[label]` is the dataset's id of each
    class, see `DetectionData.category_ids`). With `progress`, the local main process shows a progress bar. The model
    is left in the mode it came in; run it under `accelerator.autocast()` for mixed precision.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    share_main_process_buffers(model, accelerator)
    images = dataset.select_columns(["image", "image_id"])
    indices = list(range(accelerator.process_index, len(images), accelerator.num_processes))
    batches = [indices[start : start + batch_size] for start in range(0, len(indices), batch_size)]
    local = []
    bar = tqdm(batches, desc="evaluation", disable=not (progress and accelerator.is_local_main_process))
    for batch in bar:
        examples = images[batch]
        detections = predict_detections(model, processor, examples["image"])
        for index, image_id, detection in zip(batch, examples["image_id"], detections, strict=True):
            local.append((index, to_coco_results(detection, image_id, category_ids)))
    gathered = sorted(gather_object(local) if accelerator.num_processes > 1 else local, key=lambda item: item[0])
    if [index for index, _ in gathered] != list(range(len(images))):
        raise RuntimeError(f"Gathered the results of {len(gathered)} images for a dataset of {len(images)}.")
    return [result for _, image_results in gathered for result in image_results]


def coco_ground_truth(dataset: Dataset, category_ids: Sequence[int] | None = None) -> dict[str, Any]:
    """A COCO instances json dict of `dataset` (the features of `detection_features`), for `COCOeval`: its images
    (`id`, `width`, `height`), every object (crowd flags, degenerate and out-of-image boxes kept, as a COCO json holds
    them; `category_id` = `category_ids[label]`, ids renumbered 1..N because `COCOeval` needs unique non-zero
    annotation ids; masks as RLE where the dataset has them) and the categories named by the dataset's `ClassLabel`."""
    names = dataset.features["objects"]["category"].feature.names
    category_ids = list(range(len(names))) if category_ids is None else list(category_ids)
    if len(category_ids) != len(names):
        raise ValueError(f"Got {len(category_ids)} category ids for the dataset's {len(names)} classes.")
    images, annotations = [], []
    columns = dataset.select_columns(["image_id", "width", "height", "objects"])
    for example in columns:
        images.append({"id": example["image_id"], "width": example["width"], "height": example["height"]})
        objects = example["objects"]
        for index, (box, label) in enumerate(zip(objects["bbox"], objects["category"], strict=True)):
            annotation = {
                "id": len(annotations) + 1,
                "image_id": example["image_id"],
                "category_id": category_ids[label],
                "bbox": [float(value) for value in box],
                "area": float(objects["area"][index]),
                "iscrowd": int(objects["iscrowd"][index]),
            }
            if objects["segmentation"][index] is not None:
                annotation["segmentation"] = dict(objects["segmentation"][index])
            annotations.append(annotation)
    categories = [{"id": category_id, "name": name} for category_id, name in zip(category_ids, names, strict=True)]
    return {"images": images, "annotations": annotations, "categories": categories}


def _coco(content: dict[str, Any]):
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = content
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_metrics(
    ground_truth: Dataset | dict[str, Any],
    results: list[dict[str, Any]],
    iou_types: Sequence[str] = ("bbox",),
    category_ids: Sequence[int] | None = None,
    image_ids: Sequence[int] | None = None,
) -> dict[str, float]:
    """COCO AP of `results` (the COCO results format, [`detection_results`]) by `pycocotools`' `COCOeval`.

    Args:
        ground_truth: A COCO instances json dict (`images`, `annotations`, `categories`: e.g. COCO's
            `instances_val2017.json`, read), or a dataset with the features of `detection_features`, made into one by
            [`coco_ground_truth`] with `category_ids`.
        results: Detections with `image_id`, `category_id` (the ground truth's ids), `bbox` `[x, y, w, h]`, `score`
            and, for `segm`, `segmentation` (RLE). An empty list scores 0 (no detection found anything).
        iou_types: Any of `"bbox"`, `"segm"`.
        category_ids: The dataset's id of each class, for a dataset `ground_truth`.
        image_ids: The images to score (`COCOeval.params.imgIds`); default every image of the ground truth. Pass the
            evaluated images when the json holds more (e.g. a part of COCO val2017).

    Returns:
        `{f"{iou_type}_{suffix}": float}` for the suffixes `mAP`, `mAP_50`, `mAP_75`, `mAP_s`, `mAP_m`, `mAP_l` (see
        the module docstring).
    """
    from pycocotools.cocoeval import COCOeval

    unknown = [iou_type for iou_type in iou_types if iou_type not in IOU_TYPES]
    if unknown or not iou_types:
        raise ValueError(f"iou_types must be a non-empty selection of {list(IOU_TYPES)}, got {list(iou_types)}.")
    content = coco_ground_truth(ground_truth, category_ids) if isinstance(ground_truth, Dataset) else ground_truth
    if "segm" in iou_types and any("segmentation" not in annotation for annotation in content["annotations"]):
        raise ValueError(
            "segm evaluation needs a mask (segmentation) for every ground-truth object; this ground truth has objects "
            "without one: evaluate iou_types=('bbox',)."
        )
    ground = _coco(content)
    evaluated = sorted(ground.getImgIds()) if image_ids is None else sorted(int(i) for i in image_ids)
    metrics = {}
    for iou_type in iou_types:
        # mmdet scores segm without the boxes (COCO then takes each detection's area from its mask).
        dropped = "segmentation" if iou_type == "bbox" else "bbox"
        detections = [{key: value for key, value in result.items() if key != dropped} for result in results]
        if iou_type == "segm" and any("segmentation" not in detection for detection in detections):
            raise ValueError("segm evaluation needs results with a 'segmentation' (RLE): evaluate a Mask R-CNN.")
        with contextlib.redirect_stdout(io.StringIO()):
            predicted = ground.loadRes(detections) if detections else _coco({**content, "annotations": []})
            evaluation = COCOeval(ground, predicted, iou_type)
            evaluation.params.imgIds = evaluated
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
        for suffix, value in zip(METRIC_SUFFIXES, evaluation.stats[:6], strict=True):
            metrics[f"{iou_type}_{suffix}"] = float(value)
    return metrics


def evaluate_detection(
    model: torch.nn.Module,
    processor: DenseClipDetectionImageProcessor,
    dataset: Dataset,
    category_ids: Sequence[int],
    accelerator: Accelerator,
    batch_size: int = 1,
    progress: bool = True,
    iou_types: Sequence[str] | None = None,
    annotation_file: str | os.PathLike | None = None,
) -> dict[str, float]:
    """COCO AP of `model` on `dataset` on every process: [`detection_results`] scored by [`coco_metrics`] (`iou_types`
    default: [`default_iou_types`]) against `annotation_file` (the COCO json the dataset came from,
    `DetectionData.validation_annotation_file`: the authors' ground truth) or else the dataset itself."""
    results = detection_results(model, processor, dataset, accelerator, batch_size, progress, category_ids)
    return coco_metrics(
        ground_truth_of(dataset, annotation_file),
        results,
        default_iou_types(model) if iou_types is None else iou_types,
        category_ids=category_ids,
        image_ids=dataset["image_id"],
    )


def ground_truth_of(dataset: Dataset, annotation_file: str | os.PathLike | None) -> Dataset | dict[str, Any]:
    """What [`coco_metrics`] scores against: the read `annotation_file` when the dataset came from one, else the
    dataset."""
    return dataset if annotation_file is None else json.loads(Path(annotation_file).read_text())


def _above(detection: dict, threshold: float) -> dict:
    keep = detection["scores"] > threshold
    return {name: value[keep] for name, value in detection.items()}


def _ground_truth_drawing(example: dict) -> dict:
    """An example's objects as `draw_detections` takes them: boxes `(x1, y1, x2, y2)`, labels, decoded masks."""
    from pycocotools import mask as mask_utils

    objects = example["objects"]
    boxes = [[x, y, x + w, y + h] for x, y, w, h in objects["bbox"]]
    segmentations = objects["segmentation"]
    masks = None
    if segmentations and all(segmentation is not None for segmentation in segmentations):
        masks = [mask_utils.decode(dict(segmentation)) for segmentation in segmentations]
    return {"boxes": boxes, "labels": objects["category"], "masks": masks}


def detection_picture(
    examples: Sequence[dict], detections: Sequence[dict], config: Any, threshold: float
) -> Image.Image:
    """The prediction picture of the evaluation job and of training runs: each example's image with its ground truth
    beside the detections scoring above `threshold` (`predict_detections`' outputs), in the model's class colours."""
    return detection_grid(
        [example["image"] for example in examples],
        [_above(detection, threshold) for detection in detections],
        config.id2label,
        ground_truths=[_ground_truth_drawing(example) for example in examples],
        palette=palette_for(config),
    )


__all__ = [
    "detection_picture",
    "IOU_TYPES",
    "coco_ground_truth",
    "coco_metrics",
    "default_iou_types",
    "detection_results",
    "evaluate_detection",
    "ground_truth_of",
    "predict_detections",
    "predicts_masks",
    "to_coco_results",
]
