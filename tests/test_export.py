"""ONNX export (`denseclip_hf.export`) and ONNX Runtime inference (`denseclip_hf.onnx_inference`): the exported graph
against eager at five shapes per model (dynamic batch, height and width), the test protocol around it, int8, the
command line on a saved folder, running without torch, and the errors on bad input."""

import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from conftest import ENCODER_FAMILIES, make_model, tiny_config
from PIL import Image
from transformers import ResNetConfig

from denseclip_hf import DenseClipForSemanticSegmentation, DenseClipImageProcessor
from denseclip_hf.export import MINIMUM_INPUT_SIZE, export_onnx
from denseclip_hf.export import main as export_main
from denseclip_hf.onnx_inference import DenseClipOnnxSegmenter

# The exported variants: the CLIP ViT and ResNet DenseCLIP, and any backbone (a transformers ResNet) with the CLIP +
# Semantic FPN baseline's prompting (no text), each with a 64-pixel sliding window.
TINY_BACKBONE = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1]).to_dict()
VARIANTS = {
    "vit": dict(vision_config=ENCODER_FAMILIES["vit"].vision_config),
    "resnet": dict(vision_config={**ENCODER_FAMILIES["resnet"].vision_config, "layers": [1, 1, 1, 1]}),
    "backbone_baseline": dict(vision_config=TINY_BACKBONE, backbone_attention_pool_heads=4, prompting_type="none"),
}
SETTINGS = dict(test_crop_size=64, test_stride=48, context_decoder_layers=1)
# Five (batch, height, width) of the single pass each, batch 2 and non-square among them: multiples of the ViT's
# patch (16) and of the backbone's stride (32), which those encoders require; any size of the CLIP ResNet.
PLAIN_SHAPES = {
    "vit": [(1, 64, 64), (2, 80, 112), (1, 144, 64), (2, 64, 96), (3, 112, 80)],
    "resnet": [(1, 64, 64), (2, 70, 100), (1, 97, 65), (2, 129, 83), (3, 66, 90)],
    "backbone_baseline": [(1, 64, 64), (2, 96, 128), (1, 160, 64), (2, 64, 96), (3, 128, 96)],
}
# The test protocol takes any size: not multiples of the patch, windows cut to it.
PROTOCOL_SHAPES = [(1, 64, 96), (2, 70, 100), (1, 97, 131), (2, 150, 66), (1, 65, 200)]
TOLERANCE = dict(atol=1e-4, rtol=1e-4)


@dataclass
class Exported:
    variant: str
    model: DenseClipForSemanticSegmentation
    processor: DenseClipImageProcessor
    folder: Path
    segmenter: DenseClipOnnxSegmenter


def processor() -> DenseClipImageProcessor:
    return DenseClipImageProcessor(size={"shortest_edge": 64, "longest_edge": 256})


def random_images(count: int, size: tuple[int, int], seed: int = 0) -> list[Image.Image]:
    generator = np.random.default_rng(seed)
    return [Image.fromarray(generator.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(count)]


@pytest.fixture(scope="module", params=list(VARIANTS))
def exported(request, tmp_path_factory, tokenizer) -> Exported:
    """Each variant exported once: the ViT by the command line from a saved folder, the ResNet with dynamic int8
    quantization, the backbone baseline with static int8 quantization calibrated on 4 images."""
    variant = request.param
    model = make_model(tiny_config(tokenizer, **VARIANTS[variant], **SETTINGS))
    root = tmp_path_factory.mktemp(variant)
    if variant == "vit":
        model.save_pretrained(root / "model")
        processor().save_pretrained(root / "model")
        folder = export_main(["--model_name_or_path", str(root / "model"), "--output_dir", str(root / "onnx")])
    elif variant == "resnet":
        folder = export_onnx(model, processor(), root / "onnx", quantize="dynamic")
    else:
        calibration = random_images(4, (96, 128))
        folder = export_onnx(model, processor(), root / "onnx", quantize="static", calibration_images=calibration)
    return Exported(variant, model, processor(), folder, DenseClipOnnxSegmenter.from_pretrained(folder))


def test_single_pass_equals_eager_at_five_shapes(exported):
    generator = torch.Generator().manual_seed(1)
    for batch, height, width in PLAIN_SHAPES[exported.variant]:
        pixel_values = torch.randn(batch, 3, height, width, generator=generator)
        with torch.no_grad():
            expected = exported.model(pixel_values, test_mode="plain").logits
        got = exported.segmenter(pixel_values.numpy(), test_mode="plain").logits
        torch.testing.assert_close(torch.from_numpy(got), expected, **TOLERANCE, msg=f"{(batch, height, width)}")


@pytest.mark.parametrize("mode", ["slide", "whole"])
def test_test_protocol_equals_eager_at_five_shapes(exported, mode):
    generator = torch.Generator().manual_seed(2)
    for batch, height, width in PROTOCOL_SHAPES:
        pixel_values = torch.randn(batch, 3, height, width, generator=generator)
        with torch.no_grad():
            expected = exported.model(pixel_values, test_mode=mode).logits
        got = exported.segmenter(pixel_values.numpy(), test_mode=mode).logits
        assert got.shape == (batch, exported.model.config.num_labels, height, width)
        torch.testing.assert_close(torch.from_numpy(got), expected, **TOLERANCE, msg=f"{(batch, height, width)}")


@pytest.mark.parametrize("exported", ["vit"], indirect=True)
def test_multi_scale_flip_probabilities_equal_eager(exported):
    generator = torch.Generator().manual_seed(3)
    scales = [torch.randn(2, 3, 64, 90, generator=generator), torch.randn(2, 3, 97, 135, generator=generator)]
    expected = exported.model.predict_probabilities(scales, (75, 105), flip=True)
    got = exported.segmenter.predict_probabilities([scale.numpy() for scale in scales], (75, 105), flip=True)
    torch.testing.assert_close(torch.from_numpy(got), expected.contiguous(), **TOLERANCE)


def test_graph_has_dynamic_sizes_and_no_text_tower(exported):
    graph = onnx.load(exported.folder / "model.onnx").graph
    (pixel_values,) = graph.input
    dims = pixel_values.type.tensor_type.shape.dim
    assert [dim.HasField("dim_param") for dim in dims] == [True, False, True, True]
    assert dims[1].dim_value == 3
    # The class text embeddings are a constant: no tensor of the text tower (its token embedding table) is left.
    text_config = exported.model.config.text_config
    shapes = {tuple(initializer.dims) for initializer in graph.initializer}
    assert (text_config.vocab_size, text_config.hidden_size) not in shapes
    # The export leaves the model as it was.
    assert exported.model.base_model.has_text_tower == exported.model.base_model.prompting.uses_text


def test_folder_describes_the_graph(exported):
    config = exported.model.config
    spec = json.loads((exported.folder / "onnx_config.json").read_text())
    assert spec["num_labels"] == config.num_labels
    assert spec["id2label"] == {str(label): name for label, name in config.id2label.items()}
    assert spec["test_protocol"] == {"mode": "slide", "crop_size": [64, 64], "stride": [48, 48]}
    expected_multiple = {"vit": 16, "resnet": 1, "backbone_baseline": 32}[exported.variant]
    assert spec["input_size_multiple"] == expected_multiple and spec["minimum_input_size"] == MINIMUM_INPUT_SIZE
    assert [check["max_abs_difference"] < 1e-4 for check in spec["checked_against_eager"]] == [True, True]
    saved = DenseClipImageProcessor.from_pretrained(exported.folder).to_dict()
    assert {key: value for key, value in saved.items() if key != "auto_map"} == exported.processor.to_dict()
    for name in ("onnx_inference.py", "sliding_windows.py", "resize.onnx"):
        assert (exported.folder / name).is_file()


@pytest.mark.parametrize("exported", ["resnet", "backbone_baseline"], indirect=True)
def test_int8_model_is_quantized_and_close(exported):
    spec = json.loads((exported.folder / "onnx_config.json").read_text())
    method = spec["int8_quantization"]["method"]
    assert method == {"resnet": "dynamic", "backbone_baseline": "static"}[exported.variant]
    operators = {node.op_type for node in onnx.load(exported.folder / "model_int8.onnx").graph.node}
    expected_operators = {"dynamic": {"MatMulInteger", "DynamicQuantizeLinear"}, "static": {"QuantizeLinear"}}[method]
    assert expected_operators <= operators
    assert (exported.folder / "model_int8.onnx").stat().st_size < (exported.folder / "model.onnx").stat().st_size
    int8 = DenseClipOnnxSegmenter.from_pretrained(exported.folder, quantized=True)
    generator = torch.Generator().manual_seed(4)
    for batch, height, width in PLAIN_SHAPES[exported.variant]:
        pixel_values = torch.randn(batch, 3, height, width, generator=generator)
        with torch.no_grad():
            expected = exported.model(pixel_values, test_mode="plain").logits.numpy()
        got = int8(pixel_values.numpy(), test_mode="plain").logits
        assert got.shape == expected.shape
        # int8 rounding, larger than float rounding, that keeps the logits' pattern (the tiny random models are a worst
        # case: the static one's logits correlate at 0.98; docs/deployment.md measures the accuracy of a trained one).
        assert np.abs(got - expected).max() > 1e-5
        assert np.corrcoef(got.ravel(), expected.ravel())[0, 1] > 0.95


@pytest.mark.parametrize("exported", ["vit"], indirect=True)
def test_pipeline_like_use_gives_the_eager_label_maps(exported):
    images = random_images(2, (90, 120), seed=5)
    sizes = [(image.height, image.width) for image in images]
    pixel_values = exported.processor(images=images, return_tensors="np")["pixel_values"]
    outputs = exported.segmenter(pixel_values)  # the exported model's protocol: sliding windows
    with torch.no_grad():
        eager = exported.model(torch.from_numpy(pixel_values), test_mode="slide")
    expected = exported.processor.post_process_semantic_segmentation(eager, sizes)
    for got in (
        exported.segmenter.post_process_semantic_segmentation(outputs, sizes),
        exported.processor.post_process_semantic_segmentation(outputs, sizes),
    ):
        for label_map, expected_map, size in zip(got, expected, sizes, strict=True):
            label_map = torch.as_tensor(label_map)
            assert label_map.shape == size
            # Equal wherever eager's best class leads the second by more than float rounding.
            resized = F.interpolate(eager.logits, size=size, mode="bilinear", align_corners=False)
            top2 = resized[sizes.index(size)].topk(2, dim=0).values
            clear = (top2[0] - top2[1]) > 1e-5
            assert torch.equal(label_map[clear], expected_map[clear])


@pytest.mark.parametrize("exported", ["vit"], indirect=True)
def test_exported_folder_runs_without_torch(exported, tmp_path):
    pixel_values = torch.randn(1, 3, 70, 100, generator=torch.Generator().manual_seed(6))
    np.save(tmp_path / "pixel_values.npy", pixel_values.numpy())
    script = f"""
        import sys

        class _Absent:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers", "denseclip_hf"):
                    raise ImportError(f"{{name}} is not installed here")

        sys.meta_path.insert(0, _Absent())
        sys.path.insert(0, {str(exported.folder)!r})
        import numpy as np
        from onnx_inference import DenseClipOnnxSegmenter

        segmenter = DenseClipOnnxSegmenter.from_pretrained({str(exported.folder)!r})
        outputs = segmenter(np.load({str(tmp_path / "pixel_values.npy")!r}))
        np.save({str(tmp_path / "logits.npy")!r}, outputs.logits)
        assert not any(name.split(".")[0] == "torch" for name in sys.modules)
        """
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    with torch.no_grad():
        expected = exported.model(pixel_values, test_mode="slide").logits
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "logits.npy")), expected, **TOLERANCE)


@pytest.mark.parametrize("exported", ["vit"], indirect=True)
def test_segmenter_rejects_bad_input(exported, tmp_path):
    segmenter = exported.segmenter
    with pytest.raises(OSError, match="no onnx_config.json"):
        DenseClipOnnxSegmenter.from_pretrained(tmp_path)
    with pytest.raises(OSError, match="--quantize"):
        DenseClipOnnxSegmenter.from_pretrained(exported.folder, quantized=True)
    with pytest.raises(TypeError, match="floating-point"):
        segmenter(np.zeros((1, 3, 64, 64), dtype=np.uint8))
    with pytest.raises(ValueError, match="batch dimension"):
        segmenter(np.zeros((3, 64, 64), dtype=np.float32))
    with pytest.raises(ValueError, match=f"at least {MINIMUM_INPUT_SIZE}"):
        segmenter(np.zeros((1, 3, 48, 64), dtype=np.float32))
    with pytest.raises(ValueError, match="multiples of 16"):
        segmenter(np.zeros((1, 3, 70, 64), dtype=np.float32), test_mode="plain")
    with pytest.raises(ValueError, match="not one of"):
        segmenter.predict_probabilities(np.zeros((1, 3, 64, 64), dtype=np.float32), (64, 64), mode="tiles")
    with pytest.raises(ValueError, match="multiple of 16"):
        segmenter.predict_probabilities(np.zeros((1, 3, 64, 64), dtype=np.float32), (64, 64), crop_size=72)
    outputs = segmenter(np.zeros((1, 3, 64, 64), dtype=np.float32))
    with pytest.raises(ValueError, match="one positive"):
        segmenter.post_process_semantic_segmentation(outputs, [(64, 64), (32, 32)])


def test_export_rejects_bad_input(tokenizer, tiny_clip_dir, tmp_path, capsys):
    model = make_model(tiny_config(tokenizer, **SETTINGS))
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        export_onnx(model, processor(), tmp_path / "exists")
    with pytest.raises(TypeError, match="DenseClipForSemanticSegmentation"):
        export_onnx(model.base_model, processor(), tmp_path / "out")
    with pytest.raises(ValueError, match="not one of"):
        export_onnx(model, processor(), tmp_path / "out", quantize="int4")
    with pytest.raises(ValueError, match="calibration_images"):
        export_onnx(model, processor(), tmp_path / "out", quantize="static")
    for setting, value in [("prompting_type", "pre_model"), ("decoder_type", "upernet")]:
        with pytest.raises(ValueError, match=value):
            export_onnx(make_model(tiny_config(tokenizer, **{setting: value})), processor(), tmp_path / "out")
    assert not (tmp_path / "out").exists() and sorted(path.name for path in tmp_path.iterdir()) == ["exists"]

    model.save_pretrained(tmp_path / "no-processor")
    (tmp_path / "empty").mkdir()
    for folder, message in [
        (tiny_clip_dir, "is a 'clip' model, not DenseCLIP"),
        (tmp_path / "empty", "Could not load a model config"),
        (tmp_path / "no-processor", "no preprocessor_config.json"),
    ]:
        with pytest.raises(ValueError, match=message):
            export_main(["--model_name_or_path", str(folder), "--output_dir", str(tmp_path / "out")])
    with pytest.raises(SystemExit):
        export_main(["--model_name_or_path", str(tmp_path / "no-processor"), "--output_dir", str(tmp_path / "exists")])
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("exported", ["vit"], indirect=True)
@pytest.mark.parametrize(
    ("shape", "size"), [((2, 3, 16, 24), (64, 96)), ((1, 5, 13, 7), (4, 30)), ((3, 9, 64, 96), (37, 51))]
)
def test_resize_is_torchs_bilinear(exported, shape, size):
    logits = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    expected = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    got = exported.segmenter.resize(logits.numpy(), size)
    torch.testing.assert_close(torch.from_numpy(got), expected, **TOLERANCE)
