"""Object detection and instance segmentation data: COCO folders, Hub datasets in COCO format, the synthetic default.

Every source becomes a `datasets.Dataset` with the features of [`detection_features`] (those of the Hub's COCO-style
detection datasets: `image`, `image_id`, `width`, `height`, `objects` with `id`, `bbox` `[x, y, w, h]`, `category`
(contiguous class index), `area`, `iscrowd` and `segmentation` as compressed RLE), plus the class names and the
dataset's category id of each class (for results files in the dataset's own ids, e.g. COCO's sparse 1..90).
[`coco_annotations`] turns an example into the detection image processor's `annotations=` argument, for training and
evaluation alike.

Bad annotations are handled as the authors' loader (mmdet 2.x `CocoDataset`) does, except where it would hide a broken
file:

- a box partly outside the image: kept; training clips it to the image (the processor), as mmdet.
- a box without overlap with the image, `w < 1`, `h < 1` or `area <= 0`: kept in the data (evaluation scores against
  it, as COCO's json does); training skips it (the processor), as mmdet's `_parse_ann_info`.
- `iscrowd` 1: kept; COCO evaluation ignores the detections it covers; training skips it (mmdet makes it
  `gt_bboxes_ignore`, which the configs' assigners do not use).
- a training image without any annotation (crowd and degenerate ones count, as in mmdet), or with a side under 32
  pixels: dropped from the training split (mmdet's `filter_empty_gt`, `min_size=32`); validation keeps every image.
- a `category_id` that is not among the json's `categories`: `ValueError` (mmdet skips it silently; it is a broken
  file).
- a missing image file: `ValueError` naming it, before any work (mmdet fails when it reads the image).
- an annotation of an unknown `image_id`, a bbox that is not 4 finite numbers, `iscrowd` other than 0 / 1:
  `ValueError`.
"""

import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, load_dataset
from datasets import Image as ImageFeature
from PIL import Image

from ..convert_denseclip_original_to_hf import COCO_CLASS_NAMES
from ..synthetic import detection_features, load_synthetic_dataset

# COCO's category ids of `COCO_CLASS_NAMES` (mmdet's `CocoDataset.cat_ids`: sorted, 80 of 1..90).
COCO_CATEGORY_IDS = (
    *range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70, *range(72, 83), *range(84, 91),
)  # fmt: skip
# mmdet `CocoDataset._filter_imgs(min_size=32)`: training images with a shorter side are dropped.
MIN_TRAINING_IMAGE_SIDE = 32
# A COCO folder's image folder and annotation file per split name (`{name}/`, `annotations/instances_{name}.json`);
# other split names are used as they are (e.g. `val2014`).
COCO_SPLIT_NAMES = {"train": "train2017", "validation": "val2017"}


@dataclass
class DetectionData:
    """Training and validation splits (the features of [`detection_features`]), the class names by contiguous label,
    and the dataset's category id of each label (`category_ids[i]` is label `i`'s id in the dataset's own numbering,
    what results files and COCO evaluation use).

    `validation_annotation_file` is the COCO json of the validation split when it came from a COCO folder: evaluation
    scores against that file itself, exactly as the authors' `CocoDataset.evaluate` does; `None` otherwise (the ground
    truth is then built from the examples, [`coco_ground_truth`]).
    """

    train: Dataset | None
    validation: Dataset
    id2label: dict[int, str]
    category_ids: list[int]
    validation_annotation_file: str | None = None


# ---------------------------------------------------------------------------------------------------------------------
# Annotations
# ---------------------------------------------------------------------------------------------------------------------


def _to_rle(segmentation: Any, height: int, width: int, where: str) -> dict | None:
    """COCO polygons, uncompressed or compressed RLE -> compressed RLE `{"size", "counts": str}` (COCO's `annToRLE`:
    polygons merged into one mask); `None` or `[]` -> `None` (no mask)."""
    from pycocotools import mask as mask_utils

    if segmentation is None or (isinstance(segmentation, (list, tuple)) and len(segmentation) == 0):
        return None
    if isinstance(segmentation, (list, tuple)):
        if not all(
            isinstance(polygon, (list, tuple)) and len(polygon) >= 6 and len(polygon) % 2 == 0
            for polygon in segmentation
        ):
            raise ValueError(
                f"{where} has segmentation {segmentation!r:.120}: polygons must be flat lists [x1, y1, x2, y2, ...] "
                "of at least 3 points."
            )
        rle = mask_utils.merge(mask_utils.frPyObjects([[float(v) for v in p] for p in segmentation], height, width))
    elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        if [int(side) for side in segmentation["size"]] != [height, width]:
            raise ValueError(
                f"{where} has an RLE of size {list(segmentation['size'])} on an image of (height, width) "
                f"{[height, width]}: the RLE must cover the whole image."
            )
        counts = segmentation["counts"]
        if isinstance(counts, (list, tuple)):
            rle = mask_utils.frPyObjects({"size": [height, width], "counts": list(counts)}, height, width)
        else:
            return {"size": [height, width], "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}
    else:
        raise ValueError(
            f"{where} has segmentation {segmentation!r:.120}: expected polygons [[x1, y1, ...], ...] or an RLE dict "
            '{"size": [height, width], "counts": ...}.'
        )
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


def _check_box(bbox: Any, where: str) -> list[float]:
    if not isinstance(bbox, (list, tuple, np.ndarray)) or len(bbox) != 4:
        raise ValueError(f"{where} has bbox {bbox!r}: expected [x, y, width, height] (COCO format), 4 numbers.")
    values = [float(value) for value in bbox]
    if not all(math.isfinite(value) for value in values):
        raise ValueError(f"{where} has bbox {bbox!r} with a non-finite value: expected 4 finite numbers.")
    return values


def _check_crowd(iscrowd: Any, where: str) -> int:
    if iscrowd not in (0, 1):
        raise ValueError(f"{where} has iscrowd {iscrowd!r}: expected 0 or 1.")
    return int(iscrowd)


def coco_annotations(example: dict) -> dict[str, Any]:
    """One example (the features of [`detection_features`]) -> the detection image processor's `annotations=` entry:
    `{"image_id": int, "annotations": [{"id", "bbox": [x, y, w, h], "category_id": contiguous label, "area",
    "iscrowd", "segmentation" (RLE, only for objects with a mask)}, ...]}`, every object as stored. The processor skips
    what training must not learn from (crowd regions, boxes without overlap with the image, `w < 1`, `h < 1`,
    `area <= 0`; see the module docstring)."""
    objects = example["objects"]
    annotations = []
    for index in range(len(objects["bbox"])):
        annotation = {
            "id": int(objects["id"][index]),
            "bbox": [float(value) for value in objects["bbox"][index]],
            "category_id": int(objects["category"][index]),
            "area": float(objects["area"][index]),
            "iscrowd": int(objects["iscrowd"][index]),
        }
        segmentation = objects["segmentation"][index]
        if segmentation is not None:
            annotation["segmentation"] = {"size": list(segmentation["size"]), "counts": segmentation["counts"]}
        annotations.append(annotation)
    return {"image_id": int(example["image_id"]), "annotations": annotations}


# ---------------------------------------------------------------------------------------------------------------------
# COCO folders
# ---------------------------------------------------------------------------------------------------------------------


def _coco_split_paths(coco_dir: Path, split: str) -> tuple[Path, Path]:
    name = COCO_SPLIT_NAMES.get(split, split)
    return coco_dir / name, coco_dir / "annotations" / f"instances_{name}.json"


def _read_json(path: Path) -> dict:
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}): expected a COCO annotation file.") from error
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(content.get(key), list)]
    if missing:
        raise ValueError(f"{path} has no {missing} list(s): expected a COCO instances file.")
    return content


def coco_categories(annotation_file: str | os.PathLike) -> tuple[list[int], list[str]]:
    """The category ids of a COCO instances json, sorted (mmdet's contiguous label order), and their names."""
    categories = sorted(_read_json(Path(annotation_file))["categories"], key=lambda category: category["id"])
    return [int(category["id"]) for category in categories], [str(category["name"]) for category in categories]


def load_coco_split(
    image_dir: str | os.PathLike, annotation_file: str | os.PathLike, category_ids: list[int], class_names: list[str]
) -> Dataset:
    """One split of a COCO folder (`image_dir` + its instances json) as a `Dataset` of [`detection_features`] with
    classes `class_names`, every image of the json in its order, images decoded lazily from the files.

    COCO category id `category_ids[i]` becomes label `i`; masks become compressed RLE. `ValueError`s: a missing image
    file, an annotation whose `image_id` is not an image of the json or whose `category_id` is not one of
    `category_ids`, a bbox that is not 4 finite numbers, `iscrowd` other than 0 / 1 (see the module docstring).
    """
    image_dir, annotation_file = Path(image_dir), Path(annotation_file)
    content = _read_json(annotation_file)
    label_of = {category_id: label for label, category_id in enumerate(category_ids)}
    images = content["images"]
    per_image: dict[int, list[dict]] = {int(image["id"]): [] for image in images}
    for number, annotation in enumerate(content["annotations"]):
        where = f"Annotation {number} (id {annotation.get('id')}) of {annotation_file}"
        if annotation.get("image_id") not in per_image:
            raise ValueError(f"{where} refers to image_id {annotation.get('image_id')!r}, which is not in 'images'.")
        if annotation.get("category_id") not in label_of:
            raise ValueError(
                f"{where} has category_id {annotation.get('category_id')!r}, which is not one of the file's "
                f"categories {sorted(label_of)}: fix the annotation or add the category to 'categories'."
            )
        per_image[annotation["image_id"]].append(annotation)
    paths = [image_dir / image["file_name"] for image in images]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise ValueError(
            f"{len(missing)} of the {len(paths)} images listed in {annotation_file} are missing (e.g. {missing[0]}): "
            f"put every image file into {image_dir}, or remove the missing ones from the json."
        )
    rows = []
    for image, path in zip(images, paths, strict=True):
        height, width = int(image["height"]), int(image["width"])
        objects = {name: [] for name in ("id", "bbox", "category", "area", "iscrowd", "segmentation")}
        for annotation in per_image[int(image["id"])]:
            where = f"Annotation {annotation.get('id')} of image {image['id']} in {annotation_file}"
            objects["id"].append(int(annotation.get("id", len(objects["id"]))))
            objects["bbox"].append(_check_box(annotation.get("bbox"), where))
            objects["category"].append(label_of[annotation["category_id"]])
            box_area = objects["bbox"][-1][2] * objects["bbox"][-1][3]
            objects["area"].append(float(annotation.get("area", box_area)))
            objects["iscrowd"].append(_check_crowd(annotation.get("iscrowd", 0), where))
            objects["segmentation"].append(_to_rle(annotation.get("segmentation"), height, width, where))
        rows.append({"image": str(path), "image_id": int(image["id"]), "width": width, "height": height})
        rows[-1]["objects"] = objects
    columns = {name: [row[name] for row in rows] for name in ("image", "image_id", "width", "height", "objects")}
    return Dataset.from_dict(columns, features=detection_features(class_names))


def _load_coco_folder(
    coco_dir: str | os.PathLike, train_split: str | None, validation_split: str
) -> tuple[Dataset | None, Dataset, list[int], list[str], str]:
    coco_dir = Path(coco_dir)
    validation_images, validation_file = _coco_split_paths(coco_dir, validation_split)
    if not validation_file.is_file():
        raise ValueError(
            f"{coco_dir} has no {validation_file.relative_to(coco_dir)}: a COCO folder holds "
            f"{validation_images.name}/ and annotations/{validation_file.name} (and optionally the training split)."
        )
    category_ids, class_names = coco_categories(validation_file)
    validation = load_coco_split(validation_images, validation_file, category_ids, class_names)
    train = None
    if train_split is None:
        return train, validation, category_ids, class_names, str(validation_file)
    train_images, train_file = _coco_split_paths(coco_dir, train_split)
    if train_file.is_file():
        train_ids, train_names = coco_categories(train_file)
        if train_ids != category_ids:
            raise ValueError(f"{train_file} and {validation_file} list different categories: use one COCO release.")
        train = load_coco_split(train_images, train_file, category_ids, train_names)
    return train, validation, category_ids, class_names, str(validation_file)


# ---------------------------------------------------------------------------------------------------------------------
# Hub datasets
# ---------------------------------------------------------------------------------------------------------------------


def _category_feature(dataset: Dataset) -> ClassLabel:
    objects = dataset.features.get("objects")
    category = objects.get("category") if isinstance(objects, dict) else None
    feature = getattr(category, "feature", None)
    if not isinstance(feature, ClassLabel):
        raise ValueError(
            f"The dataset's features {dataset.features} have no objects.category ClassLabel: a detection dataset in "
            "COCO format has an 'objects' column of per-object lists with 'bbox' ([x, y, w, h] pixels) and "
            "'category' (a ClassLabel with the class names); cast yours with `dataset.cast_column`."
        )
    return feature


def _normalize_hub_split(dataset: Dataset, class_names: list[str]) -> Dataset:
    """A Hub split with `image` and `objects` (`bbox`, `category` at least) -> the features of
    [`detection_features`]: a missing `image_id` is the row index, missing `width` / `height` are read from the image
    header, missing `id` count within the image, `area` defaults to the box's, `iscrowd` to 0, `segmentation` to none
    (polygons and RLE become compressed RLE)."""
    missing = [column for column in ("image", "objects") if column not in dataset.column_names]
    if missing:
        raise ValueError(f"The dataset has no {missing} column(s) (columns: {dataset.column_names}).")
    has_sizes = "width" in dataset.column_names and "height" in dataset.column_names

    def normalize(example: dict, index: int) -> dict:
        image_id = int(example["image_id"]) if "image_id" in example else index
        if has_sizes:
            width, height = int(example["width"]), int(example["height"])
        else:
            image = example["image"]
            source = image["bytes"] if image.get("bytes") is not None else image["path"]
            with Image.open(source if isinstance(source, str) else io.BytesIO(source)) as opened:
                width, height = opened.size
        objects = example["objects"]
        count = len(objects["bbox"])
        where = [f"Object {number} of image {image_id}" for number in range(count)]
        boxes = [_check_box(box, place) for box, place in zip(objects["bbox"], where, strict=True)]
        segmentations = objects.get("segmentation") or [None] * count
        return {
            "image_id": image_id,
            "width": width,
            "height": height,
            "objects": {
                "id": [int(value) for value in objects["id"]] if "id" in objects else list(range(count)),
                "bbox": boxes,
                "category": [int(value) for value in objects["category"]],
                "area": [float(v) for v in objects["area"]] if "area" in objects else [b[2] * b[3] for b in boxes],
                "iscrowd": [
                    _check_crowd(value, place)
                    for value, place in zip(objects.get("iscrowd") or [0] * count, where, strict=True)
                ],
                "segmentation": [
                    _to_rle(segmentation, height, width, place)
                    for segmentation, place in zip(segmentations, where, strict=True)
                ],
            },
        }

    features = detection_features(class_names)
    undecoded = dataset.cast_column("image", ImageFeature(decode=False))
    extra = [column for column in dataset.column_names if column not in features]
    normalized = undecoded.map(normalize, with_indices=True, remove_columns=extra, features=features)
    return normalized.select_columns(list(features))


def _load_hub_dataset(
    dataset_name: str,
    dataset_config_name: str | None,
    train_split: str | None,
    validation_split: str,
    cache_dir: str | None,
) -> tuple[Dataset | None, Dataset, list[int], list[str]]:
    dataset = load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir)
    if not isinstance(dataset, DatasetDict) or validation_split not in dataset:
        splits = list(dataset) if isinstance(dataset, DatasetDict) else []
        raise ValueError(
            f"{dataset_name} has no {validation_split!r} split (splits: {splits}): pass --validation_split."
        )
    class_names = list(_category_feature(dataset[validation_split]).names)
    validation = _normalize_hub_split(dataset[validation_split], class_names)
    train = None
    if train_split is not None and train_split in dataset:
        if list(_category_feature(dataset[train_split]).names) != class_names:
            raise ValueError(f"The {train_split!r} and {validation_split!r} splits of {dataset_name} name different "
                             "classes.")  # fmt: skip
        train = _normalize_hub_split(dataset[train_split], class_names)
    return train, validation, default_category_ids(class_names), class_names


def default_category_ids(class_names: list[str]) -> list[int]:
    """The category id of each class of a dataset that stores only contiguous labels: COCO's ids for COCO's 80 classes
    in mmdet's order (so that results files use COCO's numbering), else the label itself."""
    if tuple(class_names) == COCO_CLASS_NAMES:
        return list(COCO_CATEGORY_IDS)
    return list(range(len(class_names)))


# ---------------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class DetectionDataArguments:
    """The detection dataset: a COCO folder, a Hub dataset in COCO format or (neither given) the synthetic scenes."""

    _argument_group_name = "data"

    coco_dir: str | None = field(
        default=None,
        metadata={"help": "A COCO folder: val2017/ + annotations/instances_val2017.json (and train2017/ + "
        "annotations/instances_train2017.json for training)."},
    )  # fmt: skip
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "A Hub dataset in COCO format: image, objects with bbox ([x, y, w, h] pixels) and category "
        "(ClassLabel)."},
    )  # fmt: skip
    dataset_config_name: str | None = field(default=None, metadata={"help": "The Hub dataset's configuration."})
    train_split: str = field(
        default="train", metadata={"help": "The training split (a COCO folder: train = train2017, else its name)."}
    )
    validation_split: str = field(
        default="validation",
        metadata={"help": "The validation split (a COCO folder: validation = val2017, else its name, e.g. val2014)."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep the first N validation examples."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where to cache Hub datasets."})

    def __post_init__(self):
        if self.coco_dir is not None and self.dataset_name is not None:
            raise ValueError("Pass either --coco_dir or --dataset_name, not both.")
        if self.coco_dir is not None and not Path(self.coco_dir).is_dir():
            raise ValueError(f"--coco_dir {self.coco_dir} is not a folder.")
        for name in ("max_train_samples", "max_eval_samples"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"--{name} must be > 0, got {getattr(self, name)}.")

    @property
    def source(self) -> str:
        """`"coco"`, `"hub"` or `"synthetic"`."""
        return "coco" if self.coco_dir else "hub" if self.dataset_name else "synthetic"

    def load(self, with_training_split: bool = True) -> DetectionData:
        """The data (see [`load_detection_data`]); without `with_training_split`, only the validation split."""
        return load_detection_data(
            coco_dir=self.coco_dir,
            dataset_name=self.dataset_name,
            dataset_config_name=self.dataset_config_name,
            train_split=self.train_split if with_training_split else None,
            validation_split=self.validation_split,
            max_train_samples=self.max_train_samples,
            max_eval_samples=self.max_eval_samples,
            cache_dir=self.cache_dir,
        )


def training_examples(dataset: Dataset) -> Dataset:
    """The examples training learns from (mmdet's `_filter_imgs`): those with at least one annotation (of any kind,
    crowd and degenerate ones included, as mmdet counts them) and both sides at least `MIN_TRAINING_IMAGE_SIDE`."""
    return dataset.filter(
        lambda objects, width, height: len(objects["bbox"]) > 0 and min(width, height) >= MIN_TRAINING_IMAGE_SIDE,
        input_columns=["objects", "width", "height"],
    )


def load_detection_data(
    coco_dir: str | os.PathLike | None = None,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_split: str | None = "train",
    validation_split: str = "validation",
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    cache_dir: str | None = None,
) -> DetectionData:
    """Loads detection data with the features of [`detection_features`].

    Sources (one at most; with none, the synthetic scenes, `load_synthetic_dataset(..., task="detection")`):
    - `coco_dir`: a COCO folder, `val2017/` + `annotations/instances_val2017.json` and optionally `train2017/` +
      `annotations/instances_train2017.json` (split names `"train"` / `"validation"` mean `train2017` / `val2017`;
      others, e.g. `"val2014"`, are used as they are). Classes: the json's categories sorted by id (mmdet's order),
      named as in the json; `category_ids` are COCO's ids. Without a training json, `train` is `None`.
    - `dataset_name`: a Hub dataset (or a local dataset folder, what `datasets.load_dataset` takes) with an `image`
      column and an `objects` column of per-object lists with `bbox` in COCO's `[x, y, w, h]` pixels and `category`
      (a `ClassLabel`); other fields are optional (see `_normalize_hub_split`). `category_ids` are COCO's for COCO's
      80 classes, else the labels. Without the training split, `train` is `None`.

    The training split keeps only [`training_examples`] (mmdet's filter); the validation split keeps every image.
    `max_train_samples` / `max_eval_samples` keep the first examples of each split. `train_split=None` loads no
    training split (evaluation).
    """
    if coco_dir is not None and dataset_name is not None:
        raise ValueError("Pass either a COCO folder (--coco_dir) or a Hub dataset (--dataset_name), not both.")
    annotation_file = None
    if coco_dir is not None:
        train, validation, category_ids, class_names, annotation_file = _load_coco_folder(
            coco_dir, train_split, validation_split
        )
    elif dataset_name is not None:
        train, validation, category_ids, class_names = _load_hub_dataset(
            dataset_name, dataset_config_name, train_split, validation_split, cache_dir
        )
    else:
        train = None if train_split is None else load_synthetic_dataset("train", max_train_samples, task="detection")
        validation = load_synthetic_dataset("validation", max_eval_samples, task="detection")
        class_names = list(_category_feature(validation).names)
        category_ids = default_category_ids(class_names)
    if train is not None:
        train = training_examples(train)
        if max_train_samples is not None:
            train = train.select(range(min(max_train_samples, len(train))))
    if max_eval_samples is not None:
        validation = validation.select(range(min(max_eval_samples, len(validation))))
    return DetectionData(
        train=train,
        validation=validation,
        id2label=dict(enumerate(class_names)),
        category_ids=category_ids,
        validation_annotation_file=annotation_file,
    )


__all__ = [
    "COCO_CATEGORY_IDS",
    "DetectionData",
    "DetectionDataArguments",
    "coco_annotations",
    "coco_categories",
    "default_category_ids",
    "load_coco_split",
    "load_detection_data",
    "training_examples",
]
