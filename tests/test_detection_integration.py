"""The DenseCLIP detectors as transformers models: saved folders (code, `auto_map`, round trip), the Auto classes, the
`object-detection` and `image-segmentation` (instance) pipelines, and loading with `trust_remote_code=True` where the
package is not installed. The models are the authors' fixture detectors (`detection_fixtures`)."""

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from clip_reference import CLIP, randomize_batch_norms
from conftest import run_without_denseclip_hf
from detection_fixtures import FIXTURE_SIZE, detector, rgb_image
from PIL import Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageSegmentation,
    AutoModelForInstanceSegmentation,
    AutoModelForObjectDetection,
    pipeline,
)

from denseclip_hf import (
    DenseClipDetectionImageProcessor,
    DenseClipForInstanceSegmentation,
    DenseClipForObjectDetection,
    DenseClipMaskRCNNConfig,
    DenseClipRetinaNetConfig,
)

# What a saved detector folder holds: weights, config, processor config and the code they run with.
CODE_FILES = {
    "box_ops.py",
    "configuration_denseclip.py",
    "configuration_denseclip_detection.py",
    "image_processing_denseclip.py",
    "image_processing_denseclip_detection.py",
    "loading_denseclip.py",
    "loss_denseclip.py",
    "loss_denseclip_detection.py",
    "modeling_clip_resnet.py",
    "modeling_denseclip.py",
    "modeling_denseclip_detection.py",
    "protocol_denseclip.py",
    "sliding_windows.py",
    "tensor_ops.py",
}
AUTO_MAPS = {
    "retinanet": {
        "AutoConfig": "configuration_denseclip_detection.DenseClipRetinaNetConfig",
        "AutoModelForObjectDetection": "modeling_denseclip_detection.DenseClipForObjectDetection",
    },
    "maskrcnn": {
        "AutoConfig": "configuration_denseclip_detection.DenseClipMaskRCNNConfig",
        "AutoModelForInstanceSegmentation": "modeling_denseclip_detection.DenseClipForInstanceSegmentation",
        "AutoModelForImageSegmentation": "modeling_denseclip_detection.DenseClipForInstanceSegmentation",
        "AutoModelForObjectDetection": "modeling_denseclip_detection.DenseClipForInstanceSegmentation",
    },
}
# Low enough for the fixtures' random detectors (best scores 0.10-0.24) to find some objects.
THRESHOLD = 0.08


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    """The fixtures' RetinaNet and Mask R-CNN saved with the fixtures' test pipeline."""
    saved = {}
    for name in ("retinanet", "maskrcnn"):
        folder = tmp_path_factory.mktemp(name)
        detector(name).save_pretrained(folder)
        DenseClipDetectionImageProcessor(size=FIXTURE_SIZE).save_pretrained(folder)
        saved[name] = str(folder)
    return saved


@contextmanager
def transformers_messages() -> Iterator[list[str]]:
    """The messages transformers logs meanwhile (its loggers do not propagate to the root logger, which pytest's
    `caplog` reads)."""
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def image(index: int = 0) -> Image.Image:
    return Image.fromarray(rgb_image("maskrcnn", index))


def reference(name: str, picture: Image.Image):
    """The shared model's output on `picture` through the processor."""
    inputs = DenseClipDetectionImageProcessor(size=FIXTURE_SIZE)(picture, return_tensors="pt")
    with torch.no_grad():
        return detector(name)(**inputs)


def pipeline_boxes(boxes: torch.Tensor) -> list[dict[str, int]]:
    """Boxes as the object-detection pipeline reports them (truncated to ints)."""
    return [dict(zip(("xmin", "ymin", "xmax", "ymax"), box, strict=True)) for box in boxes.int().tolist()]


@pytest.mark.parametrize("name", ["retinanet", "maskrcnn"])
def test_saved_folder_holds_the_code_and_auto_map(folders, name):
    files = set(os.listdir(folders[name]))
    assert files == CODE_FILES | {"config.json", "model.safetensors", "preprocessor_config.json"}
    assert json.loads(open(os.path.join(folders[name], "config.json")).read())["auto_map"] == AUTO_MAPS[name]
    processor_config = json.loads(open(os.path.join(folders[name], "preprocessor_config.json")).read())
    assert processor_config["auto_map"] == {
        "AutoImageProcessor": "image_processing_denseclip_detection.DenseClipDetectionImageProcessor"
    }


@pytest.mark.parametrize("name", ["retinanet", "maskrcnn"])
def test_saved_folder_round_trip(folders, name):
    model_class = DenseClipForObjectDetection if name == "retinanet" else DenseClipForInstanceSegmentation
    loaded = model_class.from_pretrained(folders[name]).eval()
    for key, value in detector(name).state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert not any(parameter.requires_grad for parameter in loaded.denseclip.text_encoder.parameters())
    picture = image()
    expected = reference(name, picture)
    with torch.no_grad():
        outputs = loaded(
            **DenseClipDetectionImageProcessor.from_pretrained(folders[name])(picture, return_tensors="pt")
        )
    for field in ("pred_boxes", "scores", "labels"):
        assert torch.equal(getattr(outputs, field)[0], getattr(expected, field)[0])


def test_auto_classes_resolve_to_the_package(folders):
    assert type(AutoConfig.from_pretrained(folders["retinanet"])) is DenseClipRetinaNetConfig
    assert type(AutoConfig.from_pretrained(folders["maskrcnn"])) is DenseClipMaskRCNNConfig
    assert type(AutoModelForObjectDetection.from_pretrained(folders["retinanet"])) is DenseClipForObjectDetection
    for auto_class in (AutoModelForInstanceSegmentation, AutoModelForImageSegmentation, AutoModelForObjectDetection):
        assert type(auto_class.from_pretrained(folders["maskrcnn"])) is DenseClipForInstanceSegmentation
    for name in ("retinanet", "maskrcnn"):
        assert type(AutoImageProcessor.from_pretrained(folders[name])) is DenseClipDetectionImageProcessor


@pytest.mark.parametrize("name", ["retinanet", "maskrcnn"])
def test_object_detection_pipeline_equals_model_and_post_processing(folders, name, monkeypatch):
    questions = []
    monkeypatch.setattr("builtins.input", lambda prompt="": questions.append(prompt) or "n")
    picture = image()
    with transformers_messages() as messages:
        detections = pipeline("object-detection", model=folders[name])(picture, threshold=THRESHOLD)
    assert not questions, questions  # no "run the custom code? [y/N]" prompt with the package installed
    assert not [message for message in messages if "not supported" in message], messages
    expected = DenseClipDetectionImageProcessor().post_process_object_detection(
        reference(name, picture), THRESHOLD, target_sizes=[picture.size[::-1]]
    )[0]
    id2label = detector(name).config.id2label
    assert len(detections) == len(expected["scores"]) > 0
    assert [detection["label"] for detection in detections] == [id2label[int(label)] for label in expected["labels"]]
    assert [detection["score"] for detection in detections] == expected["scores"].tolist()
    assert [detection["box"] for detection in detections] == pipeline_boxes(expected["boxes"])


def test_instance_segmentation_pipeline_equals_model_and_post_processing(folders):
    picture = image(1)
    with transformers_messages() as messages:
        segmenter = pipeline("image-segmentation", model=folders["maskrcnn"])
    assert not [message for message in messages if "not supported" in message], messages
    segments = segmenter(picture, subtask="instance", threshold=THRESHOLD)
    # The pipeline reads the id map (overlaps go to the better instance; it passes overlap_mask_area_threshold 0.5).
    expected = DenseClipDetectionImageProcessor().post_process_instance_segmentation(
        reference("maskrcnn", picture),
        threshold=THRESHOLD,
        overlap_mask_area_threshold=0.5,
        target_sizes=[picture.size[::-1]],
    )[0]
    id2label = detector("maskrcnn").config.id2label
    assert len(segments) == len(expected["segments_info"]) > 0
    for segment, info in zip(segments, expected["segments_info"], strict=True):
        assert segment["label"] == id2label[info["label_id"]] and segment["score"] == info["score"]
        assert segment["mask"].size == picture.size
        np.testing.assert_array_equal(
            np.asarray(segment["mask"]) > 0, (expected["segmentation"] == info["id"]).numpy()
        )


def test_loads_with_trust_remote_code_without_the_package(folders, tmp_path):
    picture = image()
    picture.save(tmp_path / "image.png")
    expected = {}
    for name in ("retinanet", "maskrcnn"):
        outputs = reference(name, picture)
        expected[f"{name}_boxes"] = outputs.pred_boxes[0].numpy()
        expected[f"{name}_labels"] = outputs.labels[0].numpy()
    expected["masks"] = (
        DenseClipDetectionImageProcessor()
        .post_process_instance_segmentation(reference("maskrcnn", picture), 0.0, return_binary_maps=True)[0][
            "segmentation"
        ]
        .numpy()
    )
    np.savez(tmp_path / "expected.npz", **expected)
    run_without_denseclip_hf(
        f"""
        import numpy as np
        import torch
        from PIL import Image
        from transformers import (
            AutoImageProcessor, AutoModelForInstanceSegmentation, AutoModelForObjectDetection, pipeline
        )

        expected = np.load({str(tmp_path / "expected.npz")!r})
        picture = Image.open({str(tmp_path / "image.png")!r})
        folders = {{"retinanet": {folders["retinanet"]!r}, "maskrcnn": {folders["maskrcnn"]!r}}}
        detectors = (("retinanet", AutoModelForObjectDetection), ("maskrcnn", AutoModelForInstanceSegmentation))
        for name, auto_class in detectors:
            model = auto_class.from_pretrained(folders[name], trust_remote_code=True).eval()
            processor = AutoImageProcessor.from_pretrained(folders[name], trust_remote_code=True)
            assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
            assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
            with torch.no_grad():
                outputs = model(**processor(picture, return_tensors="pt"))
            np.testing.assert_array_equal(outputs.labels[0].numpy(), expected[name + "_labels"])
            np.testing.assert_allclose(outputs.pred_boxes[0].numpy(), expected[name + "_boxes"], rtol=0, atol=1e-5)
            assert pipeline("object-detection", model=folders[name], trust_remote_code=True)(picture, threshold=0.08)
        masks = processor.post_process_instance_segmentation(outputs, 0.0, return_binary_maps=True)[0]["segmentation"]
        np.testing.assert_array_equal(masks.numpy(), expected["masks"])
        segmenter = pipeline("image-segmentation", model=folders["maskrcnn"], trust_remote_code=True)
        assert segmenter(picture, subtask="instance", threshold=0.08)
        assert "denseclip_hf" not in sys.modules
        """,
        tmp_path,
    )


@pytest.mark.parametrize("model_class", [DenseClipForObjectDetection, DenseClipForInstanceSegmentation])
def test_from_clip_pretrained_builds_a_detector_on_clip(model_class, tmp_path):
    """A detector on OpenAI's CLIP RN weights (a tiny one here): its config class, CLIP's towers loaded exactly, and
    the loading resizes CLIP's positional grid to the authors' `input_resolution` 1344, as their backbone does when
    it loads CLIP: a 42 x 42 table (CLIP's grid resized bilinearly once), which the forward then crops.
    `position_embedding_size` asks for another size."""
    torch.manual_seed(1)
    clip = CLIP(
        24, 64, [1, 1, 1, 1], 8, 4, context_length=16, vocab_size=49408, text_width=16, text_heads=2, text_layers=2
    )
    randomize_batch_norms(clip)
    torch.save(clip.state_dict(), tmp_path / "rn.pt")
    sizes = dict(fpn_channels=8, head_channels=8, rpn_channels=8, box_head_fc_channels=16, mask_head_channels=8)
    sizes = {key: value for key, value in sizes.items() if key in model_class.config_class.__dataclass_fields__}
    model = model_class.from_clip_pretrained(
        tmp_path / "rn.pt", id2label={0: "person", 1: "car"}, vision_heads=4, text_heads=2, **sizes
    ).eval()
    assert type(model.config) is model_class.config_class and model.config.fpn_channels == 8
    assert model.config.position_embedding_interpolation == "crop" and model.config.join_score_map_over_temperature
    vision = model.denseclip.image_encoder.vision_model
    assert torch.equal(vision.stem.layers[0].conv.weight, clip.visual.conv1.weight)
    table = clip.visual.attnpool.positional_embedding  # CLIP's 2 x 2 grid (64 pixels) and the mean token's row
    grid = table[1:].reshape(1, 2, 2, -1).permute(0, 3, 1, 2)
    for side, loaded in ((42, model), (10, None)):
        if loaded is None:  # another size than the config's
            loaded = model_class.from_clip_pretrained(
                tmp_path / "rn.pt", {0: "person", 1: "car"}, vision_heads=4, text_heads=2, position_embedding_size=320
            )
        resized = F.interpolate(grid, size=(side, side), mode="bilinear", align_corners=False).flatten(2)[0].T
        embedding = loaded.denseclip.image_encoder.vision_model.attention_pool.position_embedding
        assert embedding.shape == (1 + side * side, table.shape[1])
        assert torch.equal(embedding[0], table[0]) and torch.equal(embedding[1:], resized)
        assert loaded.config.vision_config.image_size == 32 * side
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, 96, 128))
    assert outputs.pred_boxes[0].shape[1] == 4 and outputs.score_map.shape == (1, 2, 3, 4)
    # The detector's own tensors got their init (built on the meta device): the authors' effective one, mmcv
    # ConvModule's for the FPN (zero biases, Kaiming fan-out std sqrt(2 / (8 * 9)) = 0.167), PyTorch's for the plain
    # layers.
    assert all(torch.isfinite(tensor).all() for tensor in model.state_dict().values() if tensor.is_floating_point())
    assert all(not conv.bias.any() for conv in [*model.fpn.lateral_convs, *model.fpn.fpn_convs])
    assert 0.15 < model.fpn.fpn_convs[0].weight.std() < 0.185  # xavier: 0.118
    head = model.head.classifier if model_class is DenseClipForObjectDetection else model.box_head.classifier
    fan_in = head.weight[0].numel()
    assert head.bias.any() and head.bias.abs().max() <= fan_in**-0.5
