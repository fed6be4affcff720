"""Tests of DenseClipDetectionImageProcessor against the authors' mmdet pipeline outputs (fixtures made with their code
on mmdet 2.28.2 / mmcv 1.7.2 / OpenCV 5.1) and independent NumPy / torch computations."""

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from safetensors.numpy import load_file

from denseclip_hf.configuration_denseclip_detection import DenseClipMaskRCNNConfig
from denseclip_hf.image_processing_denseclip_detection import DenseClipDetectionImageProcessor
from denseclip_hf.modeling_denseclip_detection import DenseClipInstanceSegmentationOutput

FIXTURES = Path(__file__).parent / "fixtures"
DETECTORS = ["retinanet", "maskrcnn"]
# The fixtures' test pipeline: img_scale=[224, 128] (mmdet's (long, short) bounds).
FIXTURE_SIZE = {"shortest_edge": 128, "longest_edge": 224}
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])


def load_fixture(detector: str) -> tuple[dict[str, np.ndarray], dict]:
    stem = FIXTURES / f"official_denseclip_det_{detector}"
    return load_file(f"{stem}.safetensors"), json.loads(Path(f"{stem}.json").read_text())


def fixture_rgb(tensors: dict[str, np.ndarray], index: int) -> np.ndarray:
    """The fixture's BGR uint8 image as (H, W, 3) RGB."""
    return np.ascontiguousarray(tensors[f"inputs.img{index}.bgr_uint8"][..., ::-1])


def coco_annotations(fixture_json: dict, with_masks: bool) -> list[dict]:
    """The fixture's `inputs_annotations` (x1y1x2y2 boxes, labels, polygons) as COCO detection dicts."""
    targets = []
    for image_id, image in enumerate(fixture_json["inputs_annotations"]):
        objects = []
        for (x1, y1, x2, y2), label, polygons in zip(
            image["bboxes_xyxy"], image["labels"], image["polygons"], strict=True
        ):
            obj = {
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "category_id": label,
                "iscrowd": 0,
                "area": (x2 - x1) * (y2 - y1),
            }
            if with_masks:
                obj["segmentation"] = polygons
            objects.append(obj)
        targets.append({"image_id": image_id, "annotations": objects})
    return targets


def random_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)


def small_processor(**kwargs) -> DenseClipDetectionImageProcessor:
    return DenseClipDetectionImageProcessor(size=FIXTURE_SIZE, **kwargs)


def mmcv_rescale_size(height: np.ndarray, width: np.ndarray, long_edge: int, short_edge: int) -> np.ndarray:
    """mmcv `rescale_size` for `img_scale=(long_edge, short_edge)`, vectorised in float64: (N, 2) (height, width)."""
    scale = np.minimum(long_edge / np.maximum(height, width), short_edge / np.minimum(height, width))
    return np.stack([np.floor(height * scale + 0.5), np.floor(width * scale + 0.5)], axis=1).astype(np.int64)


def bilinear_reference(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, 3) -> (3, height, width) float64, bilinear with pixel centres and no antialiasing (OpenCV's rule)."""
    image = torch.from_numpy(np.moveaxis(rgb, -1, 0).astype(np.float64))[None]
    return torch.nn.functional.interpolate(image, size=(height, width), mode="bilinear", align_corners=False)[
        0
    ].numpy()


def clip_normalize(values: np.ndarray) -> np.ndarray:
    """(3, H, W) values in 0-255 -> CLIP-normalised, float64."""
    return (values / 255.0 - CLIP_MEAN[:, None, None]) / CLIP_STD[:, None, None]


# ---------------------------------------------------------------------------------------------------------------------
# The authors' test pipeline and training targets (fixtures)
# ---------------------------------------------------------------------------------------------------------------------


def test_defaults_are_the_authors_test_pipeline():
    processor = DenseClipDetectionImageProcessor()
    assert dict(processor.size) == {"shortest_edge": 800, "longest_edge": 1333}
    assert processor.size_divisor == 32 and processor.do_pad and not processor.do_center_crop
    np.testing.assert_allclose(processor.image_mean, CLIP_MEAN)
    np.testing.assert_allclose(processor.image_std, CLIP_STD)
    # The example of the notes: 640 x 480 -> 1067 x 800, scale factors (1.6671875, 1.6666666).
    assert processor.get_resize_output_size(480, 640) == (800, 1067)


@pytest.mark.parametrize("detector", DETECTORS)
@pytest.mark.parametrize("index", [0, 1])
def test_test_pipeline_matches_the_authors_bit_for_bit(detector, index):
    tensors, _ = load_fixture(detector)
    out = small_processor()(fixture_rgb(tensors, index), return_tensors="pt")
    expected = tensors[f"inputs.img{index}.pixel_values"]
    assert out["pixel_values"].dtype == torch.float32
    assert tuple(out["pixel_values"].shape[-2:]) == tuple(tensors[f"meta.img{index}.pad_shape"][:2])
    np.testing.assert_array_equal(out["pixel_values"].numpy(), expected)
    assert out["image_sizes"].dtype == torch.int64 and out["original_sizes"].dtype == torch.int64
    np.testing.assert_array_equal(out["image_sizes"].numpy(), tensors[f"meta.img{index}.img_shape"][None, :2])
    np.testing.assert_array_equal(out["original_sizes"].numpy(), tensors[f"meta.img{index}.ori_shape"][None, :2])
    assert out["scale_factors"].dtype == torch.float32
    np.testing.assert_array_equal(out["scale_factors"].numpy(), tensors[f"meta.img{index}.scale_factor"][None])


@pytest.mark.parametrize("detector", DETECTORS)
def test_training_targets_match_the_authors(detector):
    tensors, fixture_json = load_fixture(detector)
    with_masks = detector == "maskrcnn"
    images = [fixture_rgb(tensors, index) for index in (0, 1)]
    out = small_processor()(images, annotations=coco_annotations(fixture_json, with_masks), return_tensors="pt")

    # The training batch: each image's test-pipeline tensor at the top left of a zero batch of the collated size.
    batch = out["pixel_values"].numpy()
    assert batch.shape == (2, 3, *tensors["meta.train.batch_input_shape"])
    for index in (0, 1):
        expected = np.zeros(batch.shape[1:], dtype=np.float32)
        single = tensors[f"inputs.img{index}.pixel_values"][0]
        expected[:, : single.shape[1], : single.shape[2]] = single
        np.testing.assert_array_equal(batch[index], expected)
        np.testing.assert_array_equal(
            out["image_sizes"][index].numpy(), tensors[f"meta.train.img{index}.img_shape"][:2]
        )
        np.testing.assert_array_equal(
            out["scale_factors"][index].numpy(), tensors[f"meta.train.img{index}.scale_factor"]
        )

        labels = out["labels"][index]
        np.testing.assert_array_equal(labels["boxes"].numpy(), tensors[f"inputs.train.img{index}.gt_bboxes"])
        np.testing.assert_array_equal(labels["class_labels"].numpy(), tensors[f"inputs.train.img{index}.gt_labels"])
        assert labels["boxes"].dtype == torch.float32 and labels["class_labels"].dtype == torch.int64
        if with_masks:
            assert labels["masks"].dtype == torch.uint8
            np.testing.assert_array_equal(labels["masks"].numpy(), tensors[f"inputs.train.img{index}.gt_masks"])
        else:
            assert "masks" not in labels


# ---------------------------------------------------------------------------------------------------------------------
# Independent computations: size rule, resize, normalisation and padding
# ---------------------------------------------------------------------------------------------------------------------


def test_size_rule_matches_mmcv_rescale_size_over_many_sizes():
    sides = np.random.RandomState(0).randint(1, 4000, size=(600, 2))
    sides = np.concatenate([sides, [[480, 640], [800, 1333], [1333, 800], [1, 1], [3, 4000], [1, 2000], [2000, 2]]])
    expected = mmcv_rescale_size(sides[:, 0], sides[:, 1], 1333, 800)
    processor = DenseClipDetectionImageProcessor()
    for (height, width), (new_height, new_width) in zip(sides.tolist(), expected.tolist(), strict=True):
        if min(new_height, new_width) < 1:
            with pytest.raises(ValueError, match="too thin for the size rule"):
                processor.get_resize_output_size(height, width)
        else:
            assert processor.get_resize_output_size(height, width) == (new_height, new_width), (height, width)


@pytest.mark.parametrize(("height", "width"), [(20, 30), (50, 40), (61, 61), (7, 300)])
def test_outputs_follow_the_size_rule_and_pad_to_32(height, width):
    out = small_processor()(random_rgb(height, width), return_tensors="np")
    new_height, new_width = mmcv_rescale_size(np.array([height]), np.array([width]), 224, 128)[0]
    assert out["image_sizes"].tolist() == [[new_height, new_width]]
    assert out["original_sizes"].tolist() == [[height, width]]
    padded = (-(-new_height // 32) * 32, -(-new_width // 32) * 32)
    assert out["pixel_values"].shape == (1, 3, *padded)
    expected_scales = np.array([new_width / width, new_height / height] * 2, dtype=np.float32)
    np.testing.assert_array_equal(out["scale_factors"][0], expected_scales)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
@pytest.mark.parametrize(("height", "width"), [(20, 30), (50, 40)])
def test_resize_is_bilinear_with_pixel_centres(dtype, height, width):
    """uint8 images go through OpenCV's fixed-point path (within one grey level of exact bilinear), float images are
    interpolated in float32."""
    rgb = random_rgb(height, width, seed=3)
    processor = small_processor(do_normalize=False, do_rescale=False, size_divisor=1)
    out = processor(rgb.astype(dtype), return_tensors="np")
    new_height, new_width = out["image_sizes"][0]
    reference = bilinear_reference(rgb, new_height, new_width)
    tolerance = 1.0 if dtype == np.uint8 else 1e-4
    np.testing.assert_allclose(out["pixel_values"][0], reference, rtol=0, atol=tolerance)


def test_normalisation_and_zero_padding_match_numpy():
    rgb = random_rgb(37, 45, seed=1)
    out = DenseClipDetectionImageProcessor(do_resize=False)(rgb, return_tensors="np")
    pixels = out["pixel_values"][0]
    assert pixels.shape == (3, 64, 64) and pixels.dtype == np.float32
    np.testing.assert_allclose(
        pixels[:, :37, :45], clip_normalize(np.moveaxis(rgb, -1, 0).astype(np.float64)), atol=2e-6
    )
    assert not pixels[:, 37:].any() and not pixels[:, :, 45:].any()
    np.testing.assert_array_equal(out["scale_factors"][0], np.ones(4, dtype=np.float32))
    assert out["image_sizes"].tolist() == [[37, 45]]


def test_rescale_without_normalisation():
    rgb = random_rgb(32, 32, seed=2)
    out = DenseClipDetectionImageProcessor(do_resize=False, do_normalize=False)(rgb, return_tensors="np")
    np.testing.assert_allclose(out["pixel_values"][0], np.moveaxis(rgb, -1, 0) / 255.0, rtol=1e-6)


def test_batch_of_two_sizes_pads_each_image_at_the_top_left():
    images = [random_rgb(50, 70, seed=4), random_rgb(90, 40, seed=5)]
    processor = small_processor()
    batch = processor(images, return_tensors="pt")
    # 50 x 70 -> scale 128 / 50: 128 x 179, padded 128 x 192; 90 x 40 -> scale 224 / 90: 224 x 100, padded 224 x 128.
    assert tuple(batch["pixel_values"].shape) == (2, 3, 224, 192)
    for index, image in enumerate(images):
        single = processor(image, return_tensors="pt")
        height, width = single["pixel_values"].shape[-2:]
        np.testing.assert_array_equal(batch["pixel_values"][index, :, :height, :width], single["pixel_values"][0])
        assert (
            not batch["pixel_values"][index, :, height:].any() and not batch["pixel_values"][index, :, :, width:].any()
        )
        for key in ("image_sizes", "original_sizes", "scale_factors"):
            np.testing.assert_array_equal(batch[key][index], single[key][0])
    unstacked = processor(images, return_tensors=None)
    assert isinstance(unstacked["pixel_values"], list)
    np.testing.assert_array_equal(np.stack(unstacked["pixel_values"]), batch["pixel_values"].numpy())


# ---------------------------------------------------------------------------------------------------------------------
# Inputs: EXIF, alpha, array layouts
# ---------------------------------------------------------------------------------------------------------------------


def png_with_orientation(rgb: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG", exif=exif)
    return buffer.getvalue()


# EXIF orientation -> the np.rot90 turns that display the stored pixels upright (3: 180 degrees, 6: the camera was
# turned clockwise, so rotate clockwise; 8: counter-clockwise).
@pytest.mark.parametrize(("orientation", "turns"), [(3, 2), (6, -1), (8, 1)])
def test_exif_orientation_is_applied(orientation, turns, tmp_path):
    rgb = random_rgb(30, 52, seed=6)
    upright = np.ascontiguousarray(np.rot90(rgb, k=turns))
    expected = small_processor()(upright, return_tensors="np")
    path = tmp_path / "rotated.png"
    path.write_bytes(png_with_orientation(rgb, orientation))
    with Image.open(path) as image:
        assert image.getexif()[0x0112] == orientation
        from_pil = small_processor()(image, return_tensors="np")
    from_path = small_processor()(str(path), return_tensors="np")
    for out in (from_pil, from_path):
        np.testing.assert_array_equal(out["pixel_values"], expected["pixel_values"])
        assert out["original_sizes"].tolist() == [list(upright.shape[:2])]


def test_rgba_is_composited_over_white():
    random = np.random.RandomState(7)
    rgb = random_rgb(24, 40, seed=7)
    alpha = np.where(random.rand(24, 40) < 0.5, 0, 255).astype(np.uint8)
    rgba = Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA")
    expected_rgb = np.where(alpha[..., None] == 255, rgb, 255).astype(np.uint8)
    out = small_processor()(rgba, return_tensors="np")
    np.testing.assert_array_equal(
        out["pixel_values"], small_processor()(expected_rgb, return_tensors="np")["pixel_values"]
    )


def test_pil_arrays_and_tensors_agree():
    rgb = random_rgb(33, 47, seed=8)
    processor = small_processor()
    reference = processor(Image.fromarray(rgb), return_tensors="np")["pixel_values"]
    for image in (rgb, np.moveaxis(rgb, -1, 0), torch.from_numpy(np.moveaxis(rgb, -1, 0).copy())):
        np.testing.assert_array_equal(processor(image, return_tensors="np")["pixel_values"], reference)


# ---------------------------------------------------------------------------------------------------------------------
# Save / load
# ---------------------------------------------------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path):
    processor = small_processor(num_labels=5, return_masks=True, size_divisor=64)
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert config["image_processor_type"] == "DenseClipDetectionImageProcessor"
    assert config["size"] == FIXTURE_SIZE and config["size_divisor"] == 64 and config["num_labels"] == 5
    loaded = DenseClipDetectionImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()
    image = random_rgb(40, 65, seed=9)  # -> 128 x 208
    np.testing.assert_array_equal(loaded(image)["pixel_values"][0], processor(image)["pixel_values"][0])
    assert loaded(image, return_tensors="pt")["pixel_values"].shape[-1] == 256  # 208 padded to 64
    assert loaded(image, size_divisor=32, return_tensors="pt")["pixel_values"].shape[-1] == 224  # per-call override


# ---------------------------------------------------------------------------------------------------------------------
# Annotations: filtering rules, masks, RLE
# ---------------------------------------------------------------------------------------------------------------------

# One object on a 40 (h) x 60 (w) image without resize, and the box it must give ([x, y, x + w, y + h] clipped to the
# image), or None when mmdet's CocoDataset drops it.
FILTER_CASES = {
    "kept": ({"bbox": [10, 5, 20, 10], "area": 200}, [10, 5, 30, 15]),
    "clipped at the border": ({"bbox": [50, 30, 20, 20], "area": 400}, [50, 30, 60, 40]),
    "starts left of the image": ({"bbox": [-5.5, -2, 10, 10], "area": 100}, [0, 0, 4.5, 8]),
    "one pixel": ({"bbox": [3, 4, 1, 1], "area": 1}, [3, 4, 4, 5]),
    "no area key": ({"bbox": [1, 2, 3, 4]}, [1, 2, 4, 6]),
    "width below 1": ({"bbox": [10, 5, 0.5, 10], "area": 5}, None),
    "height below 1": ({"bbox": [10, 5, 10, 0.9], "area": 9}, None),
    "zero area": ({"bbox": [10, 5, 10, 10], "area": 0}, None),
    "negative area": ({"bbox": [10, 5, 10, 10], "area": -3.0}, None),
    "negative width": ({"bbox": [10, 5, -4, 10], "area": 40}, None),
    "right of the image": ({"bbox": [60, 5, 10, 10], "area": 100}, None),
    "above the image": ({"bbox": [5, -12, 10, 12], "area": 120}, None),
    "crowd": ({"bbox": [10, 5, 20, 10], "area": 200, "iscrowd": 1}, None),
}


@pytest.mark.parametrize("case", list(FILTER_CASES))
def test_annotation_filtering_rules(case):
    obj, expected_box = FILTER_CASES[case]
    anchor = {"bbox": [0, 0, 8, 8], "category_id": 1, "area": 64}  # a kept object, to see the filtered one go
    target = {"image_id": 7, "annotations": [anchor, {"category_id": 3, **obj}]}
    out = DenseClipDetectionImageProcessor(do_resize=False)(
        random_rgb(40, 60), annotations=[target], return_tensors="pt"
    )
    labels = out["labels"][0]
    expected_boxes = [[0, 0, 8, 8]] + ([] if expected_box is None else [expected_box])
    np.testing.assert_array_equal(labels["boxes"].numpy(), np.array(expected_boxes, dtype=np.float32))
    assert labels["class_labels"].tolist() == [1] + ([] if expected_box is None else [3])


def test_boxes_are_scaled_per_axis_and_clipped_to_the_resized_image():
    image = random_rgb(97, 80)  # -> 155 x 128: w_scale 1.6, h_scale 155 / 97
    objects = [
        {"bbox": [7.25, 44.5, 59.0, 48.0], "category_id": 0},
        {"bbox": [60.0, 90.0, 30.0, 20.0], "category_id": 2},
    ]
    out = small_processor()(image, annotations={"image_id": 1, "annotations": objects}, return_tensors="np")
    scale = np.array([128 / 80, 155 / 97] * 2, dtype=np.float32)
    expected = np.array([[7.25, 44.5, 66.25, 92.5], [60.0, 90.0, 90.0, 110.0]], dtype=np.float32) * scale
    expected[:, 0::2] = np.clip(expected[:, 0::2], 0, 128)
    expected[:, 1::2] = np.clip(expected[:, 1::2], 0, 155)
    np.testing.assert_array_equal(out["labels"][0]["boxes"], expected)
    assert expected[1, 2] == 128 and expected[1, 3] == 155  # the second box was clipped


def column_major_runs(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE counts of a binary mask: alternating run lengths (zeros first) in column-major order."""
    flat = mask.flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    return runs if flat[0] == 0 else [0, *runs]


@pytest.mark.parametrize("encoding", ["uncompressed", "compressed bytes", "compressed str"])
def test_rle_segmentations_are_decoded(encoding):
    mask = np.zeros((9, 11), dtype=np.uint8)
    mask[2:6, 3:9] = 1
    if encoding == "uncompressed":
        rle = {"size": [9, 11], "counts": column_major_runs(mask)}
    else:
        rle = mask_utils.encode(np.asfortranarray(mask))
        if encoding == "compressed str":
            rle = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    target = {"annotations": [{"bbox": [3, 2, 6, 4], "category_id": 0, "iscrowd": 0, "segmentation": rle}]}
    out = DenseClipDetectionImageProcessor(do_resize=False)(random_rgb(9, 11), annotations=target, return_tensors="np")
    expected = np.zeros((1, 32, 32), dtype=np.uint8)
    expected[0, :9, :11] = mask
    np.testing.assert_array_equal(out["labels"][0]["masks"], expected)


def test_return_masks_modes():
    tensors, fixture_json = load_fixture("maskrcnn")
    image = fixture_rgb(tensors, 0)
    with_polygons = coco_annotations(fixture_json, with_masks=True)[0]
    processor = small_processor()
    assert "masks" not in processor(image, annotations=with_polygons, return_masks=False)["labels"][0]
    empty = processor(image, annotations={"image_id": 0, "annotations": []}, return_masks=True, return_tensors="pt")
    assert tuple(empty["labels"][0]["masks"].shape) == (0, 128, 192)
    assert tuple(empty["labels"][0]["boxes"].shape) == (0, 4) and empty["labels"][0]["class_labels"].numel() == 0
    # Crowd regions carry no target, so their missing segmentation does not matter.
    crowd = {"bbox": [1, 1, 5, 5], "category_id": 0, "iscrowd": 1}
    mixed = {"annotations": [*with_polygons["annotations"], crowd]}
    masks = processor(image, annotations=mixed, return_tensors="np")["labels"][0]["masks"]
    np.testing.assert_array_equal(masks, tensors["inputs.train.img0.gt_masks"])


# ---------------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------------


def one_object(**fields) -> dict:
    return {"image_id": 3, "annotations": [{"bbox": [1, 1, 5, 5], "category_id": 0, **fields}]}


ANNOTATION_ERRORS = [
    (one_object(category_id=-1), {}, r"Annotation 0 of image 0 \(image_id 3\) has category_id -1, an unknown class"),
    (one_object(category_id=5), {"num_labels": 5}, r"category_id 5, an unknown class.*below num_labels=5"),
    (one_object(category_id=1.0), {}, r"category_id 1.0: expected the model's class index"),
    (one_object(bbox=[1, 2, 3]), {}, r"has bbox \[1, 2, 3\]: expected \[x, y, width, height\]"),
    (one_object(bbox=[1, 2, float("nan"), 3]), {}, r"4 finite numbers"),
    (one_object(bbox="1 2 3 4"), {}, r"has bbox '1 2 3 4'"),
    (one_object(iscrowd=2), {}, r"iscrowd 2: expected 0 or 1"),
    (one_object(), {"return_masks": True}, r"has no 'segmentation' but masks are requested"),
    (one_object(segmentation=[[1, 1, 4, 1]]), {}, r"polygon .* at least 3 points"),
    (one_object(segmentation={"size": [5, 5], "counts": [3, 22]}), {}, r"RLE of size \[5, 5\] but its image is"),
    (one_object(segmentation="mask.png"), {}, r"expected polygons"),
    ({"image_id": 3}, {}, r"The annotations of image 0 must be a dict"),
    ([one_object(), one_object()], {}, r"Got 2 annotation dicts for 1 images"),
]


@pytest.mark.parametrize(("annotations", "kwargs", "message"), ANNOTATION_ERRORS)
def test_annotation_errors(annotations, kwargs, message):
    with pytest.raises(ValueError, match=message):
        small_processor()(random_rgb(20, 30), annotations=annotations, **kwargs)


def test_mask_threshold_defaults_to_the_processors_saved_setting(tmp_path):
    """`post_process_instance_segmentation(mask_threshold=None)` takes the processor's `mask_threshold` (the authors'
    0.5 by default; a model's `config.mask_threshold` where saved so), which `preprocessor_config.json` keeps; an
    explicit value still wins. Masks of constant probability 0.45: the whole box at 0.4, nothing at 0.5."""
    boxes = torch.tensor([[2.0, 2.0, 8.0, 9.0]])
    outputs = DenseClipInstanceSegmentationOutput(
        pred_boxes=(boxes,),
        scores=(torch.tensor([0.9]),),
        labels=(torch.tensor([1]),),
        frame_sizes=torch.tensor([[12, 10]]),
        pred_masks=(torch.full((1, 28, 28), 0.45),),
        mask_boxes=(boxes,),
    )
    in_box = torch.zeros(12, 10, dtype=torch.bool)
    in_box[2:9, 2:8] = True  # the pixels whose centres lie inside the box

    def masks(processor, **kwargs) -> torch.Tensor:
        result = processor.post_process_instance_segmentation(
            outputs, threshold=0.0, return_binary_maps=True, **kwargs
        )
        return result[0]["segmentation"][0]

    authors = DenseClipDetectionImageProcessor()
    assert authors.mask_threshold == DenseClipMaskRCNNConfig().mask_threshold == 0.5
    assert not masks(authors).any() and torch.equal(masks(authors, mask_threshold=0.4), in_box)
    DenseClipDetectionImageProcessor(mask_threshold=0.4).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "preprocessor_config.json").read_text())["mask_threshold"] == 0.4
    loaded = DenseClipDetectionImageProcessor.from_pretrained(tmp_path)
    assert torch.equal(masks(loaded), in_box) and not masks(loaded, mask_threshold=0.5).any()
    for bad in (1.5, -0.1, "0.5"):
        with pytest.raises(ValueError, match=r"mask_threshold must be a number in \[0, 1\]"):
            DenseClipDetectionImageProcessor(mask_threshold=bad)
        with pytest.raises(ValueError, match=r"mask_threshold must be a number in \[0, 1\]"):
            masks(authors, mask_threshold=bad)


SETTING_ERRORS = [
    ({"do_pad": False}, ValueError, r"always pads"),
    ({"do_center_crop": True, "crop_size": {"height": 8, "width": 8}}, ValueError, r"does not center-crop"),
    ({"resample": Image.Resampling.NEAREST}, ValueError, r"only resample=PILImageResampling.BILINEAR"),
    ({"size_divisor": 0}, ValueError, r"size_divisor must be a positive int"),
    ({"num_labels": 0}, ValueError, r"num_labels must be a positive int"),
    ({"size": {"max_height": 5, "max_width": 5}}, ValueError, r"Unsupported size"),
    ({"size_divisor": "32"}, TypeError, r"size_divisor"),
    ({"data_format": "channels_last"}, ValueError, r"only returns channels-first"),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), SETTING_ERRORS)
def test_setting_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        small_processor()(random_rgb(20, 30), **kwargs)


@pytest.mark.parametrize(
    ("images", "message"),
    [
        ([], r"empty list of images"),
        (np.zeros((0, 5, 3), dtype=np.uint8), r"at least one pixel"),
        (random_rgb(2, 3000), r"too thin for the size rule"),
    ],
)
def test_image_errors(images, message):
    with pytest.raises(ValueError, match=message):
        small_processor()(images)


@pytest.mark.parametrize(
    ("module", "message"), [("cv2", "OpenCV for the resize"), ("pycocotools.mask", "pycocotools")]
)
def test_missing_optional_dependency_names_the_extra(monkeypatch, module, message):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    target = one_object(segmentation=[[1, 1, 5, 1, 5, 5]])
    with pytest.raises(ImportError, match=message + r'.*pip install "denseclip_hf\[detection\]"'):
        small_processor()(random_rgb(20, 30), annotations=target)
