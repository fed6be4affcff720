"""A saved model folder: what it holds, Auto classes, the image-segmentation pipeline, loading without the package;
and what `import denseclip_hf` loads."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import CLASS_NAMES, make_model, run_without_denseclip_hf, tiny_config
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForSemanticSegmentation, pipeline

from denseclip_hf import DenseClipConfig, DenseClipForSemanticSegmentation, DenseClipImageProcessor, DenseClipModel

# The model's code: the model file and the modules it runs with (each concern in its own file).
MODEL_CODE = [
    "configuration_denseclip.py",
    "loading_denseclip.py",
    "loss_denseclip.py",
    "modeling_clip_resnet.py",
    "modeling_denseclip.py",
    "protocol_denseclip.py",
    "sliding_windows.py",
    "tensor_ops.py",
]
MODEL_FILES = sorted(["config.json", "model.safetensors", *MODEL_CODE])
PROCESSOR_FILES = ["image_processing_denseclip.py", "preprocessor_config.json"]


@pytest.fixture(scope="module")
def saved_folder(request, tmp_path_factory, tokenizer):
    """A saved tiny model, of `prompting_type=request.param` where a test parametrizes it (post-model otherwise)."""
    torch.manual_seed(0)
    prompting_type = getattr(request, "param", "post_model")
    model = DenseClipForSemanticSegmentation(tiny_config(tokenizer, prompting_type=prompting_type)).eval()
    with torch.no_grad():  # a decisive classifier, so that predictions are not ties
        model.decoder.head.classifier.weight.normal_(std=1.0)
    folder = tmp_path_factory.mktemp("denseclip-tiny")
    model.save_pretrained(folder)
    DenseClipImageProcessor(size={"shortest_edge": 64, "longest_edge": 256}).save_pretrained(folder)
    return folder


def scene(height: int = 48, width: int = 72) -> Image.Image:
    rng = np.random.RandomState(3)
    return Image.fromarray(rng.randint(0, 256, (height, width, 3), dtype=np.uint8))


def reference_segmentation(folder, image: Image.Image) -> np.ndarray:
    """Class ids computed directly with the model and the processor, at the image's size."""
    model = DenseClipForSemanticSegmentation.from_pretrained(folder).eval()
    processor = DenseClipImageProcessor.from_pretrained(folder)
    with torch.no_grad():
        outputs = model(**processor(images=image, return_tensors="pt"))
    return processor.post_process_semantic_segmentation(outputs, target_sizes=[image.size[::-1]])[0].numpy()


def test_folder_holds_only_what_running_the_model_needs(saved_folder, tokenizer, tmp_path):
    """Weights, config and the code files of the model (and processor): no converter, no training code."""
    assert sorted(os.listdir(saved_folder)) == sorted(MODEL_FILES + PROCESSOR_FILES)
    make_model(tiny_config(tokenizer)).save_pretrained(tmp_path / "model")
    assert sorted(os.listdir(tmp_path / "model")) == MODEL_FILES
    make_model(tiny_config(tokenizer)).denseclip.save_pretrained(tmp_path / "base")
    assert sorted(os.listdir(tmp_path / "base")) == MODEL_FILES
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_denseclip.DenseClipModel"
    assert type(AutoModel.from_pretrained(tmp_path / "base")) is DenseClipModel


def test_import_loads_no_converter_and_exports_them_lazily():
    script = """
import sys
import denseclip_hf
loaded = sorted(name for name in sys.modules if name.startswith("denseclip_hf."))
assert loaded == [
    "denseclip_hf.assets",
    "denseclip_hf.box_ops",
    "denseclip_hf.configuration_denseclip",
    "denseclip_hf.configuration_denseclip_detection",
    "denseclip_hf.image_processing_denseclip",
    "denseclip_hf.image_processing_denseclip_detection",
    "denseclip_hf.loading_denseclip",
    "denseclip_hf.loss_denseclip",
    "denseclip_hf.loss_denseclip_detection",
    "denseclip_hf.modeling_clip_resnet",
    "denseclip_hf.modeling_denseclip",
    "denseclip_hf.modeling_denseclip_detection",
    "denseclip_hf.protocol_denseclip",
    "denseclip_hf.sliding_windows",
    "denseclip_hf.tensor_ops",
], loaded
assert "cv2" not in sys.modules and "pycocotools" not in sys.modules  # the detection extra, loaded when used
from denseclip_hf.checkpoint_conversion import convert_clip_checkpoint
from denseclip_hf.convert_denseclip_original_to_hf import convert_denseclip_checkpoint
assert denseclip_hf.convert_clip_checkpoint is convert_clip_checkpoint
assert denseclip_hf.convert_denseclip_checkpoint is convert_denseclip_checkpoint
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_folder_has_code_and_auto_map(saved_folder):
    config = json.loads((saved_folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_denseclip.DenseClipConfig",
        "AutoModelForSemanticSegmentation": "modeling_denseclip.DenseClipForSemanticSegmentation",
    }
    processor_config = json.loads((saved_folder / "preprocessor_config.json").read_text())
    assert processor_config["auto_map"] == {"AutoImageProcessor": "image_processing_denseclip.DenseClipImageProcessor"}
    for name in ("configuration_denseclip.py", "modeling_denseclip.py", "image_processing_denseclip.py"):
        assert (saved_folder / name).is_file(), name


def test_auto_classes_resolve_to_the_package(saved_folder):
    assert type(AutoConfig.from_pretrained(saved_folder)) is DenseClipConfig
    assert type(AutoModelForSemanticSegmentation.from_pretrained(saved_folder)) is DenseClipForSemanticSegmentation
    assert type(AutoImageProcessor.from_pretrained(saved_folder)) is DenseClipImageProcessor


def test_pipeline_returns_named_masks(saved_folder, monkeypatch):
    questions = []
    monkeypatch.setattr("builtins.input", lambda prompt="": questions.append(prompt) or "n")
    image = scene()
    segments = pipeline("image-segmentation", model=str(saved_folder))(image)
    assert not questions, questions  # no "run the custom code? [y/N]" prompt when the package is installed
    expected = reference_segmentation(saved_folder, image)
    assert {segment["label"] for segment in segments} == {CLASS_NAMES[i] for i in np.unique(expected)}
    for segment in segments:
        assert segment["score"] is None and segment["mask"].size == image.size
        class_id = CLASS_NAMES.index(segment["label"])
        np.testing.assert_array_equal(np.asarray(segment["mask"]) > 0, expected == class_id)


@pytest.mark.parametrize("saved_folder", ["post_model", "language_only", "pre_model", "none"], indirect=True)
def test_loads_with_trust_remote_code_without_the_package(saved_folder, tmp_path):
    image = scene()
    image.save(tmp_path / "scene.png")
    expected = reference_segmentation(saved_folder, image)
    np.save(tmp_path / "expected.npy", expected)
    run_without_denseclip_hf(
        f"""
        import numpy as np
        import torch
        from PIL import Image
        from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation, pipeline

        folder, image = {str(saved_folder)!r}, Image.open({str(tmp_path / "scene.png")!r})
        model = AutoModelForSemanticSegmentation.from_pretrained(folder, trust_remote_code=True).eval()
        processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
        assert "denseclip_hf" not in sys.modules
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert not any(p.requires_grad for n, p in model.named_parameters() if ".text_encoder." in n)
        with torch.no_grad():
            outputs = model(**processor(images=image, return_tensors="pt"))
        ids = processor.post_process_semantic_segmentation(outputs, target_sizes=[image.size[::-1]])[0].numpy()
        np.testing.assert_array_equal(ids, np.load({str(tmp_path / "expected.npy")!r}))
        segments = pipeline("image-segmentation", model=folder, trust_remote_code=True)(image)
        assert segments and all(s["label"] in model.config.id2label.values() for s in segments)
        """,
        tmp_path,
    )


def test_remote_code_explains_that_checkpoint_files_need_the_package(saved_folder, tmp_path):
    """`from_clip_pretrained` on an OpenAI/OpenCLIP file calls the converter, which remote code does not have."""
    (tmp_path / "RN50.pt").write_bytes(b"not read")
    run_without_denseclip_hf(
        f"""
        from transformers import AutoModelForSemanticSegmentation

        model = AutoModelForSemanticSegmentation.from_pretrained({str(saved_folder)!r}, trust_remote_code=True)
        try:
            type(model).from_clip_pretrained({str(tmp_path / "RN50.pt")!r}, id2label={{0: "wall"}})
        except ImportError as error:
            message = str(error)
        else:
            raise AssertionError("no error")
        assert "needs the denseclip_hf package" in message and "convert_clip_original_to_hf" in message, message
        """,
        tmp_path,
    )
