"""Detection data: the synthetic scenes with boxes and instance masks, COCO folders and Hub datasets in COCO format
(all with the same features), the processor's annotations, and bad annotations (errors or mmdet's skipping)."""

import json

import cv2
import numpy as np
import pytest
from datasets import ClassLabel, Dataset, Features, List, Value
from datasets import Image as ImageFeature
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from denseclip_hf import DenseClipDetectionImageProcessor
from denseclip_hf.convert_denseclip_original_to_hf import COCO_CLASS_NAMES
from denseclip_hf.synthetic import (
    SYNTHETIC_CLASS_NAMES,
    SYNTHETIC_DETECTION_CLASS_NAMES,
    detection_features,
    load_synthetic_dataset,
)
from denseclip_hf.training.detection_data import (
    COCO_CATEGORY_IDS,
    coco_annotations,
    default_category_ids,
    load_detection_data,
)

# ---------------------------------------------------------------------------------------------------------------------
# Synthetic scenes
# ---------------------------------------------------------------------------------------------------------------------


def test_synthetic_detection_masks_boxes_and_areas_follow_the_painted_scene():
    detection = load_synthetic_dataset("validation", num_samples=8, image_size=96, task="detection")
    segmentation = load_synthetic_dataset("validation", num_samples=8, image_size=96)
    assert detection.features == detection_features(SYNTHETIC_DETECTION_CLASS_NAMES)
    assert detection[:]["image_id"] == list(range(8))
    all_ids = [i for objects in detection["objects"] for i in objects["id"]]
    assert all_ids == list(range(1, len(all_ids) + 1))
    for det, seg in zip(detection, segmentation, strict=True):
        # The same scene: the image of the segmentation dataset, whose label map the masks must tile exactly.
        assert np.array_equal(np.asarray(det["image"]), np.asarray(seg["image"]))
        assert (det["width"], det["height"]) == (96, 96)
        label_map = np.asarray(seg["label"])
        objects = det["objects"]
        masks = [mask_utils.decode(rle).astype(bool) for rle in objects["segmentation"]]
        assert masks and sum(mask.astype(int) for mask in masks).max() == 1  # disjoint
        for class_index, name in enumerate(SYNTHETIC_DETECTION_CLASS_NAMES):
            union = np.zeros((96, 96), dtype=bool)
            for mask, category in zip(masks, objects["category"], strict=True):
                union |= mask if category == class_index else False
            assert np.array_equal(union, label_map == SYNTHETIC_CLASS_NAMES.index(name))
        for mask, box, area in zip(masks, objects["bbox"], objects["area"], strict=True):
            rows, cols = np.nonzero(mask)
            expected = [cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1]
            assert box == pytest.approx(expected) and area == mask.sum()
        assert set(objects["iscrowd"]) <= {0, 1}


def test_synthetic_detection_is_deterministic_and_the_segmentation_task_unchanged():
    first = load_synthetic_dataset("train", num_samples=3, task="detection")
    again = load_synthetic_dataset("train", num_samples=3, task="detection")
    other_seed = load_synthetic_dataset("train", num_samples=3, task="detection", seed=1)
    assert first["objects"] == again["objects"] and first["objects"] != other_seed["objects"]
    assert load_synthetic_dataset("train", num_samples=2).column_names == ["image", "label", "classes"]
    with pytest.raises(ValueError, match="Unknown synthetic task 'panoptic'"):
        load_synthetic_dataset("train", 1, task="panoptic")


def test_synthetic_default_of_load_detection_data():
    data = load_detection_data(max_train_samples=4, max_eval_samples=3)
    assert (len(data.train), len(data.validation)) == (4, 3)
    assert data.id2label == dict(enumerate(SYNTHETIC_DETECTION_CLASS_NAMES))
    assert data.category_ids == [0, 1, 2, 3] and data.validation_annotation_file is None


# ---------------------------------------------------------------------------------------------------------------------
# COCO folders
# ---------------------------------------------------------------------------------------------------------------------

CATEGORIES = [{"id": 7, "name": "kite"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]


def _image(path, size=(40, 48), seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _annotation(id_, image_id, category_id, bbox, **extra):
    return {"id": id_, "image_id": image_id, "category_id": category_id, "bbox": bbox, "area": bbox[2] * bbox[3],
            "iscrowd": 0, **extra}  # fmt: skip


def write_coco_folder(root, split="val2017", images=None, annotations=None):
    """A COCO folder split: two 40x48 images (h x w), annotations with polygons, an uncompressed crowd RLE, an
    out-of-image box and a zero-area box; returns the json dict."""
    images = images or [
        {"id": 11, "file_name": "a.png", "height": 40, "width": 48},
        {"id": 5, "file_name": "b.png", "height": 40, "width": 48},
    ]
    crowd = mask_utils.frPyObjects([[2, 2, 20, 2, 20, 20, 2, 20]], 40, 48)[0]
    uncompressed = {"size": [40, 48], "counts": _uncompressed(mask_utils.decode(crowd))}
    annotations = annotations or [
        _annotation(1, 11, 3, [4.5, 6.0, 20.0, 10.0], segmentation=[[4.5, 6, 24.5, 6, 24.5, 16, 4.5, 16]]),
        _annotation(
            2, 11, 7, [10.0, 10.0, 12.0, 20.0], segmentation=[[10, 10, 22, 10, 16, 30], [30, 2, 34, 2, 32, 5]]
        ),
        _annotation(3, 5, 1, [2.0, 2.0, 18.0, 18.0], segmentation=uncompressed, iscrowd=1),
        _annotation(4, 5, 3, [60.0, 50.0, 5.0, 5.0], segmentation=[[60, 50, 65, 50, 65, 55]]),  # outside the image
        _annotation(5, 5, 1, [5.0, 5.0, 0.0, 4.0], segmentation=[[5, 5, 6, 5, 5, 9]]),  # zero width
    ]
    for number, image in enumerate(images):
        _image(root / split / image["file_name"], (image["height"], image["width"]), number)
    content = {"images": images, "annotations": annotations, "categories": CATEGORIES}
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(content))
    return content


def _uncompressed(mask):
    """Column-major run lengths of a binary mask, starting with zeros (COCO's uncompressed RLE)."""
    flat = mask.flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    return runs if flat[0] == 0 else [0, *runs]


def test_coco_folder_matches_the_json_read_by_pycocotools(tmp_path):
    content = write_coco_folder(tmp_path)
    data = load_detection_data(coco_dir=tmp_path)
    assert data.train is None
    assert data.category_ids == [1, 3, 7] and data.id2label == {0: "person", 1: "car", 2: "kite"}
    assert data.validation_annotation_file == str(tmp_path / "annotations" / "instances_val2017.json")
    assert data.validation.features == detection_features(["person", "car", "kite"])
    coco = COCO(data.validation_annotation_file)
    assert data.validation["image_id"] == [image["id"] for image in content["images"]]
    for example in data.validation:
        assert np.asarray(example["image"]).shape == (40, 48, 3)
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=example["image_id"]))
        objects = example["objects"]
        assert objects["id"] == [annotation["id"] for annotation in annotations]
        assert [data.category_ids[label] for label in objects["category"]] == [a["category_id"] for a in annotations]
        assert objects["bbox"] == [pytest.approx(a["bbox"]) for a in annotations]
        assert objects["iscrowd"] == [a["iscrowd"] for a in annotations]
        for rle, annotation in zip(objects["segmentation"], annotations, strict=True):
            assert np.array_equal(mask_utils.decode(rle), coco.annToMask(annotation))


def test_coco_folder_with_training_split_filters_images_as_mmdet(tmp_path):
    write_coco_folder(tmp_path)
    images = [
        {"id": 1, "file_name": "x.png", "height": 40, "width": 48},
        {"id": 2, "file_name": "empty.png", "height": 40, "width": 48},  # no annotation: dropped
        {"id": 3, "file_name": "thin.png", "height": 31, "width": 48},  # side < 32: dropped
        {"id": 4, "file_name": "crowd.png", "height": 40, "width": 48},  # only a crowd region: kept (as mmdet)
    ]
    annotations = [
        _annotation(1, 1, 3, [1.0, 1.0, 5.0, 5.0]),
        _annotation(2, 3, 3, [1.0, 1.0, 5.0, 5.0]),
        _annotation(3, 4, 1, [1.0, 1.0, 5.0, 5.0], iscrowd=1),
    ]
    write_coco_folder(tmp_path, "train2017", images, annotations)
    data = load_detection_data(coco_dir=tmp_path)
    assert data.train["image_id"] == [1, 4]
    assert data.train[0]["objects"]["segmentation"] == [None]
    assert len(data.validation) == 2
    assert len(load_detection_data(coco_dir=tmp_path, max_train_samples=1, max_eval_samples=1).train) == 1


@pytest.mark.parametrize(
    "break_it, message",
    [
        (lambda content: content["annotations"][0].update(category_id=2), "category_id 2, which is not one of"),
        (lambda content: content["annotations"][0].update(image_id=99), "refers to image_id 99"),
        (lambda content: content["annotations"][0].update(bbox=[1, 2, 3]), r"bbox \[1, 2, 3\]"),
        (lambda content: content["annotations"][0].update(bbox=[1, 2, float("nan"), 3]), "non-finite"),
        (lambda content: content["annotations"][0].update(iscrowd=2), "iscrowd 2"),
        (lambda content: content["images"][1].update(file_name="gone.png"), "1 of the 2 images .* are missing"),
        (lambda content: content.pop("categories"), r"no \['categories'\] list"),
    ],
)
def test_broken_coco_files_raise_clear_errors(tmp_path, break_it, message):
    content = write_coco_folder(tmp_path)
    break_it(content)
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message):
        load_detection_data(coco_dir=tmp_path)


def test_missing_coco_split_and_two_sources_raise(tmp_path):
    with pytest.raises(ValueError, match="has no annotations/instances_val2017.json"):
        load_detection_data(coco_dir=tmp_path)
    with pytest.raises(ValueError, match="not both"):
        load_detection_data(coco_dir=tmp_path, dataset_name="x")


def test_processor_targets_skip_crowd_outside_and_degenerate_boxes_as_mmdet(tmp_path):
    """The data keeps every annotation of the json (evaluation scores against all of them); `coco_annotations` gives
    them to the processor, which skips the crowd region, the box outside the image and the zero-width box and scales
    the rest: [x, y, x + w, y + h] times the resize factors, clipped to the image."""
    write_coco_folder(tmp_path)
    data = load_detection_data(coco_dir=tmp_path)
    examples = list(data.validation)
    annotations = [coco_annotations(example) for example in examples]
    assert [len(target["annotations"]) for target in annotations] == [2, 3]
    processor = DenseClipDetectionImageProcessor(size={"shortest_edge": 80, "longest_edge": 200})
    batch = processor(
        images=[example["image"] for example in examples], annotations=annotations, num_labels=3, return_tensors="pt"
    )
    first, second = batch["labels"]
    assert first["class_labels"].tolist() == [1, 2] and len(second["class_labels"]) == 0
    scale = 80 / 40  # 40 x 48 -> 80 x 96
    expected = np.array([[4.5, 6.0, 24.5, 16.0], [10.0, 10.0, 22.0, 30.0]]) * scale
    np.testing.assert_allclose(first["boxes"].numpy(), expected, rtol=1e-6)
    assert first["masks"].shape == (2, 96, 96)  # padded to a multiple of 32
    decoded = mask_utils.decode(examples[0]["objects"]["segmentation"][1])
    resized = cv2.resize(decoded, (96, 80), interpolation=cv2.INTER_NEAREST)
    assert np.array_equal(first["masks"][1, :80].numpy(), resized)


# ---------------------------------------------------------------------------------------------------------------------
# Hub datasets
# ---------------------------------------------------------------------------------------------------------------------


def _write_hub_dataset(root, splits):
    for name, dataset in splits.items():
        (root / "data").mkdir(parents=True, exist_ok=True)
        dataset.to_parquet(str(root / "data" / f"{name}-00000-of-00001.parquet"))
    return str(root)


def test_hub_dataset_in_our_format_round_trips(tmp_path):
    train = load_synthetic_dataset("train", num_samples=3, task="detection")
    validation = load_synthetic_dataset("validation", num_samples=2, task="detection")
    data = load_detection_data(dataset_name=_write_hub_dataset(tmp_path, {"train": train, "validation": validation}))
    assert data.validation.features == validation.features and data.train.features == train.features
    for loaded, original in zip(data.validation, validation, strict=True):
        assert np.array_equal(np.asarray(loaded["image"]), np.asarray(original["image"]))
        assert {k: v for k, v in loaded.items() if k != "image"} == {k: v for k, v in original.items() if k != "image"}
    assert data.id2label == dict(enumerate(SYNTHETIC_DETECTION_CLASS_NAMES)) and data.category_ids == [0, 1, 2, 3]


def test_hub_dataset_with_minimal_coco_style_columns(tmp_path):
    """A cppe-5-like dataset: no width / height, no iscrowd, polygons as segmentation, a validation split only."""
    features = Features(
        {
            "image": ImageFeature(),
            "objects": {
                "bbox": List(List(Value("float32"), length=4)),
                "category": List(ClassLabel(names=list(COCO_CLASS_NAMES))),
                "segmentation": List(List(List(Value("float64")))),
            },
        }
    )
    image = Image.fromarray(np.zeros((30, 50, 3), dtype=np.uint8))
    polygon = [2.0, 3.0, 20.0, 3.0, 20.0, 13.0]
    rows = {"image": [image], "objects": [{"bbox": [[2, 3, 18, 10]], "category": [79], "segmentation": [[polygon]]}]}
    path = _write_hub_dataset(tmp_path, {"validation": Dataset.from_dict(rows, features=features)})
    data = load_detection_data(dataset_name=path)
    assert data.train is None and data.category_ids == list(COCO_CATEGORY_IDS)
    example = data.validation[0]
    assert (example["image_id"], example["width"], example["height"]) == (0, 50, 30)
    objects = example["objects"]
    assert objects["id"] == [0] and objects["iscrowd"] == [0] and objects["area"] == [180.0]
    expected = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([polygon], 30, 50)))
    assert np.array_equal(mask_utils.decode(objects["segmentation"][0]), expected)
    with pytest.raises(ValueError, match="no 'train_2' split"):
        load_detection_data(dataset_name=path, validation_split="train_2")


def test_default_category_ids():
    assert default_category_ids(list(COCO_CLASS_NAMES)) == list(COCO_CATEGORY_IDS)
    assert len(set(COCO_CATEGORY_IDS)) == 80 and max(COCO_CATEGORY_IDS) == 90
    assert default_category_ids(["a", "b"]) == [0, 1]
