"""End-to-end training on CPU: it learns, the output folder is a usable model repository, and 2 processes launched
with the DDP config file give exactly the metrics of 1 (crashes and resuming: test_training_crashes.py)."""

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from conftest import reset_accelerate, run_in_process
from hub_server import TOKEN
from huggingface_hub import HfApi, ModelCard
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoImageProcessor, ResNetConfig, ResNetForImageClassification, SwinConfig

from denseclip_hf import DenseClipForSemanticSegmentation
from denseclip_hf.synthetic import SYNTHETIC_CLASS_NAMES, load_synthetic_dataset
from denseclip_hf.training.data import evaluation_dataloader
from denseclip_hf.training.evaluation import EvaluationProtocol, evaluate
from denseclip_hf.training.metrics import segmentation_metrics

SCRIPT = Path(__file__).parents[1] / "examples" / "train_seg.py"
DDP_CONFIG = Path(__file__).parents[1] / "examples" / "accelerate_configs" / "multi_gpu.yaml"
NUM_LABELS = len(SYNTHETIC_CLASS_NAMES)


def numpy_confusion(prediction: np.ndarray, label: np.ndarray, num_labels: int) -> np.ndarray:
    valid = label < num_labels
    return np.bincount(label[valid] * num_labels + prediction[valid], minlength=num_labels**2).reshape(
        num_labels, num_labels
    )


def chance_miou(num_eval_samples: int) -> float:
    """The mIoU of the better of two trivial predictors on the first validation scenes: the most frequent class
    everywhere, or a uniformly random class."""
    labels = np.concatenate(
        [np.asarray(ex["label"]).ravel() for ex in load_synthetic_dataset("validation", num_eval_samples)]
    )
    counts = np.bincount(labels[labels != 255], minlength=NUM_LABELS)
    majority_class_miou = counts.max() / counts.sum() / np.count_nonzero(counts)  # predict the most frequent class
    return max(majority_class_miou, 1 / NUM_LABELS)


@pytest.mark.parametrize("prompting_type", ["post_model", "language_only", "pre_model", "none"])
def test_default_run_learns(tmp_path, hub, prompting_type):
    """A shortened `accelerate launch examples/train_seg.py`, with each prompting: mIoU far above chance, a complete
    output folder, and `--push_to_hub` uploads that folder (to the loopback Hub, through the real client), which loads
    by repo id."""
    output_dir = tmp_path / "denseclip-synthetic"
    argv = ["--output_dir", str(output_dir), "--max_train_steps", "150", "--num_warmup_steps", "10", "--with_tracking"]
    argv += ["--prompting_type", prompting_type]
    argv += ["--push_to_hub", "--hub_model_id", tmp_path.name, "--hub_token", TOKEN]  # no namespace: the token's user
    results = run_in_process([*argv, "--max_train_samples", "200", "--max_eval_samples", "40"])

    chance = chance_miou(40)
    assert results["eval_mean_iou"] > 3 * chance, (results["eval_mean_iou"], chance)
    assert results["eval_overall_accuracy"] > 0.7

    written = json.loads((output_dir / "all_results.json").read_text())
    assert written["eval_mean_iou"] == results["eval_mean_iou"]
    assert set(written["eval_per_category_iou"]) == set(SYNTHETIC_CLASS_NAMES)
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "modeling_denseclip.py"):
        assert (output_dir / name).is_file(), name
    config = json.loads((output_dir / "config.json").read_text())
    assert (
        config["auto_map"]["AutoModelForSemanticSegmentation"] == "modeling_denseclip.DenseClipForSemanticSegmentation"
    )
    card = (output_dir / "README.md").read_text()
    assert "Random CLIP weights" in card and f"{100 * results['eval_mean_iou']:.2f}" in card and "pipeline(" in card
    (miou, *_) = ModelCard.load(output_dir / "README.md").data.eval_results
    assert miou.metric_type == "mean_iou" and miou.metric_value == round(100 * results["eval_mean_iou"], 2)
    grid = Image.open(output_dir / "validation_predictions.png")
    assert grid.width > 3 * 160 and grid.height > 6 * 160
    api = HfApi(token=TOKEN)
    repo_id = f"{api.whoami()['name']}/{tmp_path.name}"
    local_files = [path.relative_to(output_dir) for path in output_dir.rglob("*") if path.is_file()]
    expected = sorted(str(path) for path in local_files if path.parts[0] not in ("checkpoints", "runs"))
    assert sorted(api.list_repo_files(repo_id)) == expected and "README.md" in expected
    pushed = DenseClipForSemanticSegmentation.from_pretrained(repo_id)
    assert pushed.config.prompting_type == prompting_type
    trained = load_file(output_dir / "model.safetensors")
    assert all(torch.equal(pushed.state_dict()[name], tensor) for name, tensor in trained.items())


def test_training_starts_from_clip_and_denseclip_checkpoints(tiny_clip_dir, tmp_path, caplog):
    """A CLIP checkpoint gets DenseCLIP modules and the dataset's class prompts; a DenseCLIP output folder fine-tunes
    further; a DenseCLIP checkpoint with other classes is refused."""
    quick = [
        "--max_train_steps",
        "2",
        "--num_warmup_steps",
        "1",
        "--max_train_samples",
        "8",
        "--max_eval_samples",
        "2",
    ]
    quick += ["--eval_steps", "1", "--checkpointing_steps", "epoch"]
    from_clip = tmp_path / "from-clip"
    with caplog.at_level(logging.INFO):
        run_in_process([*quick, "--model_name_or_path", str(tiny_clip_dir), "--output_dir", str(from_clip)])
    assert "step 1: mIoU" in caplog.text and (from_clip / "checkpoints" / "step_2").is_dir()
    config = json.loads((from_clip / "config.json").read_text())
    assert config["id2label"]["0"] == SYNTHETIC_CLASS_NAMES[0] and config["vision_config"]["hidden_size"] == 32
    assert config["vision_config"]["image_size"] == 96  # CLIP's positions resized to the crop, as the authors do

    run_in_process([*quick, "--model_name_or_path", str(from_clip), "--output_dir", str(tmp_path / "again")])
    assert (tmp_path / "again" / "model.safetensors").is_file()
    (tmp_path / "names.json").write_text(json.dumps(SYNTHETIC_CLASS_NAMES[::-1]))
    with pytest.raises(ValueError, match="predicts 10 classes"):
        run_in_process([*quick, "--model_name_or_path", str(from_clip), "--id2label", str(tmp_path / "names.json")])


@pytest.mark.parametrize(
    "backbone, decoder_type",
    [
        (
            SwinConfig(image_size=96, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8], window_size=3),
            "upernet",
        ),
        (ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1]), "semantic_fpn"),
    ],
    ids=["swin-upernet", "resnet-semantic_fpn"],
)
def test_any_backbone_run_learns(tmp_path, backbone, decoder_type):
    """Any backbone (random weights, from its config.json) with the small random text tower learns the synthetic
    scenes, with either decoder."""
    backbone.to_json_file(tmp_path / "backbone.json")
    argv = ["--output_dir", str(tmp_path / "out"), "--max_train_steps", "300", "--num_warmup_steps", "10"]
    argv += ["--max_train_samples", "200", "--max_eval_samples", "40", "--decode_head_channels", "32"]
    results = run_in_process(
        [*argv, "--backbone_name_or_path", str(tmp_path / "backbone.json"), "--decoder_type", decoder_type]
    )
    assert results["eval_mean_iou"] > 2 * chance_miou(40) and results["eval_overall_accuracy"] > 0.6, results
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["vision_config"]["model_type"], config["decoder_type"]) == (backbone.model_type, decoder_type)


def test_training_starts_from_a_backbone_checkpoint(tiny_clip_dir, tmp_path):
    """`--backbone_name_or_path` a backbone checkpoint folder, `--model_name_or_path` the CLIP of the text tower."""
    torch.manual_seed(0)
    ResNetForImageClassification(
        ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1])
    ).save_pretrained(tmp_path / "resnet")
    argv = ["--max_train_steps", "2", "--num_warmup_steps", "1", "--max_train_samples", "8", "--max_eval_samples", "2"]
    argv += ["--model_name_or_path", str(tiny_clip_dir), "--backbone_name_or_path", str(tmp_path / "resnet")]
    run_in_process([*argv, "--decoder_type", "upernet", "--output_dir", str(tmp_path / "out")])
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["vision_config"]["model_type"] == "resnet" and config["text_config"]["hidden_size"] == 16
    assert config["backbone_attention_pool_image_size"] == 96  # the pool's positions resized to the crop
    with pytest.raises(ValueError, match="is a config file"):
        (tmp_path / "resnet.json").write_text((tmp_path / "resnet" / "config.json").read_text())
        run_in_process([*argv[:-1], str(tmp_path / "resnet.json"), "--output_dir", str(tmp_path / "bad")])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> Path:
    """`accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml --num_processes 2
    examples/train_seg.py` on CPU (the docs' DDP file), shortened; returns its output folder."""
    output_dir = tmp_path_factory.mktemp("two-processes") / "out"
    # `accelerate launch --cpu` starts one process without MPI; the DDP launch + ACCELERATE_USE_CPU=1 starts 2 CPU
    # processes that talk through gloo.
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(DDP_CONFIG)]
    launcher += ["--num_processes", "2", "--main_process_port", str(_free_port())]
    # 7 validation images over 2 processes: the last batch is evened out with a repeated image that must not count.
    args = ["--output_dir", str(output_dir), "--max_train_steps", "8", "--num_warmup_steps", "2"]
    args += ["--max_train_samples", "32", "--max_eval_samples", "7", "--per_device_train_batch_size", "4"]
    args += ["--per_device_eval_batch_size", "1"]
    environment = {**os.environ, "ACCELERATE_USE_CPU": "1"}
    completed = subprocess.run(
        [*launcher, str(SCRIPT), *args], capture_output=True, text=True, timeout=600, env=environment
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert (
        "Num processes: 2" in completed.stderr
        and "Distributed environment: DistributedType.MULTI_CPU" in completed.stderr
    )
    return output_dir


def test_two_processes_give_the_metrics_of_one(two_process_run):
    """The 2-process validation equals a 1-process validation of the saved model on the same 7 images."""
    results = json.loads((two_process_run / "all_results.json").read_text())
    model = DenseClipForSemanticSegmentation.from_pretrained(two_process_run)
    processor = AutoImageProcessor.from_pretrained(two_process_run)
    validation = load_synthetic_dataset("validation", 7).select_columns(["image", "label"])
    reset_accelerate()
    try:
        accelerator = Accelerator()
        dataloader = accelerator.prepare(evaluation_dataloader(validation, processor, batch_size=1))
        protocol = EvaluationProtocol.for_model(model.config)
        confusion = evaluate(model, dataloader, accelerator, protocol, NUM_LABELS, ignore_index=255)
    finally:
        reset_accelerate()
    assert confusion.sum() == sum(np.count_nonzero(np.asarray(ex["label"]) != 255) for ex in validation)
    metrics = segmentation_metrics(confusion, model.config.id2label)
    assert {name: results[f"eval_{name}"] for name in metrics} == metrics
    assert results["eval_samples"] == 7


# Runs in a fresh interpreter that never imports denseclip_hf: the output folder must work as a Hub repository.
REEVALUATE = """
import json, sys
from pathlib import Path
import numpy as np, torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation, pipeline

repo, data = Path(sys.argv[1]), Path(sys.argv[2])
model = AutoModelForSemanticSegmentation.from_pretrained(repo, trust_remote_code=True).eval()
processor = AutoImageProcessor.from_pretrained(repo, trust_remote_code=True)
num_labels = model.config.num_labels
confusion = np.zeros((num_labels, num_labels), dtype=np.int64)
predictions = []
for image_path in sorted(data.glob("image_*.png")):
    image = Image.open(image_path)
    label = np.asarray(Image.open(data / image_path.name.replace("image", "label"))).astype(np.int64)
    with torch.no_grad():
        outputs = model(**processor(images=image, return_tensors="pt"))
    prediction = processor.post_process_semantic_segmentation(outputs, target_sizes=[label.shape])[0].numpy()
    predictions.append(prediction)
    valid = label < num_labels
    confusion += np.bincount(label[valid] * num_labels + prediction[valid], minlength=num_labels**2).reshape(
        num_labels, num_labels
    )
intersection = np.diag(confusion)
union = confusion.sum(0) + confusion.sum(1) - intersection
segments = pipeline("image-segmentation", model=model, image_processor=processor)(Image.open(data / "image_0.png"))
from_pipeline = np.full(predictions[0].shape, -1)
for segment in segments:
    from_pipeline[np.asarray(segment["mask"]) > 0] = model.config.label2id[segment["label"]]
print(json.dumps({
    "mean_iou": float(np.nanmean(np.where(union > 0, intersection / np.maximum(union, 1), np.nan))),
    "overall_accuracy": float(intersection.sum() / confusion.sum()),
    "pipeline_matches": bool(np.array_equal(from_pipeline, predictions[0])),
    "package_imported": "denseclip_hf" in sys.modules,
}))
"""


def test_output_folder_reevaluates_independently(two_process_run, tmp_path):
    """Remote-code loading without the package, model + processor + NumPy confusion matrix, and the pipeline
    reproduce all_results.json."""
    results = json.loads((two_process_run / "all_results.json").read_text())
    for index, example in enumerate(load_synthetic_dataset("validation", 7)):
        example["image"].save(tmp_path / f"image_{index}.png")
        example["label"].save(tmp_path / f"label_{index}.png")
    completed = subprocess.run(
        [sys.executable, "-c", REEVALUATE, str(two_process_run), str(tmp_path)], capture_output=True, text=True
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    independent = json.loads(completed.stdout.strip().splitlines()[-1])
    assert not independent["package_imported"] and independent["pipeline_matches"]
    assert independent["mean_iou"] == pytest.approx(results["eval_mean_iou"], abs=1e-12)
    assert independent["overall_accuracy"] == pytest.approx(results["eval_overall_accuracy"], abs=1e-12)
