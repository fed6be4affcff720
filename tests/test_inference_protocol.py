"""The authors' test protocol: sliding windows, whole images, multi-scale inputs and flips, the processor's
multi-scale resize, and the pipeline.

`fixtures/official_denseclip_tiny_{vit,rn}_inference.*` hold what the authors' `slide_inference`, `inference` and
`aug_test` (mmseg 0.30) returned on the tiny models of `fixtures/official_denseclip_tiny_{vit,rn}.safetensors`.
"""

import functools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import FIXTURES, TINY_RESNET, make_model, tiny_config
from PIL import Image
from safetensors.torch import load_file
from test_convert_denseclip import authors_checkpoint, head_options
from transformers import pipeline

from denseclip_hf import (
    DenseClipConfig,
    DenseClipForSemanticSegmentation,
    DenseClipImageProcessor,
    convert_denseclip_checkpoint,
)
from denseclip_hf.image_processing_denseclip import MULTI_SCALE_RATIOS
from denseclip_hf.protocol_denseclip import slide_logits
from denseclip_hf.sliding_windows import sliding_window_starts, sliding_windows, window_accumulation
from denseclip_hf.training.evaluation import EvaluationProtocol

FAMILIES = ("vit", "rn")
TOLERANCE = dict(atol=1e-5, rtol=1e-5)


@functools.cache
def inference_fixture(family: str) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = load_file(FIXTURES / f"official_denseclip_tiny_{family}_inference.safetensors")
    return tensors, json.loads((FIXTURES / f"official_denseclip_tiny_{family}_inference.json").read_text())


@functools.cache
def authors_model(family: str) -> DenseClipForSemanticSegmentation:
    """The converted tiny model with the fixture's `test_cfg` (crop 64, stride 43)."""
    _, description = inference_fixture(family)
    model = convert_denseclip_checkpoint(authors_checkpoint(family), **head_options(family))
    model.config.test_crop_size = description["test_cfg"]["crop_size"]
    model.config.test_stride = description["test_cfg"]["stride"]
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------------
# The authors' outputs
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_reproduces_every_stored_tensor_of_the_authors_test(family):
    tensors, description = inference_fixture(family)
    model = authors_model(family)
    original_size = tuple(description["original_size"])
    scales = [tensors[f"aug.pixel_values.{index}"] for index in range(len(description["multi_scale_input_sizes"]))]
    assert [list(x.shape[-2:]) for x in scales] == description["multi_scale_input_sizes"]
    with torch.no_grad():
        ours = {
            "slide.logits": model(tensors["slide.pixel_values"], test_mode="slide").logits,
            "slide.probabilities_at_original_size": model.predict_probabilities(
                tensors["slide.pixel_values"], original_size
            ),
            "whole.probabilities_at_original_size": model.predict_probabilities(
                tensors["slide.pixel_values"], original_size, mode="whole"
            ),
            "aug.probabilities": model.predict_probabilities(scales, original_size, flip=True),
        }
    ours["aug.prediction"] = ours["aug.probabilities"].argmax(1)[0]
    inputs = {"slide.pixel_values", *(f"aug.pixel_values.{index}" for index in range(len(scales)))}
    assert set(ours) | inputs == set(tensors), "every stored tensor is an input or is reproduced"
    for key, value in ours.items():
        torch.testing.assert_close(value, tensors[key], **TOLERANCE, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.parametrize("family", FAMILIES)
def test_explicit_settings_equal_the_configured_ones(family):
    tensors, description = inference_fixture(family)
    model = authors_model(family)
    settings = description["test_cfg"]
    pixel_values, size = tensors["slide.pixel_values"], tuple(description["original_size"])
    explicit = model.predict_probabilities(
        pixel_values, size, mode=settings["mode"], crop_size=tuple(settings["crop_size"]), stride=settings["stride"][0]
    )
    torch.testing.assert_close(explicit, model.predict_probabilities(pixel_values, size), rtol=0, atol=0)
    with torch.no_grad():
        whole_logits = model(pixel_values, test_mode="whole").logits
    torch.testing.assert_close(
        F.interpolate(whole_logits, size=size, mode="bilinear", align_corners=False).softmax(1),
        tensors["whole.probabilities_at_original_size"],
        **TOLERANCE,
    )


def test_a_side_that_does_not_fill_a_patch_is_cut_as_the_authors_patch_convolution_does():
    model = authors_model("vit")
    pixel_values = inference_fixture("vit")[0]["aug.pixel_values.0"]  # 48 x 72, patch 16
    patch_embedding = model.base_model.image_encoder.vision_model.embeddings.patch_embedding
    with torch.no_grad():
        torch.testing.assert_close(patch_embedding(pixel_values), patch_embedding(pixel_values[..., :64]), **TOLERANCE)
        cut = model(pixel_values[..., :64], test_mode="plain").logits
        with pytest.raises(ValueError, match="multiples of the patch size 16"):
            model(pixel_values, test_mode="plain")
    expected = F.interpolate(cut, size=(48, 72), mode="bilinear", align_corners=False).softmax(1)
    ours = model.predict_probabilities(pixel_values, (48, 72), mode="whole")
    torch.testing.assert_close(ours, expected, **TOLERANCE)


def test_converter_sets_the_authors_protocol():
    for family in FAMILIES:
        model = convert_denseclip_checkpoint(authors_checkpoint(family), **head_options(family))
        # The tiny checkpoints were trained at 64 pixels: windows of 64 every 2/3 of it, as 640/426 and 512/341.
        assert (model.config.test_mode, model.config.test_crop_size, model.config.test_stride) == ("slide", 64, 42)


# ---------------------------------------------------------------------------------------------------------------------
# Sliding windows against brute force
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [1, 31, 32, 33, 64, 75, 96, 100, 144, 341, 683])
@pytest.mark.parametrize(("crop", "stride"), [(32, 1), (32, 21), (32, 32), (64, 43), (512, 341)])
def test_window_starts_cover_every_pixel_and_end_at_the_border(length, crop, stride):
    expected = [0] if length <= crop else [*range(0, length - crop, stride), length - crop]
    starts = sliding_window_starts(length, crop, stride)
    assert starts == expected
    covered = np.zeros(length, dtype=int)
    for start in starts:
        covered[start : start + min(crop, length)] += 1
    assert covered.min() >= 1 and starts[-1] + min(crop, length) == length


@pytest.mark.parametrize(
    ("size", "crop", "stride"),
    [
        ((512, 683), (512, 512), (341, 341)),
        ((512, 512), (640, 640), (426, 426)),
        ((50, 77), (32, 24), (20, 24)),
        ((40, 64), (48, 32), (48, 16)),
        ((64, 64), (32, 32), (32, 32)),
        ((700, 900), (512, 512), (341, 341)),
    ],
)
def test_window_accumulation_writes_each_pixel_once_per_window_and_divides_where_windows_overlap(size, crop, stride):
    """Replaying the plan on a brute-force record of what was written: a window's region is copied exactly where no
    earlier window wrote and added exactly where one did; the divisions are the coverage wherever it exceeds 1."""
    height, width = size
    window, corners, writes, divisions = window_accumulation(height, width, crop, stride)
    assert (window, corners) == sliding_windows(height, width, crop, stride)
    coverage = np.zeros(size, dtype=int)
    for (top, left), parts in zip(corners, writes, strict=True):
        touched = np.zeros(size, dtype=int)
        for add, (row_begin, row_end, col_begin, col_end) in parts:
            earlier = coverage[row_begin:row_end, col_begin:col_end]
            assert (earlier > 0).all() if add else (earlier == 0).all(), ((top, left), add)
            touched[row_begin:row_end, col_begin:col_end] += 1
        expected = np.zeros(size, dtype=int)
        expected[top : top + window[0], left : left + window[1]] = 1
        np.testing.assert_array_equal(touched, expected)
        coverage += expected
    divided = np.ones(size, dtype=int)
    for (row_begin, row_end, col_begin, col_end), count in divisions:
        assert (divided[row_begin:row_end, col_begin:col_end] == 1).all(), "each pixel divided at most once"
        divided[row_begin:row_end, col_begin:col_end] = count
    np.testing.assert_array_equal(divided, coverage)


def test_a_single_window_is_the_whole_image_resized():
    """An image no larger than the crop: the slide protocol's logits are the single pass resized (no sum, no
    division), bit for bit."""
    pixel_values = torch.randn(2, 3, 40, 52, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    logits_fn = _quarter_resolution_logits()
    ours = slide_logits(logits_fn, pixel_values, (64, 64), (42, 42))
    expected = F.interpolate(logits_fn(pixel_values).float(), size=(40, 52), mode="bilinear", align_corners=False)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)


def _quarter_resolution_logits(num_labels: int = 3):
    """A `logits_fn` at a quarter of the input (like the model's), different for every window content."""
    weight = torch.randn(num_labels, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def logits_fn(pixel_values: torch.Tensor) -> torch.Tensor:
        logits_fn.calls.append(tuple(pixel_values.shape))
        return F.conv2d(pixel_values, weight, stride=4)

    logits_fn.calls = []
    return logits_fn


@pytest.mark.parametrize(
    ("size", "crop", "stride"),
    [((50, 77), (32, 24), (20, 24)), ((40, 64), (48, 32), (48, 16)), ((64, 64), (32, 32), (32, 32))],
)
def test_slide_logits_average_each_pixel_over_the_windows_covering_it(size, crop, stride):
    pixel_values = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    logits_fn = _quarter_resolution_logits()
    ours = slide_logits(logits_fn, pixel_values, crop, stride)
    windows = sliding_windows(*size, crop, stride)
    assert logits_fn.calls == [(2, 3, *windows[0])] * len(windows[1]), "one call per window, with the whole batch"

    # Brute force: every window position that fits (offsets listed independently), each window run on its own,
    # and for every pixel the mean over the windows that contain it.
    height, width = size
    window = (min(crop[0], height), min(crop[1], width))
    tops = sorted({min(t, height - window[0]) for t in range(0, max(height - window[0], 0) + stride[0], stride[0])})
    lefts = sorted({min(x, width - window[1]) for x in range(0, max(width - window[1], 0) + stride[1], stride[1])})
    outputs = {}
    for top in tops:
        for left in lefts:
            crop_logits = logits_fn(pixel_values[..., top : top + window[0], left : left + window[1]])
            outputs[top, left] = F.interpolate(crop_logits, size=window, mode="bilinear", align_corners=False).numpy()
    expected = np.zeros(ours.shape)
    for row in range(height):
        for col in range(width):
            covering = [
                logits[..., row - top, col - left]
                for (top, left), logits in outputs.items()
                if top <= row < top + window[0] and left <= col < left + window[1]
            ]
            assert covering, (row, col)
            expected[..., row, col] = np.mean(covering, axis=0)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-6, atol=1e-6)


def test_slide_logits_backpropagate_like_windows_summed_one_by_one():
    """The in-place, channels-last accumulation keeps autograd working: the gradient equals that of a plain
    channels-first loop over the windows (one `logits_fn` call and one new tensor per window, float32 as ours)."""
    generator = torch.Generator().manual_seed(2)
    pixel_values = torch.randn(2, 3, 50, 77, generator=generator, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 3, 50, 77, generator=generator)
    logits_fn = _quarter_resolution_logits()
    ours = slide_logits(logits_fn, pixel_values, (32, 24), (20, 24))
    assert ours.is_contiguous(memory_format=torch.channels_last)
    (ours_grad,) = torch.autograd.grad((ours * weights).sum(), pixel_values)

    reference_input = pixel_values.detach().clone().requires_grad_(True)
    total, coverage = 0, torch.zeros(50, 77)
    for top in (0, 18):
        for left in (0, 24, 48, 53):
            crop_logits = logits_fn(reference_input[..., top : top + 32, left : left + 24]).float()
            resized = F.interpolate(crop_logits, size=(32, 24), mode="bilinear", align_corners=False)
            total = total + F.pad(resized, (left, 77 - 24 - left, top, 50 - 32 - top))
            coverage[top : top + 32, left : left + 24] += 1
    (reference_grad,) = torch.autograd.grad((total / coverage * weights).sum(), reference_input)
    torch.testing.assert_close(ours_grad, reference_grad, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# The processor's multi-scale inputs
# ---------------------------------------------------------------------------------------------------------------------


def mmcv_rescale_size(width: int, height: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv's `rescale_size((w, h), scale)` for a `(long, short)` scale: the keep-ratio size `(w, h)`."""
    max_long_edge, max_short_edge = max(scale), min(scale)
    factor = min(max_long_edge / max(height, width), max_short_edge / min(height, width))
    return int(width * float(factor) + 0.5), int(height * float(factor) + 0.5)


def mmseg_multi_scale_sizes(height: int, width: int, img_scale: tuple[int, int], ratios) -> list[tuple[int, int]]:
    """mmseg's `MultiScaleFlipAug(img_scale, img_ratios)` + `Resize(keep_ratio=True)`: `(h, w)` per ratio."""
    scales = [(int(img_scale[0] * ratio), int(img_scale[1] * ratio)) for ratio in ratios]
    return [mmcv_rescale_size(width, height, scale)[::-1] for scale in scales]


@pytest.mark.parametrize("image_size", [(512, 683), (75, 113), (300, 2000), (683, 512), (481, 481)])
def test_multi_scale_sizes_are_the_authors(image_size):
    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (*image_size, 3), dtype=np.uint8))
    processor = DenseClipImageProcessor()  # (2048, 640), the ViT-B/16 test scale
    pixel_values = processor(image, scale_ratios=list(MULTI_SCALE_RATIOS), return_tensors="pt")["pixel_values"]
    expected = mmseg_multi_scale_sizes(*image_size, (2048, 640), MULTI_SCALE_RATIOS)
    assert [tuple(scale.shape) for scale in pixel_values] == [(1, 3, *size) for size in expected]
    # Each scale is exactly what a single-scale call at that size gives.
    single = processor(image, size={"shortest_edge": 480, "longest_edge": 1536}, return_tensors="pt")
    torch.testing.assert_close(pixel_values[1], single["pixel_values"], rtol=0, atol=0)


@pytest.mark.parametrize("img_scale", [(2048, 512), (256, 64), (100, 90)])
@pytest.mark.parametrize("image_size", [(512, 683), (75, 113), (20, 1000), (999, 37)])
def test_multi_scale_size_rule_for_other_scales(img_scale, image_size):
    processor = DenseClipImageProcessor(size={"shortest_edge": img_scale[1], "longest_edge": img_scale[0]})
    image = np.zeros((*image_size, 3), dtype=np.uint8)
    ratios = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 0.33]
    sizes = [array.shape[-2:] for (array,) in processor(image, scale_ratios=ratios)["pixel_values"]]
    assert sizes == mmseg_multi_scale_sizes(*image_size, img_scale, ratios)


def test_only_the_whole_image_path_rounds_to_the_size_divisor():
    image = np.zeros((512, 683, 3), dtype=np.uint8)
    slide = DenseClipImageProcessor()(image, return_tensors="pt")["pixel_values"]
    whole = DenseClipImageProcessor(test_mode="whole")(image, return_tensors="pt")["pixel_values"]
    with_labels = DenseClipImageProcessor()(image, np.zeros((512, 683), dtype=np.int64), return_tensors="pt")
    assert slide.shape[-2:] == (640, 854)  # mmcv: int(683 * 1.25 + 0.5)
    assert whole.shape[-2:] == (640, 864) and with_labels["pixel_values"].shape[-2:] == (640, 864)
    assert with_labels["labels"].shape[-2:] == (640, 864)
    multi = DenseClipImageProcessor(test_mode="whole")(image, scale_ratios=[0.5, 1.75], return_tensors="pt")
    assert [tuple(x.shape[-2:]) for x in multi["pixel_values"]] == [(320, 416), (1120, 1504)]


def test_multi_scale_batches_and_lists():
    images = [np.zeros((60, 90, 3), dtype=np.uint8), np.full((60, 90, 3), 255, dtype=np.uint8)]
    processor = DenseClipImageProcessor(size={"shortest_edge": 64, "longest_edge": 256})
    stacked = processor(images, scale_ratios=[0.5, 1.0], return_tensors="pt")["pixel_values"]
    assert [tuple(x.shape) for x in stacked] == [(2, 3, 32, 48), (2, 3, 64, 96)]
    arrays = processor(images, scale_ratios=[0.5, 1.0])["pixel_values"]
    assert [[a.shape for a in scale] for scale in arrays] == [[(3, 32, 48)] * 2, [(3, 64, 96)] * 2]
    np.testing.assert_array_equal(arrays[1][1], stacked[1][1].numpy())
    with pytest.raises(ValueError, match="different sizes"):
        processor([images[0], np.zeros((90, 60, 3), dtype=np.uint8)], scale_ratios=[1.0], return_tensors="pt")


def test_processor_protocol_setting_errors():
    image = np.zeros((40, 40, 3), dtype=np.uint8)
    processor = DenseClipImageProcessor()
    with pytest.raises(ValueError, match=r"test_mode must be one of \('slide', 'whole'\).*'sliding'"):
        processor(image, test_mode="sliding")
    for bad in ([], [0.5, -1.0]):
        with pytest.raises(ValueError, match="scale_ratios must be a non-empty list of positive numbers"):
            processor(image, scale_ratios=bad)
    with pytest.raises(Exception, match="Field 'scale_ratios' with value 1.0 doesn't match"):  # transformers' check
        processor(image, scale_ratios=1.0)
    with pytest.raises(ValueError, match="pass no segmentation_maps"):
        processor(image, np.zeros((40, 40), dtype=np.int64), scale_ratios=[1.0])


# ---------------------------------------------------------------------------------------------------------------------
# forward, the pipeline and post-processing
# ---------------------------------------------------------------------------------------------------------------------


def protocol_config(tokenizer, family: str, **overrides) -> DenseClipConfig:
    vision = {"vision_config": {"model_type": "denseclip_resnet_vision", **TINY_RESNET}} if family == "rn" else {}
    return tiny_config(tokenizer, **{"test_crop_size": 64, "test_stride": 43, **vision, **overrides})


@pytest.fixture(scope="module", params=FAMILIES)
def protocol_folder(request, tmp_path_factory, tokenizer):
    model = make_model(protocol_config(tokenizer, request.param), seed=3)  # a seed whose predictions vary
    with torch.no_grad():  # a decisive classifier, so that predictions are not ties
        model.decoder.head.classifier.weight.normal_(std=1.0)
    folder = tmp_path_factory.mktemp(f"protocol-{request.param}")
    model.save_pretrained(folder)
    DenseClipImageProcessor(size={"shortest_edge": 96, "longest_edge": 256}).save_pretrained(folder)
    return folder


# (75, 113) -> 96 x 145: 2 x 3 windows of 64. (20, 150) -> 34 x 256 (the long side binds): one row of 5 windows 34
# pixels high, taken whole (cut to 32 for the ViT's patch 16).
@pytest.mark.parametrize(("image_size", "input_size"), [((75, 113), (96, 145)), ((20, 150), (34, 256))])
def test_pipeline_equals_predict_probabilities(protocol_folder, image_size, input_size):
    image = Image.fromarray(np.random.RandomState(5).randint(0, 256, (*image_size, 3), dtype=np.uint8))
    model = DenseClipForSemanticSegmentation.from_pretrained(protocol_folder).eval()
    processor = DenseClipImageProcessor.from_pretrained(protocol_folder)
    pixel_values = processor(image, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape[-2:] == input_size
    expected = model.predict_probabilities(pixel_values, image_size).argmax(1)[0].numpy()
    assert len(np.unique(expected)) > 1, "a prediction worth comparing"
    segments = pipeline("image-segmentation", model=str(protocol_folder))(image)
    assert {segment["label"] for segment in segments} == {model.config.id2label[i] for i in np.unique(expected)}
    for segment in segments:
        class_id = model.config.label2id[segment["label"]]
        np.testing.assert_array_equal(np.asarray(segment["mask"]) > 0, expected == class_id)


def test_forward_is_the_single_pass_unless_a_protocol_is_asked_for(tokenizer):
    """The forward contract: `test_mode=None` is the single pass in training and eval mode alike (logits at 1/4, every
    output, hidden states honoured); `test_mode="slide"` runs the protocol (logits at the input size, nothing else),
    and refuses hidden states instead of dropping them."""
    torch.manual_seed(0)
    model = DenseClipForSemanticSegmentation(protocol_config(tokenizer, "vit")).eval()
    pixel_values, labels = torch.randn(2, 3, 80, 112), torch.randint(0, 4, (2, 80, 112))
    with torch.no_grad():
        default = model(pixel_values, output_hidden_states=True)
        plain = model(pixel_values, test_mode="plain")
        slide = model(pixel_values, test_mode="slide")
        with_labels = model(pixel_values, labels=labels)
        probabilities = model.predict_probabilities(pixel_values, (80, 112))
        model.train()
        torch.manual_seed(1)
        training = model(pixel_values)
        torch.manual_seed(1)
        training_plain = model(pixel_values, test_mode="plain")
    assert default.logits.shape == (2, 4, 20, 28) and default.score_map is not None
    assert len(default.hidden_states) == 5
    torch.testing.assert_close(default.logits, plain.logits, rtol=0, atol=0)
    assert slide.logits.shape == (2, 4, 80, 112)
    assert slide.score_map is None and slide.text_embeddings is None and slide.hidden_states is None
    torch.testing.assert_close(with_labels.logits, plain.logits, rtol=0, atol=0)
    assert with_labels.loss is not None
    assert training.logits.shape == plain.logits.shape
    torch.testing.assert_close(training.logits, training_plain.logits, rtol=0, atol=0)
    torch.testing.assert_close(probabilities, slide.logits.softmax(1), **TOLERANCE)
    model.eval()
    with pytest.raises(ValueError, match="no hidden states"):
        model(pixel_values, test_mode="slide", output_hidden_states=True)


def test_processor_output_asks_for_the_protocol(tokenizer):
    """`model(**processor(images=...))` runs the processor's `test_mode` (the pipeline's path); with label maps the
    processor asks for nothing, and the forward is the single pass with its loss."""
    torch.manual_seed(0)
    model = DenseClipForSemanticSegmentation(protocol_config(tokenizer, "vit")).eval()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 72, 3), dtype=np.uint8))
    for mode in ("slide", "whole"):
        processor = DenseClipImageProcessor(size={"shortest_edge": 64, "longest_edge": 256}, test_mode=mode)
        inputs = processor(images=image, return_tensors="pt")
        assert inputs["test_mode"] == mode
        with torch.no_grad():
            outputs = model(**inputs)
            expected = model(inputs["pixel_values"], test_mode=mode)
        torch.testing.assert_close(outputs.logits, expected.logits, rtol=0, atol=0)
        assert outputs.logits.shape[-2:] == inputs["pixel_values"].shape[-2:]
    labelled = processor(images=image, segmentation_maps=Image.new("L", (72, 48), 1), return_tensors="pt")
    assert "test_mode" not in labelled
    assert model(**labelled).loss is not None


def test_post_processing_of_plain_and_protocol_outputs(protocol_folder):
    model = DenseClipForSemanticSegmentation.from_pretrained(protocol_folder).eval()
    processor = DenseClipImageProcessor.from_pretrained(protocol_folder)
    pixel_values = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = model(pixel_values)
        protocol = model(pixel_values, test_mode=processor.test_mode)
    (plain_map,) = processor.post_process_semantic_segmentation(plain, target_sizes=[(50, 70)])
    upsampled = F.interpolate(plain.logits, size=(50, 70), mode="bilinear", align_corners=False)
    torch.testing.assert_close(plain_map, upsampled.argmax(1)[0], rtol=0, atol=0)
    (own_size,) = processor.post_process_semantic_segmentation(plain)
    assert own_size.shape == (16, 24)
    (protocol_map,) = processor.post_process_semantic_segmentation(protocol, target_sizes=[(50, 70)])
    expected = model.predict_probabilities(pixel_values, (50, 70)).argmax(1)[0]
    torch.testing.assert_close(protocol_map, expected, rtol=0, atol=0)


def test_protocol_defaults_are_the_authors(tokenizer):
    vit = DenseClipConfig()
    resnet = DenseClipConfig(vision_config={"model_type": "denseclip_resnet_vision"})
    assert (vit.test_mode, vit.test_crop_size, vit.test_stride) == ("slide", 640, 426)
    assert (resnet.test_mode, resnet.test_crop_size, resnet.test_stride) == ("slide", 512, 341)
    assert DenseClipConfig(test_crop_size=[512, 320]).test_stride == [341, 213]
    assert DenseClipConfig(test_crop_size=320, test_stride=100).test_stride == 100


def test_protocol_settings_survive_save_and_load(tokenizer, tmp_path):
    config = protocol_config(tokenizer, "rn", test_mode="whole", test_crop_size=[64, 96], test_stride=[32, 48])
    config.save_pretrained(tmp_path)
    loaded = DenseClipConfig.from_pretrained(tmp_path)
    assert (loaded.test_mode, loaded.test_crop_size, loaded.test_stride) == ("whole", [64, 96], [32, 48])


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(test_crop_size=72), r"`test_crop_size`=72 does not fit the model.*multiple of 16"),
        (dict(test_crop_size=16), r"`test_crop_size`=16 does not fit the model.*at least 32"),
        (dict(test_crop_size=[64, 64, 64]), r"`test_crop_size`=\[64, 64, 64\] must be a positive int or \[height"),
        (dict(test_stride=0), r"`test_stride`=0 must be a positive int.*no larger than the crop \[64, 64\]"),
        (dict(test_stride=65), r"`test_stride`=65 .*no larger than the crop.*here 42"),
        (dict(test_mode="sliding"), r"`test_mode`='sliding' must be one of \('slide', 'whole'\)"),
    ],
)
def test_bad_protocol_settings_are_explained(tokenizer, settings, message):
    with pytest.raises(Exception, match=message):
        tiny_config(tokenizer, **{"test_crop_size": 64, **settings})


def test_a_crop_given_without_a_stride_gets_its_own_stride(tokenizer):
    """One rule for the model and the evaluation script (`resolve_test_protocol`): a crop given without a stride gets
    two thirds of that crop, not the configured stride (which may be larger than the new crop)."""
    torch.manual_seed(0)
    model = DenseClipForSemanticSegmentation(protocol_config(tokenizer, "vit", test_crop_size=96, test_stride=64))
    model.eval()
    pixel_values = torch.randn(1, 3, 80, 112)
    got = model.predict_probabilities(pixel_values, (80, 112), crop_size=48)
    expected = model.predict_probabilities(pixel_values, (80, 112), crop_size=48, stride=32)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    protocol = EvaluationProtocol.for_model(model.config, crop_size=48)
    assert (protocol.crop_size, protocol.stride) == ((48, 48), (32, 32))


def test_bad_protocol_arguments_are_explained(tokenizer):
    model = DenseClipForSemanticSegmentation(protocol_config(tokenizer, "vit")).eval()
    pixel_values = torch.randn(1, 3, 64, 64)
    cases = [
        (dict(mode="sliding"), r"predict_probabilities: `mode`='sliding' must be one of"),
        (dict(crop_size=(64, 40)), r"predict_probabilities: `crop_size`=\(64, 40\) does not fit the model"),
        (dict(stride=0), r"predict_probabilities: `stride`=0 must be a positive int"),
        (dict(stride=100), r"predict_probabilities: `stride`=100 .*no larger than the crop \[64, 64\]"),
    ]
    for arguments, message in cases:
        with pytest.raises(ValueError, match=message):
            model.predict_probabilities(pixel_values, (64, 64), **arguments)
    with pytest.raises(ValueError, match=r"same images.*\(1, 3, 64, 64\), \(2, 3, 64, 64\)"):
        model.predict_probabilities([pixel_values, torch.randn(2, 3, 64, 64)], (64, 64))
    with pytest.raises(TypeError, match="non-empty list of them"):
        model.predict_probabilities([], (64, 64))
    with pytest.raises(ValueError, match=r"output_size must be \(height, width\)"):
        model.predict_probabilities(pixel_values, 64)
    with pytest.raises(ValueError, match=r"too small for the test protocol.*at least 32"):
        model.predict_probabilities(torch.randn(1, 3, 24, 64), (24, 64))
    with pytest.raises(ValueError, match=r"test_mode='tiles' is not one of \('plain', 'slide', 'whole'\)"):
        model(pixel_values, test_mode="tiles")
    with pytest.raises(ValueError, match="returns no loss: pass labels with test_mode='plain'"):
        model(pixel_values, labels=torch.zeros(1, 64, 64, dtype=torch.long), test_mode="slide")
    with pytest.raises(ValueError, match=r"`crop_size` and `stride` set the sliding windows; they do not apply"):
        model.predict_probabilities(pixel_values, (64, 64), mode="whole", crop_size=32)
    model.config.test_stride = 80  # settings changed after loading are checked when used
    with pytest.raises(ValueError, match=r"DenseClipConfig: `test_stride`=80"):
        model(pixel_values, test_mode="slide")
