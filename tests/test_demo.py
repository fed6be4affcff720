"""The demo: `denseclip_hf.demo` on a saved tiny model, and `examples/app.py` served on loopback, driven by
`gradio_client` (the real Gradio server and client)."""

import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import CLASS_NAMES, tiny_config
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from denseclip_hf import (
    SYNTHETIC_CLASS_NAMES,
    DenseClipForSemanticSegmentation,
    DenseClipImageProcessor,
    load_synthetic_dataset,
)
from denseclip_hf.demo import DEFAULT_MODEL, SegmentationDemo
from denseclip_hf.training.arguments import parse_training_args
from denseclip_hf.visualization import (
    default_palette,
    prediction_grid,
    score_map_figure,
    score_map_grid,
    segmentation_figure,
    top_classes,
)

EXAMPLES = Path(__file__).parents[1] / "examples"
APP = EXAMPLES / "app.py"
PALETTE = [[230, 25, 75], [60, 180, 75], [0, 130, 200], [255, 225, 25]]


def save_tiny_model(folder: Path, tokenizer, **config) -> Path:
    torch.manual_seed(0)
    model = DenseClipForSemanticSegmentation(tiny_config(tokenizer, **config)).eval()
    with torch.no_grad():  # a decisive classifier, so that the prediction holds several classes
        model.decoder.head.classifier.weight.normal_(std=1.0)
    model.save_pretrained(folder)
    DenseClipImageProcessor(size={"shortest_edge": 64, "longest_edge": 256}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, tokenizer) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("denseclip-demo"), tokenizer, palette=PALETTE)


def scene(height: int = 48, width: int = 72) -> Image.Image:
    return Image.fromarray(np.random.RandomState(3).randint(0, 256, (height, width, 3), dtype=np.uint8))


def direct_outputs(folder: Path, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """The class ids at the image's size and the score map, computed with the model and processor directly."""
    model = DenseClipForSemanticSegmentation.from_pretrained(folder).eval()
    processor = DenseClipImageProcessor.from_pretrained(folder)
    with torch.no_grad():
        outputs = model(**processor(images=image, return_tensors="pt"))
        plain = model(processor(images=image, test_mode="whole", return_tensors="pt")["pixel_values"])
    label_map = processor.post_process_semantic_segmentation(outputs, target_sizes=[image.size[::-1]])[0]
    return label_map.numpy(), plain.score_map[0].numpy()


def expected_overlay(image: Image.Image, label_map: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    colors = np.asarray(PALETTE, dtype=np.float64)[label_map]
    return np.rint((1 - alpha) * np.asarray(image, dtype=np.float64) + alpha * colors).astype(np.uint8)


def test_segment_matches_the_model_run_directly(model_folder):
    image = scene()
    label_map, score_map = direct_outputs(model_folder, image)
    assert len(np.unique(label_map)) > 1
    demo = SegmentationDemo.from_pretrained(model_folder)
    segmentation = demo.segment(image)
    np.testing.assert_array_equal(segmentation.label_map, label_map)
    np.testing.assert_allclose(segmentation.score_map, score_map, atol=1e-6)
    overlay, heatmap = demo.pictures(image, "sky")
    np.testing.assert_array_equal(np.asarray(overlay)[:48, :72], expected_overlay(image, label_map))
    np.testing.assert_array_equal(np.asarray(heatmap), np.asarray(score_map_figure(image, score_map, CLASS_NAMES, 2)))


def test_baseline_without_text_segments_with_no_score_map(tmp_path, tokenizer):
    """The CLIP + Semantic FPN baseline has no score map: the demo gives the segmentation alone."""
    folder = save_tiny_model(tmp_path, tokenizer, palette=PALETTE, prompting_type="none")
    image = scene()
    model = DenseClipForSemanticSegmentation.from_pretrained(folder).eval()
    processor = DenseClipImageProcessor.from_pretrained(folder)
    with torch.no_grad():
        outputs = model(**processor(images=image, return_tensors="pt"))
    label_map = processor.post_process_semantic_segmentation(outputs, target_sizes=[image.size[::-1]])[0].numpy()
    demo = SegmentationDemo.from_pretrained(folder)
    segmentation = demo.segment(image)
    np.testing.assert_array_equal(segmentation.label_map, label_map)
    assert segmentation.score_map is None
    overlay, heatmap = demo.pictures(image)
    assert heatmap is None
    np.testing.assert_array_equal(np.asarray(overlay)[:48, :72], expected_overlay(image, label_map))


def test_default_model_is_where_the_default_training_run_saves(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_training_args([]).checkpoints.output_dir == DEFAULT_MODEL
    with pytest.raises(FileNotFoundError, match="accelerate launch examples/train_seg.py"):
        SegmentationDemo.from_pretrained()
    with pytest.raises(FileNotFoundError, match="No model folder at ./missing"):
        SegmentationDemo.from_pretrained("./missing")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _environment(tmp_path: Path) -> dict:
    source = str(Path(__file__).parents[1] / "src")
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([source, os.environ.get("PYTHONPATH", "")]),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "GRADIO_TEMP_DIR": str(tmp_path / "gradio"),
        "HF_HUB_OFFLINE": "1",
    }


def test_app_without_a_trained_model_says_how_to_get_one(tmp_path):
    result = subprocess.run(
        [sys.executable, str(APP)],
        cwd=tmp_path,
        env=_environment(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "No model folder at outputs/denseclip-synthetic" in result.stderr
    assert "accelerate launch examples/train_seg.py" in result.stderr


def test_app_serves_the_pictures(model_folder, tmp_path):
    image = scene()
    image.save(tmp_path / "scene.png")
    label_map, score_map = direct_outputs(model_folder, image)
    port = _free_port()
    log = (tmp_path / "app.log").open("w")
    server = subprocess.Popen(  # the model from $DENSECLIP_MODEL, as on a Space
        [sys.executable, str(APP), "--server_port", str(port)],
        env={**_environment(tmp_path), "DENSECLIP_MODEL": str(model_folder)},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        client = _connect(f"http://127.0.0.1:{port}/", server, tmp_path)
        overlay_path, heatmap_path = client.predict(
            handle_file(tmp_path / "scene.png"), "sky", False, api_name="/segment"
        )
        overlay, heatmap = Image.open(overlay_path), Image.open(heatmap_path)
        assert overlay.format == heatmap.format == "PNG"  # lossless, so colours compare exactly
        assert overlay.width >= 72 and overlay.height > 48
        np.testing.assert_array_equal(np.asarray(overlay.convert("RGB"))[:48, :72], expected_overlay(image, label_map))
        expected_heatmap = score_map_figure(image, score_map, CLASS_NAMES, "sky")
        assert heatmap.size == expected_heatmap.size
        np.testing.assert_array_equal(np.asarray(heatmap.convert("RGB")), np.asarray(expected_heatmap))

        # No class chosen: the best-matching one; every class in the legend: a taller legend.
        all_path, best_path = client.predict(handle_file(tmp_path / "scene.png"), None, True, api_name="/segment")
        every_class = segmentation_figure(image, label_map, CLASS_NAMES, PALETTE, legend="all")
        np.testing.assert_array_equal(np.asarray(Image.open(all_path).convert("RGB")), np.asarray(every_class))
        best = score_map_figure(image, score_map, CLASS_NAMES, top_classes(score_map, 1)[0])
        np.testing.assert_array_equal(np.asarray(Image.open(best_path).convert("RGB")), np.asarray(best))
        with pytest.raises(AppError, match="Upload an image first"):
            client.predict(None, "sky", False, api_name="/segment")
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


def _connect(url: str, server: subprocess.Popen, tmp_path: Path, timeout: float = 240) -> Client:
    """A client of the app at `url` once it answers (starting Gradio and torch takes a while on 2 cores)."""
    deadline = time.monotonic() + timeout
    while True:
        if server.poll() is not None:
            raise AssertionError(f"The app exited with {server.returncode}:\n{(tmp_path / 'app.log').read_text()}")
        try:
            return Client(url, verbose=False, download_files=str(tmp_path / "downloads"))
        except httpx.TransportError:  # not listening yet
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def run_example(name: str, argv: list[str]):
    """`examples/NAME.py argv` in this process."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def test_visualize_script_on_image_files(model_folder, tmp_path):
    image = scene()
    image.save(tmp_path / "street.png")
    argv = ["--model_name_or_path", str(model_folder), "--images", str(tmp_path / "street.png")]
    written = run_example("visualize", [*argv, "--output_dir", str(tmp_path / "pictures")])
    assert [path.name for path in written] == ["street_segmentation.png", "street_score_maps.png", "predictions.png"]
    label_map, score_map = direct_outputs(model_folder, image)
    segmentation, score_maps, predictions = (np.asarray(Image.open(path)) for path in written)
    np.testing.assert_array_equal(segmentation[:48, :72], expected_overlay(image, label_map))
    np.testing.assert_array_equal(score_maps, np.asarray(score_map_grid(image, score_map, CLASS_NAMES, top_k=4)))
    np.testing.assert_array_equal(
        predictions, np.asarray(prediction_grid([image], [label_map], CLASS_NAMES, palette=PALETTE))
    )


def test_visualize_script_on_synthetic_scenes(tmp_path, tokenizer):
    folder = save_tiny_model(tmp_path / "model", tokenizer, class_names=SYNTHETIC_CLASS_NAMES)
    written = run_example(
        "visualize", ["--model_name_or_path", str(folder), "--synthetic", "2", "--output_dir", str(tmp_path / "out")]
    )
    assert len(written) == 5
    scenes = load_synthetic_dataset("validation", 2)
    images = [scene["image"] for scene in scenes]
    predictions = [direct_outputs(folder, image)[0] for image in images]
    expected = prediction_grid(
        images,
        predictions,
        SYNTHETIC_CLASS_NAMES,
        ground_truths=[np.asarray(s["label"]) for s in scenes],
        palette=default_palette(len(SYNTHETIC_CLASS_NAMES)),
    )
    np.testing.assert_array_equal(np.asarray(Image.open(written[-1])), np.asarray(expected))
