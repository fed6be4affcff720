"""The authors' detection checkpoints (mmdet 2.x RetinaNet and Mask R-CNN, DenseCLIP and CLIP baselines) ->
transformers folders, through the same converter as their segmentation checkpoints
(`convert_denseclip_original_to_hf`).

The checkpoints are built as mmcv saves them (`{"state_dict", "meta": {"CLASSES", "config", ...}}`) from the
fixtures' parameters (`fixtures/official_denseclip_det_*`: the authors' code run on tiny random models), with the
fixtures' own config as the embedded config text; the converted folders must reproduce the fixtures' detections and
masks, and their processors the fixtures' test inputs.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import run_without_denseclip_hf
from detection_fixtures import DETECTORS, IMAGES, authors_state_dict, detector, fixture, is_retinanet, metas, rgb_image
from transformers import AutoImageProcessor, AutoModelForInstanceSegmentation, AutoModelForObjectDetection

from denseclip_hf import (
    DenseClipDetectionImageProcessor,
    DenseClipForInstanceSegmentation,
    DenseClipForObjectDetection,
    convert_denseclip_checkpoint,
)
from denseclip_hf.convert_denseclip_original_to_hf import COCO_CLASS_NAMES, main
from denseclip_hf.mmcv_config import config_value, parse_config_text

# Detections as in test_modeling_detection: scores to float rounding, boxes to 1e-4 px (+ 2e-6 relative).
RELATIVE = 1e-5
BOX_TOLERANCE = dict(rtol=2e-6, atol=1e-4)


def config_text(value) -> str:
    """A value as mmcv's `Config.pretty_text` writes it: `dict(key=value)` where the keys are identifiers, `{...}`
    otherwise, lists, tuples and literals."""
    if isinstance(value, dict):
        if all(isinstance(key, str) and key.isidentifier() for key in value):
            return "dict(" + ", ".join(f"{key}={config_text(item)}" for key, item in value.items()) + ")"
        return "{" + ", ".join(f"{key!r}: {config_text(item)}" for key, item in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(config_text(item) for item in value) + "]"
    if isinstance(value, tuple):
        return "(" + ", ".join(config_text(item) for item in value) + ",)"
    return repr(value)


def training_config(name: str, **test_cfg) -> str:
    """The fixture's config as mmcv embeds it in a checkpoint: the model with its train / test settings (`test_cfg`
    overrides some), the test pipeline in `data.test`, and settings that are not literals (as mmcv writes them)."""
    _, description = fixture(name)
    model = dict(description["model_cfg"], train_cfg=description["train_cfg"], test_cfg=description["test_cfg"])
    model["test_cfg"] = {**model["test_cfg"], **test_cfg}
    pipeline = json.loads(json.dumps(description["test_pipeline"]))
    pipeline[1]["img_scale"] = tuple(pipeline[1]["img_scale"])
    return "\n".join(
        [
            f"model = {config_text(model)}",
            f"data = {config_text(dict(samples_per_gpu=2, test=dict(type='CocoDataset', pipeline=pipeline)))}",
            "gpu_ids = range(0, 8)",
            "optimizer = dict(type='AdamW', paramwise_cfg=dict(custom_keys={'backbone': dict(lr_mult=0.1)}))",
        ]
    )


def authors_checkpoint(name: str, **test_cfg) -> dict:
    """What mmcv's `save_checkpoint` writes for the authors' detector: the state dict and its meta."""
    _, description = fixture(name)
    meta = {
        "mmdet_version": "2.28.2",
        "CLASSES": tuple(description["class_names"]),
        "config": training_config(name, **test_cfg),
        "epoch": 12,
    }
    return {"state_dict": authors_state_dict(name), "meta": meta, "optimizer": {"state": {}, "param_groups": []}}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    """Each fixture saved as the authors' `.pth` and converted by the command's `main`."""
    converted = {}
    for name in DETECTORS:
        root = tmp_path_factory.mktemp(name)
        torch.save(authors_checkpoint(name), root / "checkpoint.pth")
        main(["--checkpoint", str(root / "checkpoint.pth"), "--output_dir", str(root / "converted")])
        converted[name] = str(root / "converted")
    return converted


def model_class(name: str) -> type:
    return DenseClipForObjectDetection if is_retinanet(name) else DenseClipForInstanceSegmentation


def expected(name: str, image: int, key: str) -> torch.Tensor:
    return fixture(name)[0][f"expected.img{image}.{key}"]


def class_major(labels: torch.Tensor) -> torch.Tensor:
    """The authors' `bbox2result` order: a stable partition by class."""
    return torch.sort(labels, stable=True).indices


@pytest.mark.parametrize("name", DETECTORS)
def test_folder_reproduces_the_authors_detections_and_masks(folders, name):
    auto_class = AutoModelForObjectDetection if is_retinanet(name) else AutoModelForInstanceSegmentation
    model = auto_class.from_pretrained(folders[name]).eval()
    assert type(model) is model_class(name)
    processor = AutoImageProcessor.from_pretrained(folders[name])
    assert type(processor) is DenseClipDetectionImageProcessor
    for image in IMAGES:
        # The processor is the fixture's test pipeline (read from the embedded config): its inputs bit for bit.
        inputs = processor(rgb_image(name, image), return_tensors="pt")
        for key, value in metas(name, image).items():
            assert torch.equal(inputs[key], value.to(inputs[key].dtype)), key
        with torch.no_grad():
            outputs = model(**inputs)
        raw, raw_labels = expected(name, image, "det_bboxes_raw"), expected(name, image, "det_labels_raw")
        assert torch.equal(outputs.labels[0], raw_labels) and len(raw_labels) > 0
        torch.testing.assert_close(outputs.scores[0], raw[:, 4], rtol=RELATIVE, atol=0)
        torch.testing.assert_close(outputs.pred_boxes[0], raw[:, :4], **BOX_TOLERANCE)
        if is_retinanet(name):
            continue
        result = processor.post_process_instance_segmentation(outputs, threshold=0.0, return_binary_maps=True)[0]
        order = class_major(torch.tensor([segment["label_id"] for segment in result["segments_info"]]))
        assert torch.equal(result["segmentation"][order], expected(name, image, "det_masks").bool())


@pytest.mark.parametrize("name", DETECTORS)
def test_infers_the_architecture_and_reads_the_embedded_config(folders, name):
    tensors, description = fixture(name)
    sizes, model_cfg = description["tiny_overrides"], description["model_cfg"]
    model = model_class(name).from_pretrained(folders[name])
    config = model.config
    # Every tensor is the authors' (the same as the fixture model built by hand from the tiny config).
    reference = detector(name).state_dict()
    assert model.state_dict().keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert config.id2label == dict(enumerate(description["class_names"]))
    vision = config.vision_config
    assert (vision.layers, vision.width, vision.attention_pool_heads) == (sizes["rn_layers"], sizes["rn_width"], 32)
    # DenseCLIP: the attention pool's grid (10 x 10); the baselines store none: the config's input_resolution.
    assert vision.image_size == sizes["input_resolution"]
    assert config.fpn_channels == sizes["fpn_out"]
    if name.startswith("clip_"):
        assert config.prompting_type == "none" and model.denseclip.text_encoder is None
    else:
        assert config.prompting_type == "post_model" and config.projection_dim == sizes["embed_dim"]
        assert config.class_token_ids == tensors["inputs.class_token_ids"].tolist()
        text = config.text_config
        # Heads are not stored in checkpoints: from the embedded config.
        assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (
            sizes["text_width"],
            sizes["text_layers"],
            model_cfg["text_encoder"]["transformer_heads"],
        )
        assert (config.num_context_tokens, config.class_name_token_length) == (
            sizes["text_context_length"] - sizes["class_context_length"],
            sizes["class_context_length"],
        )
        assert (config.context_decoder_layers, config.context_decoder_hidden_size, config.context_decoder_heads) == (
            sizes["cd_layers"],
            sizes["cd_width"],
            model_cfg["context_decoder"]["transformer_heads"],
        )
        assert config.score_map_level == 3
    if is_retinanet(name):
        assert (config.head_channels, config.head_stacked_convs) == (sizes["head_feat"], 4)
        assert config.fpn_levels == (model_cfg["neck"]["start_level"], 2)
    else:
        assert (config.rpn_channels, config.box_head_fc_channels, config.mask_head_channels) == (
            sizes["head_feat"],
            sizes["fc_out"],
            sizes["mask_conv"],
        )
        assert (config.box_roi_size, config.mask_roi_size, config.mask_head_convs) == (7, 14, 4)
    processor = DenseClipDetectionImageProcessor.from_pretrained(folders[name])
    scale = description["test_pipeline"][1]["img_scale"]
    assert processor.size == {"shortest_edge": min(scale), "longest_edge": max(scale)}
    assert processor.size_divisor == 32


@pytest.mark.parametrize(
    "name, test_cfg, settings",
    [
        (
            "retinanet",
            dict(nms_pre=500, score_thr=0.2, nms=dict(type="nms", iou_threshold=0.6), max_per_img=50),
            dict(nms_pre=500, score_threshold=0.2, nms_iou_threshold=0.6, max_detections=50),
        ),
        (
            "maskrcnn",
            dict(
                rpn=dict(nms_pre=300, max_per_img=200, nms=dict(type="nms", iou_threshold=0.65), min_bbox_size=2),
                rcnn=dict(score_thr=0.1, nms=dict(type="nms", iou_threshold=0.4), max_per_img=20, mask_thr_binary=0.4),
            ),
            dict(
                rpn_nms_pre=300,
                rpn_max_proposals=200,
                rpn_nms_iou_threshold=0.65,
                rpn_min_box_size=2,
                score_threshold=0.1,
                nms_iou_threshold=0.4,
                max_detections=20,
                mask_threshold=0.4,
            ),
        ),
    ],
)
def test_test_settings_come_from_the_embedded_config(tmp_path, name, test_cfg, settings):
    model = convert_denseclip_checkpoint(authors_checkpoint(name, **test_cfg), output_dir=tmp_path)
    assert {key: getattr(model.config, key) for key in settings} == settings
    with torch.no_grad():
        outputs = model(**metas(name, 0))
    assert len(outputs.labels[0]) <= settings["max_detections"]
    assert (outputs.scores[0] > settings["score_threshold"]).all()
    # The mask threshold is saved with the processor too, whose instance post-processing takes it by default
    # (tests/test_image_processing_detection.py).
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["mask_threshold"] == settings.get("mask_threshold", 0.5)
    assert AutoImageProcessor.from_pretrained(tmp_path).mask_threshold == saved["mask_threshold"]


def test_the_test_pipeline_comes_from_the_embedded_config(tmp_path, caplog):
    """Scale, keep_ratio, mean / std and padding of the checkpoint's test pipeline; what the processor cannot do
    (test-time flips) is a warning."""
    checkpoint = authors_checkpoint("retinanet")
    mean, std = [100.0, 110.0, 120.0], [50.0, 60.0, 70.0]
    pipeline = [
        dict(type="LoadImageFromFile"),
        dict(
            type="MultiScaleFlipAug",
            img_scale=(300, 200),
            flip=True,
            transforms=[
                dict(type="Resize", keep_ratio=False),
                dict(type="RandomFlip"),
                dict(type="Normalize", mean=mean, std=std, to_rgb=True),
                dict(type="Pad", size_divisor=64),
                dict(type="ImageToTensor", keys=["img"]),
            ],
        ),
    ]
    checkpoint["meta"]["config"] += f"\ntest_pipeline = {config_text(pipeline)}\ndata = dict(samples_per_gpu=2)"
    convert_denseclip_checkpoint(checkpoint, output_dir=tmp_path)
    assert "does not: test-time flips (flip=True)" in caplog.text
    processor = DenseClipDetectionImageProcessor.from_pretrained(tmp_path)
    assert processor.size == {"height": 200, "width": 300} and processor.size_divisor == 64
    np.testing.assert_allclose(processor.image_mean, np.array(mean) / 255, rtol=1e-12)
    np.testing.assert_allclose(processor.image_std, np.array(std) / 255, rtol=1e-12)
    inputs = processor(rgb_image("retinanet", 0), return_tensors="pt")
    assert inputs["pixel_values"].shape[-2:] == (256, 320) and inputs["image_sizes"].tolist() == [[200, 300]]


def test_command_converts_a_bare_state_dict(folders, tmp_path):
    """`python -m ...` on a state dict without meta: class names and heads from the command line, the authors'
    default test pipeline (1333 x 800)."""
    names = fixture("maskrcnn")[1]["class_names"]
    torch.save(authors_state_dict("maskrcnn"), tmp_path / "bare.pth")
    command = [sys.executable, "-m", "denseclip_hf.convert_denseclip_original_to_hf", "--checkpoint"]
    command += [str(tmp_path / "bare.pth"), "--output_dir", str(tmp_path / "out"), "--class_names", json.dumps(names)]
    result = subprocess.run([*command, "--text_heads=2"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DenseClipForInstanceSegmentation (DenseCLIP, resnet, 5 classes, score map on level 3)" in result.stdout
    model = DenseClipForInstanceSegmentation.from_pretrained(tmp_path / "out")
    reference = DenseClipForInstanceSegmentation.from_pretrained(folders["maskrcnn"])
    assert model.config.id2label == reference.config.id2label and model.config.context_decoder_heads == 4
    for key, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], tensor), key
    processor = DenseClipDetectionImageProcessor.from_pretrained(tmp_path / "out")
    assert processor.size == {"shortest_edge": 800, "longest_edge": 1333}


def with_classes(state_dict: dict[str, torch.Tensor], num_classes: int) -> dict[str, torch.Tensor]:
    """The RetinaNet fixture with `num_classes` classes: the classifier's outputs and the score map's channels (on
    C5, read by the last lateral convolution and P6's convolution) resized, with random values."""
    generator = torch.Generator().manual_seed(0)
    state_dict = dict(state_dict)
    anchors = state_dict["bbox_head.retina_reg.weight"].shape[0] // 4
    classifier = state_dict["bbox_head.retina_cls.weight"]
    state_dict["bbox_head.retina_cls.weight"] = torch.randn(
        anchors * num_classes, *classifier.shape[1:], generator=generator
    )
    state_dict["bbox_head.retina_cls.bias"] = torch.randn(anchors * num_classes, generator=generator)
    old = classifier.shape[0] // anchors
    for key in ("neck.lateral_convs.2.conv.weight", "neck.fpn_convs.3.conv.weight"):
        weight = state_dict[key][:, :-old]
        extra = torch.randn(weight.shape[0], num_classes, *weight.shape[2:], generator=generator) * 0.01
        state_dict[key] = torch.cat([weight, extra], 1)
    return state_dict


def test_eighty_classes_without_names_are_cocos(caplog):
    """The authors' detection scripts give their models COCO's names: an 80-class detector without meta gets them."""
    state_dict = with_classes(authors_state_dict("retinanet"), len(COCO_CLASS_NAMES))
    model = convert_denseclip_checkpoint(state_dict, text_heads=2)
    assert "its 80 classes get COCO's names in mmdet's order" in caplog.text
    assert model.config.id2label == dict(enumerate(COCO_CLASS_NAMES)) and len(set(COCO_CLASS_NAMES)) == 80
    assert set(fixture("retinanet")[1]["class_names"]) <= set(COCO_CLASS_NAMES)
    with torch.no_grad():
        outputs = model(**metas("retinanet", 0))
    assert outputs.score_map.shape[1] == 80 and outputs.labels[0].max() < 80
    with pytest.raises(ValueError, match=r"no meta\['CLASSES'\]: pass the class names"):
        convert_denseclip_checkpoint(authors_state_dict("retinanet"), text_heads=2)


def test_loads_with_trust_remote_code_without_the_package(folders, tmp_path):
    expected_outputs = {}
    for name in ("retinanet", "maskrcnn"):
        expected_outputs[f"{name}_boxes"] = expected(name, 0, "det_bboxes_raw")[:, :4].numpy()
        expected_outputs[f"{name}_labels"] = expected(name, 0, "det_labels_raw").numpy()
    np.savez(tmp_path / "expected.npz", image=rgb_image("maskrcnn", 0), **expected_outputs)
    run_without_denseclip_hf(
        f"""
        import numpy as np
        import torch
        from transformers import AutoImageProcessor, AutoModelForInstanceSegmentation, AutoModelForObjectDetection

        expected = np.load({str(tmp_path / "expected.npz")!r})
        folders = {{"retinanet": {folders["retinanet"]!r}, "maskrcnn": {folders["maskrcnn"]!r}}}
        detectors = (("retinanet", AutoModelForObjectDetection), ("maskrcnn", AutoModelForInstanceSegmentation))
        for name, auto_class in detectors:
            model = auto_class.from_pretrained(folders[name], trust_remote_code=True).eval()
            processor = AutoImageProcessor.from_pretrained(folders[name], trust_remote_code=True)
            assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
            with torch.no_grad():
                outputs = model(**processor(expected["image"], return_tensors="pt"))
            np.testing.assert_array_equal(outputs.labels[0].numpy(), expected[name + "_labels"])
            np.testing.assert_allclose(outputs.pred_boxes[0].numpy(), expected[name + "_boxes"], rtol=2e-6, atol=1e-4)
        assert "denseclip_hf" not in sys.modules
        """,
        tmp_path,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Bad checkpoints
# ---------------------------------------------------------------------------------------------------------------------


def test_unknown_missing_and_misshapen_keys_are_listed():
    checkpoint = authors_checkpoint("maskrcnn")
    checkpoint["state_dict"]["roi_head.mask_head.extra_conv.weight"] = torch.zeros(1)
    checkpoint["state_dict"]["backbone.layer5.0.conv1.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"2 unknown key\(s\).*backbone\.layer5\.0\.conv1\.weight.*extra_conv"):
        convert_denseclip_checkpoint(checkpoint)
    checkpoint = authors_checkpoint("maskrcnn")
    del checkpoint["state_dict"]["roi_head.mask_head.upsample.bias"]
    with pytest.raises(ValueError, match=r"missing tensors for 1 key\(s\).*mask_head\.upsample\.bias"):
        convert_denseclip_checkpoint(checkpoint)
    checkpoint = authors_checkpoint("retinanet")
    checkpoint["state_dict"]["bbox_head.reg_convs.1.conv.bias"] = torch.zeros(7)
    with pytest.raises(ValueError, match=r"wrong shapes.*head\.box_convs\.1\.bias: \(7,\) instead of \(16,\)"):
        convert_denseclip_checkpoint(checkpoint)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda sd: {key: value for key, value in sd.items() if key.startswith("backbone.")},
            r"does not hold one of the authors' DenseCLIP models.*found none of them",
        ),
        (
            lambda sd: {**sd, "decode_head.conv_seg.weight": torch.zeros(5, 16, 1, 1)},
            r"does not hold one of the authors' DenseCLIP models.*found RetinaNet and segmentation",
        ),
        (
            lambda sd: {**sd, "bbox_head.retina_reg.weight": sd["bbox_head.retina_reg.weight"][:-2]},
            r"bbox_head\.retina_reg\.weight has 34 outputs: not 4 box deltas per anchor",
        ),
    ],
)
def test_state_dicts_of_no_detector_are_explained(change, message):
    checkpoint = authors_checkpoint("retinanet")
    checkpoint["state_dict"] = change(checkpoint["state_dict"])
    with pytest.raises(ValueError, match=message):
        convert_denseclip_checkpoint(checkpoint)


def test_settings_that_do_not_fit_are_explained():
    checkpoint = authors_checkpoint("retinanet")
    checkpoint["meta"]["config"] = checkpoint["meta"]["config"].replace("ratios=[0.5, 1.0, 2.0]", "ratios=[0.5, 1.0]")
    with pytest.raises(ValueError, match=r"predicts boxes for 9 anchors per position.*anchor settings give 6"):
        convert_denseclip_checkpoint(checkpoint)
    with pytest.raises(ValueError, match=r"RetinaNet: loss_reduction only applies to their segmentation models"):
        convert_denseclip_checkpoint(authors_checkpoint("retinanet"), loss_reduction="mean_all_pixels")
    with pytest.raises(ValueError, match="Got 2 class names for a checkpoint with 5 classes"):
        convert_denseclip_checkpoint(authors_checkpoint("maskrcnn"), ["person", "car"])
    checkpoint = authors_checkpoint("maskrcnn")
    checkpoint["meta"]["config"] = "model = dict(type='DenseCLIP_MaskRCNN'"
    with pytest.raises(ValueError, match=r"meta\['config'\] is not an mmcv config text"):
        convert_denseclip_checkpoint(checkpoint)


def test_a_truncated_file_is_an_os_error(tmp_path):
    torch.save(authors_checkpoint("clip_retinanet"), tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match="probably truncated"):
        convert_denseclip_checkpoint(tmp_path / "truncated.pth")


# ---------------------------------------------------------------------------------------------------------------------
# The embedded config's reader
# ---------------------------------------------------------------------------------------------------------------------


def test_config_text_is_read_without_running_it():
    text = "\n".join(
        [
            "model = dict(type='RetinaNet', test_cfg=dict(nms=dict(iou_threshold=0.5)), offsets=(-1, +2.5))",
            "optimizer = dict(paramwise_cfg=dict(custom_keys={'backbone': dict(lr_mult=0.1), 'norm': {}}))",
            "gpu_ids = range(0, 8)",
            "work_dir = __import__('os').getcwd()",
            "test_cfg = dict(score_thr=0.05)",
            "flags = [True, None, 'x']",
        ]
    )
    config = parse_config_text(text)
    assert config == {
        "model": {"type": "RetinaNet", "test_cfg": {"nms": {"iou_threshold": 0.5}}, "offsets": (-1, 2.5)},
        "optimizer": {"paramwise_cfg": {"custom_keys": {"backbone": {"lr_mult": 0.1}, "norm": {}}}},
        "test_cfg": {"score_thr": 0.05},
        "flags": [True, None, "x"],
    }
    assert config_value(config, "model.test_cfg.nms.iou_threshold") == 0.5
    # mmdet 2.x's older configs keep test_cfg at the top level.
    assert config_value(config, "model.test_cfg.score_thr") == 0.05
    assert config_value(config, "model.neck.out_channels") is None
    assert parse_config_text(None) == {} and parse_config_text({"a": 1}) == {"a": 1}
    with pytest.raises(TypeError, match="text of Config.pretty_text"):
        parse_config_text(3)
