"""The Accelerate settings of a run: bf16 mixed precision on CPU, TensorBoard tracking read back from its event
files, tracker and launch settings checked with clear errors, and the shipped `accelerate config` files."""

import logging
import math
import os
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env
from conftest import reset_accelerate, run_in_process
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoImageProcessor

from denseclip_hf import DenseClipForSemanticSegmentation, DenseClipModel
from denseclip_hf.synthetic import load_synthetic_dataset
from denseclip_hf.training.arguments import TrackingArguments, parse_training_args
from denseclip_hf.training.launch import check_launch
from denseclip_hf.training.loop import _create_accelerator

ROOT = Path(__file__).parents[1]
CONFIGS = ROOT / "examples" / "accelerate_configs"
QUICK = ["--max_train_samples", "8", "--max_eval_samples", "2", "--per_device_train_batch_size", "2"]
QUICK += ["--per_device_eval_batch_size", "1"]


def numpy_mean_iou(predictions: list[np.ndarray], labels: list[np.ndarray], num_labels: int) -> float:
    """mIoU over the classes present in the ground truth or the predictions, from a NumPy confusion matrix."""
    confusion = np.zeros((num_labels, num_labels), dtype=np.int64)
    for prediction, label in zip(predictions, labels, strict=True):
        valid = label < num_labels
        confusion += np.bincount(label[valid] * num_labels + prediction[valid], minlength=num_labels**2).reshape(
            num_labels, num_labels
        )
    intersection = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - intersection
    return float(np.mean(intersection[union > 0] / union[union > 0]))


def test_bf16_mixed_precision_trains_and_evaluates_on_cpu(tmp_path, monkeypatch):
    """`accelerate launch --mixed_precision bf16` (its environment variable) on CPU: training and validation run
    under bf16 autocast, the saved weights stay float32, and the reported mIoU is that of an independent bf16
    evaluation of the saved model."""
    seen = []
    forward = DenseClipModel.forward  # run by the training step and by every pass of the test protocol

    def recording_forward(self, *args, **kwargs):
        seen.append((self.training, torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu")))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(DenseClipModel, "forward", recording_forward)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    output_dir = tmp_path / "bf16"
    results = run_in_process(
        [*QUICK, "--output_dir", str(output_dir), "--max_train_steps", "3", "--num_warmup_steps", "1"]
    )
    monkeypatch.setattr(DenseClipModel, "forward", forward)

    # The test protocol runs inside Accelerate's autocast wrapper of the forward; autocast is off again afterwards.
    assert not torch.is_autocast_enabled("cpu")
    assert {training for training, _ in seen} == {True, False}
    assert {dtype for _, dtype in seen} == {torch.bfloat16}
    model = DenseClipForSemanticSegmentation.from_pretrained(output_dir).eval()
    assert {parameter.dtype for parameter in model.parameters()} == {torch.float32}
    processor = AutoImageProcessor.from_pretrained(output_dir)
    predictions, labels = [], []
    for example in load_synthetic_dataset("validation", 2):
        label = np.asarray(example["label"]).astype(np.int64)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            outputs = model(**processor(images=example["image"], return_tensors="pt"))  # the test protocol
            whole = processor(images=example["image"], test_mode="whole", return_tensors="pt")
            plain = model(whole["pixel_values"], test_mode="plain")
        assert plain.logits.dtype == torch.bfloat16  # autocast acts on the model...
        assert outputs.logits.dtype == torch.float32  # ...and the protocol accumulates the windows in float32
        predictions.append(processor.post_process_semantic_segmentation(outputs, [label.shape])[0].numpy())
        labels.append(label)
    assert results["eval_mean_iou"] == pytest.approx(numpy_mean_iou(predictions, labels, model.config.num_labels))


def mmcv_poly_learning_rate(step: int, base: float, total: int, power: float, floor: float, warmup: int) -> float:
    """The authors' schedule (mmcv poly with linear warmup from 1e-6 x), written out for step `step` (0-based)."""
    regular = (base - floor) * (1 - step / total) ** power + floor
    return regular * (1 - (1 - step / warmup) * (1 - 1e-6)) if step < warmup else regular


def test_tensorboard_logs_losses_learning_rate_and_validation_metrics(tmp_path):
    output_dir = tmp_path / "tracked"
    flags = ["--output_dir", str(output_dir), "--max_train_steps", "4", "--num_warmup_steps", "2"]
    flags += ["--eval_steps", "2", "--image_encoder_lr_multiplier", "0.1", "--with_tracking"]
    results = run_in_process([*QUICK, *flags, "--report_to", "tensorboard"])

    (run_dir,) = (output_dir / "runs").iterdir()
    events = EventAccumulator(str(run_dir))
    events.Reload()
    scalars = {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert [step for step, _ in scalars["train_loss"]] == [1, 2, 3, 4]
    assert all(math.isfinite(loss) and loss > 0 for _, loss in scalars["train_loss"])
    # The rate of each step at the recipe's rate (lr 1e-3, poly 0.9 to 1e-6), not the image encoder's 0.1x.
    expected_rates = [mmcv_poly_learning_rate(step, 1e-3, 4, 0.9, 1e-6, 2) for step in range(4)]
    assert [rate for _, rate in scalars["learning_rate"]] == pytest.approx(expected_rates, rel=1e-6)
    assert [step for step, _ in scalars["eval_mean_iou"]] == [2, 4]  # every --eval_steps and at the end
    for name in ("mean_iou", "mean_accuracy", "overall_accuracy"):
        assert scalars[f"eval_{name}"][-1][1] == pytest.approx(results[f"eval_{name}"], rel=1e-6)
    per_class = {name: iou for name, iou in results["eval_per_category_iou"].items() if iou is not None}
    assert {tag.removeprefix("eval_iou/") for tag in scalars if tag.startswith("eval_iou/")} == set(per_class)
    for name, iou in per_class.items():
        assert scalars[f"eval_iou/{name}"][-1][1] == pytest.approx(iou, rel=1e-6)
    assert not (output_dir / "denseclip_semantic_segmentation").exists()  # the logs stay out of the repository


def test_tracker_settings_fail_clearly_and_missing_trackers_do_not_warn(tmp_path, monkeypatch, caplog):
    with pytest.raises(ValueError, match="unknown tracker 'tensorbord'; choose from .*tensorboard"):
        TrackingArguments(with_tracking=True, report_to="tensorbord")
    with pytest.raises(ValueError, match="stand alone"):
        TrackingArguments(report_to="all,tensorboard")
    assert TrackingArguments(with_tracking=True, report_to="tensorboard").trackers() == ["tensorboard"]
    assert TrackingArguments(report_to="tensorboard").trackers() == []  # without --with_tracking
    assert TrackingArguments(with_tracking=True, report_to="none").trackers() == []

    monkeypatch.setattr("denseclip_hf.training.arguments.get_available_trackers", lambda: [])  # none installed
    with pytest.raises(ValueError, match="tensorboard is not installed: pip install tensorboard"):
        TrackingArguments(with_tracking=True, report_to="tensorboard")
    for flags in ([], ["--with_tracking"]):  # the default --report_to all
        reset_accelerate()
        try:
            with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
                warnings.simplefilter("always")
                accelerator = _create_accelerator(parse_training_args([*flags, "--output_dir", str(tmp_path)]))
            assert accelerator.trackers == []
        finally:
            reset_accelerate()
        assert not [warning for warning in caught if "tracker" in str(warning.message)]
        assert not [record for record in caplog.records if record.levelno >= logging.WARNING and "track" in record.msg]
    assert "no tracker is installed (pip install tensorboard)" in caplog.text


@pytest.mark.parametrize(
    ("environment", "message"),
    [
        ({"WORLD_SIZE": "2"}, "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2"),
        ({"ACCELERATE_USE_FSDP": "true"}, "FSDP needs GPUs. On CPU, launch DDP instead: .*multi_gpu.yaml"),
    ],
)
def test_launch_settings_that_would_not_run_as_asked_raise_value_error(monkeypatch, environment, message):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    reset_accelerate()
    try:
        with pytest.raises(ValueError, match=message):
            check_launch(Accelerator())
    finally:
        reset_accelerate()


@pytest.mark.parametrize(
    ("name", "distributed_type"),
    [("multi_gpu", DistributedType.MULTI_GPU), ("fsdp", DistributedType.FSDP), ("deepspeed_zero2", "DEEPSPEED")],
)
def test_accelerate_config_files_parse_and_build_their_plugins(name, distributed_type):
    """What `accelerate launch --config_file` does before it starts processes: load the file, complete and check the
    launch arguments, prepare the environment of the processes; FSDP and DeepSpeed then build their plugin from it."""
    path = CONFIGS / f"{name}.yaml"
    assert load_config_from_file(str(path)).distributed_type == distributed_type
    args, defaults, precision_from_file = _validate_launch_command(
        launch_command_parser().parse_args(["--config_file", str(path), "examples/train_seg.py"])
    )
    assert args.num_processes == 8 and args.num_machines == 1
    if name == "deepspeed_zero2":
        fields = [*defaults.deepspeed_config, *(["mixed_precision"] if precision_from_file else [])]
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, environment = prepare_deepspeed_cmd_env(args)
        with mock.patch.dict(os.environ, environment):
            plugin = DeepSpeedPlugin()
        assert plugin.zero_stage == 2 and plugin.deepspeed_config["gradient_accumulation_steps"] == "auto"
    else:
        environment = prepare_multi_gpu_env(args)
    if name == "fsdp":
        with mock.patch.dict(os.environ, environment):
            plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2 and plugin.min_num_params == 1_000_000
    assert environment["ACCELERATE_MIXED_PRECISION"] == ("no" if name == "multi_gpu" else "bf16")
    assert f"examples/accelerate_configs/{name}.yaml" in (ROOT / "docs" / "training.md").read_text()
