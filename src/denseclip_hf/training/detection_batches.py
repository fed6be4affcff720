"""Detection training batches: the authors' train pipeline (mmdet `Resize(1333x800, keep_ratio)`, `RandomFlip(0.5)`,
`Normalize`, `Pad(32)`, batch padding) on top of `DenseClipDetectionImageProcessor`, and mmdet's `GroupSampler`.

Every sample is the processor's output for one image and its COCO annotations (`annotations=`: resize, normalisation,
padding to 32, mmdet's filtering of bad annotations), flipped horizontally with probability `flip_probability`
([`flip_horizontally`]): flipping after the normalisation and padding equals mmdet's flip before them, since both act
on each pixel and the padding is outside the image. As for segmentation (`data.py`), the sampler yields `(epoch,
index)` pairs and the flip of every sample is drawn from a generator seeded by `(seed, epoch, index)`, so a resumed run
sees exactly the batches of an uninterrupted one.
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from torch.utils.data import DataLoader

from ..image_processing_denseclip_detection import DenseClipDetectionImageProcessor
from .data import EpochShuffleSampler


def aspect_ratio_groups(widths: np.ndarray, heights: np.ndarray) -> np.ndarray:
    """mmdet's `flag` of each image: 1 when `width / height > 1` (landscape), else 0. Shapes `(n,)` -> `(n,)` int64."""
    widths, heights = np.asarray(widths, dtype=np.float64), np.asarray(heights, dtype=np.float64)
    if widths.shape != heights.shape or widths.ndim != 1:
        raise ValueError(f"widths {widths.shape} and heights {heights.shape} must be two vectors of the same length.")
    if (widths <= 0).any() or (heights <= 0).any():
        raise ValueError("Image widths and heights must be positive: check the dataset's `width` / `height` columns.")
    return (widths / heights > 1).astype(np.int64)


class AspectRatioGroupSampler(EpochShuffleSampler):
    """mmdet's `GroupSampler`: yields `(epoch, index)` such that every run of `batch_size` consecutive samples comes
    from one aspect-ratio group (`groups`, see [`aspect_ratio_groups`]), as a function of `(seed, epoch)` only.

    Per epoch: each group is shuffled and padded to a multiple of `batch_size` with samples of its own drawn at random
    (with replacement, as mmdet), the groups are cut into batches and the batches shuffled. A data loader with
    `batch_size` (and Accelerate, which hands whole batches to the processes) then sees batches of one group only.
    """

    def __init__(self, groups: np.ndarray, batch_size: int, seed: int):
        groups = np.asarray(groups)
        if groups.ndim != 1 or not len(groups):
            raise ValueError(f"groups must be a non-empty vector of group ids, got shape {groups.shape}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        super().__init__(len(groups), seed)
        self.groups = groups
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        batches = []
        for group in np.unique(self.groups):
            members = rng.permutation(np.flatnonzero(self.groups == group))
            extra = rng.choice(members, -len(members) % self.batch_size)
            batches += list(np.concatenate([members, extra]).reshape(-1, self.batch_size))
        order = rng.permutation(len(batches))
        return iter([(self.epoch, int(index)) for batch in order for index in batches[batch]])

    def __len__(self) -> int:
        sizes = np.unique(self.groups, return_counts=True)[1]
        return int(sum(-(-size // self.batch_size) * self.batch_size for size in sizes))


def flip_horizontally(
    pixel_values: np.ndarray, image_size: tuple[int, int], labels: dict[str, np.ndarray]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """mmdet's horizontal `RandomFlip` of one processed sample: the image part `[:h, :w]` of `pixel_values`
    `(3, H, W)` and of the `masks` `(n, H, W)` mirrored (the padding stays at the right), boxes `(n, 4)` (x1, y1, x2,
    y2) mapped to `(w - x2, y1, w - x1, y2)` (no -1). Returns new arrays."""
    height, width = image_size
    flipped = pixel_values.copy()
    flipped[:, :height, :width] = pixel_values[:, :height, :width][:, :, ::-1]
    labels = dict(labels)
    boxes = labels["boxes"].copy()
    boxes[:, 0], boxes[:, 2] = width - labels["boxes"][:, 2], width - labels["boxes"][:, 0]
    labels["boxes"] = boxes
    if "masks" in labels:
        masks = labels["masks"].copy()
        masks[:, :height, :width] = labels["masks"][:, :height, :width][:, :, ::-1]
        labels["masks"] = masks
    return flipped, labels


@dataclass
class DetectionAugmentation:
    """The authors' training transform of one image and its COCO annotations (`{"image_id", "annotations": [...]}`,
    the processor's `annotations=`): the processor's resize, normalisation and padding to 32 (`image_processor`,
    its `size` the recipe's scale), then a horizontal flip with probability `flip_probability` drawn from `rng`.
    `return_masks`: instance masks for Mask R-CNN.

    Returns `{"pixel_values": (3, Hp, Wp) float32, "image_size": (2,) int64, "labels": {"class_labels": (n,) int64,
    "boxes": (n, 4) float32[, "masks": (n, Hp, Wp) uint8]}}` (NumPy arrays; Hp, Wp multiples of 32).
    """

    image_processor: DenseClipDetectionImageProcessor
    flip_probability: float = 0.5
    return_masks: bool = False

    def __post_init__(self):
        if not 0 <= self.flip_probability <= 1:
            raise ValueError(f"flip_probability must be in [0, 1], got {self.flip_probability}.")

    def __call__(self, image: Any, annotations: dict, rng: np.random.Generator) -> dict[str, Any]:
        processed = self.image_processor(
            images=[image], annotations=[annotations], return_masks=self.return_masks, return_tensors=None
        )
        pixel_values = np.asarray(processed["pixel_values"][0])
        image_size = np.asarray(processed["image_sizes"][0], dtype=np.int64)
        labels = {key: np.asarray(value) for key, value in processed["labels"][0].items()}
        if rng.random() < self.flip_probability:
            pixel_values, labels = flip_horizontally(pixel_values, tuple(image_size.tolist()), labels)
        return {"pixel_values": pixel_values, "image_size": image_size, "labels": labels}


class AugmentedDetectionDataset(torch.utils.data.Dataset):
    """Training samples: item `(epoch, index)` is example `index` (its COCO annotations by `to_annotations`)
    transformed by `augmentation` with the generator seeded by `(seed, epoch, index)`."""

    def __init__(
        self,
        dataset: Dataset,
        augmentation: DetectionAugmentation,
        to_annotations: Callable[[dict], dict],
        seed: int,
    ):
        self.dataset = dataset
        self.augmentation = augmentation
        self.to_annotations = to_annotations
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        example = self.dataset[index]
        rng = np.random.default_rng([self.seed, epoch, index])
        return self.augmentation(example["image"], self.to_annotations(example), rng)


def collate_detection_batch(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Samples of [`DetectionAugmentation`] -> the detectors' inputs: `pixel_values` `(B, 3, H, W)`, zero-padded
    at the bottom / right to the largest sample (mmdet's collation), `image_sizes` `(B, 2)` int64 and `labels` (one
    dict of tensors per image; masks keep each image's own padded size, as the processor returns them)."""
    height = max(sample["pixel_values"].shape[1] for sample in samples)
    width = max(sample["pixel_values"].shape[2] for sample in samples)
    pixel_values = torch.zeros(len(samples), 3, height, width)
    for batch_index, sample in enumerate(samples):
        image = torch.from_numpy(np.ascontiguousarray(sample["pixel_values"]))
        pixel_values[batch_index, :, : image.shape[1], : image.shape[2]] = image
    return {
        "pixel_values": pixel_values,
        "image_sizes": torch.from_numpy(np.stack([sample["image_size"] for sample in samples])),
        "labels": [
            {key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in sample["labels"].items()}
            for sample in samples
        ],
    }


def detection_training_dataloader(
    dataset: Dataset,
    augmentation: DetectionAugmentation,
    to_annotations: Callable[[dict], dict],
    batch_size: int,
    seed: int,
    num_workers: int = 0,
) -> DataLoader:
    """Training batches ([`collate_detection_batch`]) of `dataset` (columns `image`, `width`, `height` and what
    `to_annotations` reads), grouped by aspect ratio ([`AspectRatioGroupSampler`]; call `set_epoch`), full batches
    only."""
    for column in ("width", "height"):
        if column not in dataset.column_names:
            raise ValueError(
                f"The detection dataset has no {column!r} column (columns: {dataset.column_names}): the aspect-ratio "
                "grouping needs each image's width and height."
            )
    groups = aspect_ratio_groups(np.asarray(dataset["width"]), np.asarray(dataset["height"]))
    return DataLoader(
        AugmentedDetectionDataset(dataset, augmentation, to_annotations, seed),
        batch_size=batch_size,
        sampler=AspectRatioGroupSampler(groups, batch_size, seed),
        drop_last=True,
        collate_fn=collate_detection_batch,
        num_workers=num_workers,
    )


__all__ = [
    "AspectRatioGroupSampler",
    "AugmentedDetectionDataset",
    "DetectionAugmentation",
    "aspect_ratio_groups",
    "collate_detection_batch",
    "detection_training_dataloader",
    "flip_horizontally",
]
