"""`examples/train_det.py` runs: a short training run learns (COCO box AP above the untrained model's, on the same
images, by the same evaluation), writes a complete model repository (weights and code, processor, results, model card
with COCO AP in its model-index, prediction picture) that loads and pushes to the Hub, and a run resumed from a
checkpoint ends with the weights of an uninterrupted one, bit for bit."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from conftest import reset_accelerate
from hub_server import TOKEN
from huggingface_hub import HfApi, ModelCard
from PIL import Image
from safetensors.torch import load_file

from denseclip_hf import (
    DenseClipDetectionImageProcessor,
    DenseClipForInstanceSegmentation,
    DenseClipForObjectDetection,
)
from denseclip_hf.training.detection_arguments import parse_detection_training_args
from denseclip_hf.training.detection_data import load_detection_data
from denseclip_hf.training.detection_evaluation import evaluate_detection
from denseclip_hf.training.detection_task import DetectionTask
from denseclip_hf.training.loop import train
from denseclip_hf.training.model_loading import load_detection_model

SCRIPT = Path(__file__).parents[1] / "examples" / "train_det.py"
DDP_CONFIG = Path(__file__).parents[1] / "examples" / "accelerate_configs" / "multi_gpu.yaml"


def run_detection_training(argv: list[str]) -> dict:
    """`examples/train_det.py argv` in this process, with a fresh Accelerate state."""
    reset_accelerate()
    try:
        return train(parse_detection_training_args(argv))
    finally:
        reset_accelerate()


def untrained_box_ap(model_type: str, num_eval_samples: int) -> dict[str, float]:
    """The COCO metrics of the run's model before training (the same seed, config and initialization), by the same
    evaluation on the same validation images."""
    data = load_detection_data(max_train_samples=1, max_eval_samples=num_eval_samples)
    torch.manual_seed(42)  # the run's --seed: `set_seed` before the model is built
    model = load_detection_model(None, model_type, data.id2label, image_size=256)
    processor = DenseClipDetectionImageProcessor(size={"shortest_edge": 128, "longest_edge": 256})
    reset_accelerate()
    try:
        metrics = evaluate_detection(
            model, processor, data.validation, data.category_ids, Accelerator(), progress=False
        )
    finally:
        reset_accelerate()
    return metrics


def test_default_run_learns_and_publishes_a_complete_repository(tmp_path, hub):
    """A shortened `accelerate launch examples/train_det.py`: box AP50 several times the untrained model's, a complete
    output folder, and `--push_to_hub` uploads it (to the loopback Hub) where it loads by repo id."""
    output_dir = tmp_path / "denseclip-det-synthetic"
    argv = ["--output_dir", str(output_dir), "--max_train_steps", "100", "--num_warmup_steps", "10"]
    argv += ["--max_train_samples", "200", "--max_eval_samples", "24", "--per_device_train_batch_size", "4"]
    argv += ["--total_train_batch_size", "4", "--with_tracking", "--push_to_hub", "--hub_model_id", tmp_path.name]
    argv += ["--hub_token", TOKEN]
    results = run_detection_training(argv)
    untrained = untrained_box_ap("retinanet", 24)
    assert results["eval_bbox_mAP_50"] > max(5 * untrained["bbox_mAP_50"], 0.01), (results, untrained)
    assert results["eval_bbox_mAP"] > untrained["bbox_mAP"]

    written = json.loads((output_dir / "all_results.json").read_text())
    assert written["eval_bbox_mAP"] == results["eval_bbox_mAP"] and written["train_steps"] == 100
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "modeling_denseclip_detection.py"):
        assert (output_dir / name).is_file(), name
    card = ModelCard.load(output_dir / "README.md")
    box_ap = next(result for result in card.data.eval_results if result.metric_type == "box_AP")
    assert box_ap.metric_value == round(100 * results["eval_bbox_mAP"], 2)
    assert "Random CLIP weights" in card.text and "37.8" not in card.text  # no paper number for the synthetic recipe
    picture = Image.open(output_dir / "validation_predictions.png")
    assert picture.width > 2 * 160 and picture.height > 4 * 160
    assert any((output_dir / "runs").rglob("events.out.tfevents.*"))
    api = HfApi(token=TOKEN)
    repo_id = f"{api.whoami()['name']}/{tmp_path.name}"
    local = [path.relative_to(output_dir) for path in output_dir.rglob("*") if path.is_file()]
    expected = sorted(str(path) for path in local if path.parts[0] not in ("checkpoints", "runs"))
    assert sorted(api.list_repo_files(repo_id)) == expected
    pushed = DenseClipForObjectDetection.from_pretrained(repo_id)
    trained = load_file(output_dir / "model.safetensors")
    assert all(torch.equal(pushed.state_dict()[name], tensor) for name, tensor in trained.items())


@pytest.mark.parametrize("model_type", ["retinanet", "maskrcnn"])
def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, model_type):
    """4 steps with a checkpoint every 2 steps; then the run is restarted from its step-2 checkpoint (what a kill
    after it leaves: the later checkpoint and the output repository gone) and must reach the same weights, bit for
    bit: the grouped sampler, the flips, the samplers' generator (Mask R-CNN), dropout and the schedule resume."""
    output_dir = tmp_path / "run"
    argv = ["--output_dir", str(output_dir), "--model_type", model_type, "--max_train_steps", "4"]
    argv += ["--num_warmup_steps", "1", "--max_train_samples", "6", "--max_eval_samples", "2"]
    argv += ["--per_device_train_batch_size", "2", "--total_train_batch_size", "2", "--checkpointing_steps", "2"]
    argv += ["--max_grad_norm", "0.1", "--clip_text_encoder_gradients", "true"]
    first = run_detection_training(argv)
    uninterrupted = load_file(output_dir / "model.safetensors")
    shutil.rmtree(output_dir / "checkpoints" / "step_4")
    for path in output_dir.iterdir():
        if path.is_file():
            path.unlink()
    resumed = run_detection_training([*argv, "--resume_from_checkpoint", "latest"])
    weights = load_file(output_dir / "model.safetensors")
    assert set(weights) == set(uninterrupted)
    assert all(torch.equal(weights[name], uninterrupted[name]) for name in weights)
    assert resumed == {**first, "train_runtime_seconds": resumed["train_runtime_seconds"]}


def test_channels_last_run_trains_the_weights_of_the_default_layout(tmp_path):
    """`--channels_last` (the convolution weights, their gradients and AdamW's state in channels-last memory) trains
    the weights of the default layout up to float rounding: AdamW moves an element by about the learning rate
    whatever its gradient's size, so rounding can change an element by at most 2 x lr per step (where a tiny gradient
    flips sign); almost all elements agree far more closely. The saved weights load."""
    argv = ["--model_type", "maskrcnn", "--max_train_steps", "3", "--num_warmup_steps", "1", "--learning_rate", "1e-3"]
    argv += ["--max_train_samples", "4", "--max_eval_samples", "2", "--per_device_train_batch_size", "2"]
    argv += ["--total_train_batch_size", "2", "--checkpointing_steps", "100"]
    for layout in ("default", "channels_last"):
        flags = ["--channels_last"] if layout == "channels_last" else []
        run_detection_training([*argv, *flags, "--output_dir", str(tmp_path / layout)])
    default, channels_last = (
        load_file(tmp_path / layout / "model.safetensors") for layout in ("default", "channels_last")
    )
    assert set(default) == set(channels_last)
    differences = torch.cat([(channels_last[name] - default[name]).abs().flatten() for name in default])
    assert differences.max() <= 2 * 1e-3 * 3
    assert (differences <= 1e-6).float().mean() > 0.99, differences.quantile(0.99)
    model = DenseClipForInstanceSegmentation.from_pretrained(tmp_path / "channels_last")
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in channels_last.items())


def test_coco_recipe_validates_once_per_epoch(tmp_path, monkeypatch):
    """A COCO recipe (`--eval_steps epoch`, the authors' `evaluation = dict(interval=1)`) on a tiny dataset: 2 images
    in batches of 1 are 2 steps per epoch, so 3 epochs validate after steps 2 and 4, and at the end (step 6)."""
    validations = []
    validate = DetectionTask.validate

    def recording_validate(self, run, step):
        validations.append((step, run.steps_per_epoch, run.eval_steps))
        return validate(self, run, step)

    monkeypatch.setattr(DetectionTask, "validate", recording_validate)
    argv = ["--recipe", "coco-retinanet-denseclip-rn50", "--output_dir", str(tmp_path), "--num_train_epochs", "3"]
    argv += ["--image_scale", "256", "128", "--max_train_samples", "2", "--max_eval_samples", "1"]
    argv += ["--per_device_train_batch_size", "1", "--total_train_batch_size", "1", "--num_warmup_steps", "1"]
    argv += ["--dataloader_num_workers", "0", "--checkpointing_steps", "100"]
    results = run_detection_training(argv)
    assert results["train_steps"] == 6
    assert validations == [(2, 2, 2), (4, 2, 2), (6, 2, 2)]


def test_two_processes_train_and_validate_as_one(tmp_path):
    """`accelerate launch` with 2 CPU processes (DDP over gloo, the docs' config): the run's COCO AP equals a
    1-process evaluation of the saved model on the same 7 validation images (each image once, results gathered)."""
    output_dir = tmp_path / "out"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(DDP_CONFIG)]
    launcher += ["--num_processes", "2", "--main_process_port", str(port)]
    args = ["--output_dir", str(output_dir), "--max_train_steps", "3", "--num_warmup_steps", "1"]
    args += ["--max_train_samples", "12", "--max_eval_samples", "7", "--per_device_train_batch_size", "2"]
    args += ["--total_train_batch_size", "4", "--per_device_eval_batch_size", "1"]
    completed = subprocess.run(
        [*launcher, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "ACCELERATE_USE_CPU": "1"},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "Num processes: 2" in completed.stderr
    results = json.loads((output_dir / "all_results.json").read_text())
    assert results["total_train_batch_size"] == 4 and results["eval_samples"] == 7
    model = DenseClipForObjectDetection.from_pretrained(output_dir)
    processor = DenseClipDetectionImageProcessor.from_pretrained(output_dir)
    data = load_detection_data(max_train_samples=1, max_eval_samples=7)
    reset_accelerate()
    try:
        metrics = evaluate_detection(
            model, processor, data.validation, data.category_ids, Accelerator(), progress=False
        )
    finally:
        reset_accelerate()
    assert {f"eval_{name}": value for name, value in metrics.items()} == {
        name: value for name, value in results.items() if name.startswith("eval_bbox")
    }


def test_bf16_run(tmp_path, monkeypatch):
    """`--mixed_precision bf16` (Accelerate's bf16 autocast, on CPU too): training and COCO validation run."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    argv = ["--output_dir", str(tmp_path), "--max_train_steps", "2", "--num_warmup_steps", "1"]
    results = run_detection_training([*argv, "--max_train_samples", "4", "--max_eval_samples", "2"])
    assert results["train_steps"] == 2 and 0 <= results["eval_bbox_mAP"] <= 1
    assert (tmp_path / "model.safetensors").is_file()
