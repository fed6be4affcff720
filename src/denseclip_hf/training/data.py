"""Semantic segmentation data: Hub datasets, local image + label-PNG folders, the synthetic default, and batches.

Every source becomes a `datasets.Dataset` with an `image` and a `label` column (PIL images) plus an `id2label`.
Training wraps it in [`AugmentedSegmentationDataset`], indexed by `(epoch, index)` pairs from [`EpochShuffleSampler`],
so the shuffling and the augmentation of every sample are functions of `(seed, epoch, index)`: a run resumed in the
middle of an epoch sees exactly the samples and augmentations that the uninterrupted run saw. Validation batches
([`EvaluationCollator`]) hold each image at the processor's resolution and its label map at full resolution.
"""

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, List, Sequence, load_dataset
from datasets import Image as ImageFeature
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError
from torch.utils.data import DataLoader, Sampler

from ..configuration_denseclip import IGNORE_INDEX
from ..image_processing_denseclip import DenseClipImageProcessor, label_map_to_array
from ..synthetic import load_synthetic_dataset
from .transforms import SegmentationAugmentation

# The 150 ADE20K (SceneParsing) classes as named by mmseg's `ADE20KDataset.CLASSES`, which the DenseCLIP authors use
# as text prompts (their "bed " with its trailing space tokenizes like "bed").
ADE20K_CLASS_NAMES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track",
    "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van",
    "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel",
    "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name",
    "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce",
    "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board",
    "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip

# The 21 Pascal VOC classes as named by mmseg's `PascalVOCDataset.CLASSES`.
VOC_CLASS_NAMES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

# Hub datasets whose label maps follow a layout above.
KNOWN_HUB_CLASS_NAMES = {"scene_parse_150": ADE20K_CLASS_NAMES, "zhoubolei/scene_parse_150": ADE20K_CLASS_NAMES}

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_IMAGE_DIR_NAMES = ("images", "img", "JPEGImages")
_LABEL_DIR_NAMES = ("annotations", "labels", "masks", "SegmentationClass")
_SPLIT_DIR_NAMES = {"train": ("training", "train"), "validation": ("validation", "val")}


@dataclass
class SegmentationData:
    """Training and validation splits (columns `image` and `label`) and the class names by label id."""

    train: Dataset
    validation: Dataset
    id2label: dict[int, str]


# ---------------------------------------------------------------------------------------------------------------------
# Local folders
# ---------------------------------------------------------------------------------------------------------------------


def _first_existing(folder: Path, names: tuple[str, ...]) -> Path | None:
    return next((folder / name for name in names if (folder / name).is_dir()), None)


def _is_voc(folder: Path) -> bool:
    return (folder / "JPEGImages").is_dir() and (folder / "SegmentationClass").is_dir()


def _voc_pairs(folder: Path, split: str) -> list[tuple[Path, Path]]:
    """Pascal VOC: `ImageSets/Segmentation/{train,val}.txt` lists ids of `JPEGImages/<id>.jpg` and
    `SegmentationClass/<id>.png`."""
    list_file = folder / "ImageSets" / "Segmentation" / f"{_SPLIT_DIR_NAMES[split][1]}.txt"
    if not list_file.is_file():
        raise ValueError(f"{folder} looks like Pascal VOC but has no {list_file}.")
    ids = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
    return [(folder / "JPEGImages" / f"{name}.jpg", folder / "SegmentationClass" / f"{name}.png") for name in ids]


def _paired_files(image_dir: Path, label_dir: Path) -> list[tuple[Path, Path]]:
    """Every image under `image_dir` (recursively) with the PNG of the same relative path under `label_dir`."""
    images = sorted(path for path in image_dir.rglob("*") if path.suffix.lower() in IMAGE_EXTENSIONS)
    pairs = [(image, label_dir / image.relative_to(image_dir).with_suffix(".png")) for image in images]
    missing = [str(label) for _, label in pairs if not label.is_file()]
    if missing:
        raise ValueError(
            f"{len(missing)} of the {len(pairs)} images in {image_dir} have no label PNG in {label_dir} (e.g. "
            f"{missing[0]}): every image needs a label map with the same relative path and a .png suffix."
        )
    return pairs


def find_image_label_pairs(folder: str | os.PathLike, split: str) -> list[tuple[Path, Path]]:
    """Image and label-map files of one split (`"train"` or `"validation"`) of a local dataset folder.

    Supported layouts:
    - ADE20K and generic split folders: `images/{training,train}/...` + `annotations/{training,train}/...` (also
      `labels/` or `masks/`; validation in `validation/` or `val/`), label = same relative path with `.png`;
    - Pascal VOC (`VOCdevkit/VOC2012`): `JPEGImages/`, `SegmentationClass/`, `ImageSets/Segmentation/{train,val}.txt`;
    - a flat folder for one split: `images/...` + `annotations/...` (or `labels/`, `masks/`).
    """
    folder = Path(folder)
    if _is_voc(folder):
        return _voc_pairs(folder, split)
    image_root, label_root = _first_existing(folder, _IMAGE_DIR_NAMES), _first_existing(folder, _LABEL_DIR_NAMES)
    if image_root is None or label_root is None:
        raise ValueError(
            f"{folder} has no image folder ({', '.join(_IMAGE_DIR_NAMES)}) and label folder "
            f"({', '.join(_LABEL_DIR_NAMES)}): see `find_image_label_pairs` for the supported layouts."
        )
    split_dir = _first_existing(image_root, _SPLIT_DIR_NAMES[split])
    if split_dir is not None:
        return _paired_files(split_dir, label_root / split_dir.name)
    if any(_first_existing(image_root, names) for names in _SPLIT_DIR_NAMES.values()):
        raise ValueError(f"{image_root} has split folders but none for the {split!r} split.")
    return _paired_files(image_root, label_root)


def has_split_folders(folder: str | os.PathLike) -> bool:
    """Whether a local dataset folder holds both a training and a validation split (ADE20K, VOC, split folders)."""
    folder = Path(folder)
    if _is_voc(folder):
        return True
    image_root = _first_existing(folder, _IMAGE_DIR_NAMES)
    return image_root is not None and all(_first_existing(image_root, names) for names in _SPLIT_DIR_NAMES.values())


def load_image_label_folder(folder: str | os.PathLike, split: str) -> Dataset:
    """One split of a local folder (see [`find_image_label_pairs`]) as a `Dataset` with `image` and `label` columns,
    decoded lazily from the files."""
    pairs = find_image_label_pairs(folder, split)
    if not pairs:
        raise ValueError(f"No images found for the {split!r} split in {folder}.")
    columns = {"image": [str(image) for image, _ in pairs], "label": [str(label) for _, label in pairs]}
    return Dataset.from_dict(columns, features=Features({"image": ImageFeature(), "label": ImageFeature()}))


def builtin_class_names(folder: str | os.PathLike) -> tuple[str, ...] | None:
    """Class names of a recognised local layout: ADE20K (`ADEChallengeData2016`) or Pascal VOC; else `None`."""
    folder = Path(folder)
    if _is_voc(folder):
        return VOC_CLASS_NAMES
    if (folder / "images" / "training").is_dir() and (folder / "annotations" / "training").is_dir():
        return ADE20K_CLASS_NAMES
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Class names
# ---------------------------------------------------------------------------------------------------------------------


def read_id2label(path: str | os.PathLike) -> dict[int, str]:
    """An `id2label` JSON file: `{"0": "wall", ...}` or a list of names."""
    content = json.loads(Path(path).read_text())
    if isinstance(content, list):
        return dict(enumerate(content))
    return {int(label): name for label, name in content.items()}


def class_names_from_features(features: Features) -> list[str] | None:
    """Class names of a label-map dataset from its features: the `ClassLabel` of a list column (the classes present
    in each image, like the synthetic dataset's `classes`), if exactly one column has one."""
    names = [
        feature.feature.names
        for feature in features.values()
        if isinstance(feature, (List, Sequence)) and isinstance(feature.feature, ClassLabel)
    ]
    return list(names[0]) if len(names) == 1 else None


def hub_id2label(dataset_name: str, cache_dir: str | None = None) -> dict[int, str] | None:
    """The `id2label.json` of a Hub dataset repository (the convention of transformers' segmentation examples), or
    `None` when it has none or the Hub cannot be reached."""
    try:
        path = hf_hub_download(dataset_name, "id2label.json", repo_type="dataset", cache_dir=cache_dir)
    except (EntryNotFoundError, HfHubHTTPError, OSError, ValueError):
        return None
    return read_id2label(path)


def _check_id2label(id2label: dict[int, str]) -> dict[int, str]:
    if sorted(id2label) != list(range(len(id2label))):
        raise ValueError(f"id2label must have the keys 0..{len(id2label) - 1}, got {sorted(id2label)[:10]}...")
    return id2label


# ---------------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------------


def _train_validation_splits(
    dataset: DatasetDict, validation_split_name: str, train_val_split: float | None, seed: int
) -> tuple[Dataset, Dataset]:
    if "train" not in dataset:
        raise ValueError(f"The dataset has no 'train' split (splits: {list(dataset)}).")
    if validation_split_name in dataset:
        return dataset["train"], dataset[validation_split_name]
    if not train_val_split:
        raise ValueError(
            f"The dataset has no {validation_split_name!r} split (splits: {list(dataset)}): pass --train_val_split to "
            "hold out part of the training split."
        )
    split = dataset["train"].train_test_split(test_size=train_val_split, seed=seed)
    return split["train"], split["test"]


def _standard_columns(dataset: Dataset, image_column: str, label_column: str) -> Dataset:
    """Renames the image and label columns to `image` and `label` (other columns are kept)."""
    for column, standard in ((image_column, "image"), (label_column, "label")):
        if column not in dataset.column_names:
            raise ValueError(
                f"Column {column!r} not found in the dataset (columns: {dataset.column_names}): pass "
                f"--{standard}_column_name."
            )
        if column != standard:
            dataset = dataset.rename_column(column, standard)
    return dataset


def _load_hub_dataset(
    dataset_name: str,
    dataset_config_name: str | None,
    image_column_name: str,
    label_column_name: str,
    train_val_split: float | None,
    cache_dir: str | None,
    seed: int,
) -> tuple[Dataset, Dataset, list[str] | None]:
    """Training and validation splits of a Hub dataset with standard column names, and its class names if known."""
    dataset = load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir)
    train, validation = _train_validation_splits(dataset, "validation", train_val_split, seed)
    train = _standard_columns(train, image_column_name, label_column_name)
    validation = _standard_columns(validation, image_column_name, label_column_name)
    class_names = class_names_from_features(train.features) or KNOWN_HUB_CLASS_NAMES.get(dataset_name)
    return train, validation, class_names


def _load_folders(train_dir: str, validation_dir: str | None) -> tuple[Dataset, Dataset, tuple[str, ...] | None]:
    """Training and validation splits of local folders, and the class names of a recognised layout."""
    if validation_dir is None and not has_split_folders(train_dir):
        raise ValueError(f"{train_dir} holds a single split: pass --validation_dir.")
    train = load_image_label_folder(train_dir, "train")
    validation = load_image_label_folder(validation_dir or train_dir, "validation")
    return train, validation, builtin_class_names(train_dir)


def load_segmentation_data(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_dir: str | None = None,
    validation_dir: str | None = None,
    image_column_name: str = "image",
    label_column_name: str = "label",
    id2label_file: str | None = None,
    train_val_split: float | None = None,
    cache_dir: str | None = None,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    seed: int = 0,
    default_id2label: dict[int, str] | None = None,
) -> SegmentationData:
    """Loads training and validation data with `image` / `label` columns and its `id2label`.

    Sources: a Hub dataset (`dataset_name`), local folders (`train_dir`, `validation_dir`; see
    [`find_image_label_pairs`]), or, with neither, the synthetic scenes ([`load_synthetic_dataset`]). Class names come
    from `id2label_file`, else the dataset's features, else a known layout (ADE20K, Pascal VOC, `scene_parse_150`),
    else the Hub dataset's `id2label.json`, else `default_id2label` (evaluation: the model's classes).
    `max_train_samples` / `max_eval_samples` keep the first examples of each
    split (quick runs and tests).
    """
    if dataset_name is not None:
        train, validation, class_names = _load_hub_dataset(
            dataset_name, dataset_config_name, image_column_name, label_column_name, train_val_split, cache_dir, seed
        )
    elif train_dir is not None:
        train, validation, class_names = _load_folders(train_dir, validation_dir)
    else:
        train = load_synthetic_dataset("train", num_samples=max_train_samples)
        validation = load_synthetic_dataset("validation", num_samples=max_eval_samples)
        class_names = class_names_from_features(train.features)
    if max_train_samples is not None:
        train = train.select(range(min(max_train_samples, len(train))))
    if max_eval_samples is not None:
        validation = validation.select(range(min(max_eval_samples, len(validation))))
    if id2label_file is not None:
        id2label = read_id2label(id2label_file)
    elif class_names is not None:
        id2label = dict(enumerate(class_names))
    elif dataset_name is not None and (from_hub := hub_id2label(dataset_name, cache_dir)) is not None:
        id2label = from_hub
    elif default_id2label is not None:
        id2label = default_id2label
    else:
        raise ValueError(
            "Could not find the class names of this dataset: pass --id2label with a JSON file mapping label ids to "
            'names, e.g. {"0": "wall", "1": "building"}.'
        )
    return SegmentationData(train=train, validation=validation, id2label=_check_id2label(id2label))


def check_label_range(dataset: Dataset, num_labels: int, do_reduce_labels: bool, num_samples: int = 8) -> None:
    """Fails early, naming the likely fix, when the first label maps hold ids outside `[0, num_labels)` and
    `IGNORE_INDEX`."""
    for index in range(min(num_samples, len(dataset))):
        label = label_map_to_array(dataset[index]["label"], f"Label map {index}")
        if do_reduce_labels:
            label = DenseClipImageProcessor.reduce_label(label)
        values = np.unique(label)
        bad = values[(values != IGNORE_INDEX) & ((values < 0) | (values >= num_labels))]
        if bad.size:
            hint = "" if do_reduce_labels else " If 0 means 'unlabelled' (ADE20K), pass --do_reduce_labels."
            raise ValueError(
                f"Label map {index} holds ids {bad.tolist()[:5]} outside [0, {num_labels - 1}] ({IGNORE_INDEX} = "
                f"ignored) for {num_labels} classes.{hint} Otherwise check --id2label."
            )


# ---------------------------------------------------------------------------------------------------------------------
# Training and evaluation batches
# ---------------------------------------------------------------------------------------------------------------------


class EpochShuffleSampler(Sampler[tuple[int, int]]):
    """Yields `(epoch, index)` for a permutation of `range(num_samples)` that depends only on `(seed, epoch)`.

    `set_epoch` (called by `accelerate` through the prepared data loader) selects the epoch.
    """

    def __init__(self, num_samples: int, seed: int):
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples)
        return iter([(self.epoch, int(index)) for index in order])

    def __len__(self) -> int:
        return self.num_samples


class AugmentedSegmentationDataset(torch.utils.data.Dataset):
    """Training samples: item `(epoch, index)` is example `index` augmented with the generator seeded by
    `(seed, epoch, index)`, as `{"pixel_values": (3, crop, crop) float32, "labels": (crop, crop) int64}`."""

    def __init__(self, dataset: Dataset, augmentation: SegmentationAugmentation, seed: int):
        self.dataset = dataset.select_columns(["image", "label"])
        self.augmentation = augmentation
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, index = key
        example = self.dataset[index]
        rng = np.random.default_rng([self.seed, epoch, index])
        pixel_values, labels = self.augmentation(example["image"], example["label"], rng)
        return {"pixel_values": torch.from_numpy(pixel_values), "labels": torch.from_numpy(labels)}


@dataclass
class EvaluationCollator:
    """Evaluation batches: `pixel_values` holds, per image, a list of `(3, h_s, w_s)` tensors from the image processor,
    one per scale (`scale_ratios`, e.g. `MULTI_SCALE_RATIOS`; a single entry at the processor's `size` when `None`;
    sizes may differ between images), `labels` a list of the full-resolution `(H_i, W_i)` int64 label maps (reduced
    like the processor does when `do_reduce_labels`). The processor's `test_mode` decides its resize (see
    `DenseClipImageProcessor`)."""

    image_processor: DenseClipImageProcessor
    scale_ratios: tuple[float, ...] | None = None

    def __call__(self, examples: list[dict]) -> dict[str, list]:
        images = [example["image"] for example in examples]
        if self.scale_ratios is None:
            per_scale = [self.image_processor(images=images)["pixel_values"]]
        else:
            per_scale = self.image_processor(images=images, scale_ratios=list(self.scale_ratios))["pixel_values"]
        labels = [label_map_to_array(example["label"]) for example in examples]
        if self.image_processor.do_reduce_labels:
            labels = [DenseClipImageProcessor.reduce_label(label) for label in labels]
        return {
            "pixel_values": [
                [torch.from_numpy(np.asarray(scale[index])) for scale in per_scale] for index in range(len(examples))
            ],
            "labels": [torch.from_numpy(label) for label in labels],
        }


def training_dataloader(
    dataset: Dataset, augmentation: SegmentationAugmentation, batch_size: int, seed: int, num_workers: int = 0
) -> DataLoader:
    """Augmented training batches `{"pixel_values": (batch, 3, crop, crop), "labels": (batch, crop, crop)}` in the
    order of an [`EpochShuffleSampler`] (call `set_epoch`), full batches only."""
    augmented = AugmentedSegmentationDataset(dataset, augmentation, seed)
    return DataLoader(
        augmented,
        batch_size=batch_size,
        sampler=EpochShuffleSampler(len(augmented), seed),
        drop_last=True,
        num_workers=num_workers,
    )


def evaluation_dataloader(
    dataset: Dataset,
    image_processor: DenseClipImageProcessor,
    batch_size: int,
    num_workers: int = 0,
    scale_ratios: tuple[float, ...] | None = None,
) -> DataLoader:
    """Evaluation batches of `dataset` in order (see [`EvaluationCollator`]), for [`evaluate`]."""
    return DataLoader(
        dataset.select_columns(["image", "label"]),
        batch_size=batch_size,
        collate_fn=EvaluationCollator(image_processor, scale_ratios),
        num_workers=num_workers,
    )


__all__ = [
    "ADE20K_CLASS_NAMES",
    "VOC_CLASS_NAMES",
    "AugmentedSegmentationDataset",
    "EpochShuffleSampler",
    "EvaluationCollator",
    "SegmentationData",
    "check_label_range",
    "evaluation_dataloader",
    "find_image_label_pairs",
    "load_image_label_folder",
    "load_segmentation_data",
    "read_id2label",
    "training_dataloader",
]
