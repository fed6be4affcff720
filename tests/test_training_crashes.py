"""Crashes lose nothing: a real `accelerate launch` of a training script (`examples/train_seg.py`,
`examples/train_det.py`), SIGKILLed (the whole process group, as when a machine is lost) during a step, while a
checkpoint is written and while the model repository is written, then relaunched with `--resume_from_checkpoint
latest` (the last time with a corrupted newest checkpoint), ends with the weights and results of an uninterrupted run,
bit for bit.

Each kill lands at a deterministic moment: `tests/pausing_train.py` stops the process there (half of the file being
written on disk) and the test kills it while it waits.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import PreTrainedModel

from denseclip_hf import DenseClipForObjectDetection, DenseClipForSemanticSegmentation
from denseclip_hf.synthetic import SYNTHETIC_CLASS_NAMES, SYNTHETIC_DETECTION_CLASS_NAMES
from denseclip_hf.training.checkpointing import find_latest_checkpoint, verify_checkpoint
from denseclip_hf.training.model_loading import offline_detection_config, offline_model_config
from denseclip_hf.training.repository import STAGING_DIR_NAME

TESTS = Path(__file__).parent
EXAMPLES = TESTS.parent / "examples"
PAUSING_SCRIPT = TESTS / "pausing_train.py"
# 6 steps of 2 batches of 2 images, 3 steps per epoch, a checkpoint every 2 steps.
SETTINGS = ["--max_train_steps", "6", "--num_warmup_steps", "1", "--max_train_samples", "12"]
SETTINGS += ["--max_eval_samples", "2", "--per_device_train_batch_size", "2", "--total_train_batch_size", "4"]
SETTINGS += ["--checkpointing_steps", "2", "--checkpoints_total_limit", "2"]
TIMEOUT = 300


@dataclass(frozen=True)
class Task:
    """A training script under test: its own flags (after `SETTINGS`) and a model of its kind, as an earlier run's."""

    script: Path
    flags: tuple[str, ...]
    earlier_model: Callable[[], PreTrainedModel]


TASKS = {
    "segmentation": Task(
        EXAMPLES / "train_seg.py",
        (),
        lambda: DenseClipForSemanticSegmentation(offline_model_config(dict(enumerate(SYNTHETIC_CLASS_NAMES)))),
    ),
    "detection": Task(  # the default RetinaNet on the synthetic detection scenes, at 64 x 64 pixels
        EXAMPLES / "train_det.py",
        ("--image_scale", "64", "64"),
        lambda: DenseClipForObjectDetection(
            offline_detection_config("retinanet", dict(enumerate(SYNTHETIC_DETECTION_CLASS_NAMES)), image_size=64)
        ),
    ),
}


def launch(task: Task, output_dir: Path, log: Path, *flags: str, pause_at: str = "") -> subprocess.Popen:
    """`accelerate launch` of the task's script (through `tests/pausing_train.py` when `pause_at` is given) with
    `--output_dir output_dir SETTINGS <task flags> flags` in a new process group, output to `log`."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    command += [str(PAUSING_SCRIPT), str(task.script)] if pause_at else [str(task.script)]
    command += ["--output_dir", str(output_dir), *SETTINGS, *task.flags, *flags]
    environment = {**os.environ, "DENSECLIP_PAUSE_AT": pause_at, "DENSECLIP_PAUSED_FILE": f"{log}.paused"}
    with open(log, "w") as handle:
        return subprocess.Popen(
            command, env=environment, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )


def finish(process: subprocess.Popen, log: Path) -> str:
    assert process.wait(timeout=TIMEOUT) == 0, log.read_text()[-3000:]
    return log.read_text()


@contextlib.contextmanager
def paused(process: subprocess.Popen, log: Path):
    """Waits until the launched run reaches its pause, yields (the run waits there), then SIGKILLs its process group
    and checks that no process of it is left."""
    marker, deadline = Path(f"{log}.paused"), time.monotonic() + TIMEOUT
    try:
        while not marker.exists():
            assert process.poll() is None, f"the run ended before its pause:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "the run did not reach its pause"
            time.sleep(0.2)
        yield marker.read_text()
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
        deadline = time.monotonic() + 30
        while True:  # the training process, a child of the launcher, dies with the group
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                break
            assert time.monotonic() < deadline, "a process of the killed run survived"
            time.sleep(0.1)
    assert process.returncode == -signal.SIGKILL


def same_weights(first: Path, second: Path) -> bool:
    expected, actual = load_file(first), load_file(second)
    return expected.keys() == actual.keys() and all(torch.equal(expected[name], actual[name]) for name in expected)


@pytest.mark.parametrize("task", list(TASKS.values()), ids=list(TASKS))
def test_sigkilled_runs_resume_to_the_weights_of_an_uninterrupted_run(tmp_path, task):
    started = time.monotonic()
    reference = launch(task, tmp_path / "reference", tmp_path / "reference.log")  # runs alongside
    output_dir, checkpoints = tmp_path / "killed", tmp_path / "killed" / "checkpoints"
    resume = ("--resume_from_checkpoint", "latest")

    # 1. Killed while checkpoint 4 is written: the model weights are saved, half of the optimizer state.
    log = tmp_path / "1-checkpoint.log"
    with paused(launch(task, output_dir, log, pause_at="checkpoint:4"), log):
        partial = checkpoints / ".tmp-step_4"
        assert (partial / "model.safetensors").is_file() and (partial / "optimizer.bin").is_file()
        assert not (checkpoints / "step_4").exists()
    assert find_latest_checkpoint(output_dir).name == "step_2"

    # 2. Resumed from step 2, killed in the middle of step 5 (its second batch): checkpoint 4 is complete.
    log = tmp_path / "2-step.log"
    with paused(launch(task, output_dir, log, *resume, pause_at="forward:6"), log):
        assert verify_checkpoint(checkpoints / "step_4") is None and not partial.exists()
    assert "Resumed from" in log.read_text() and "at step 2." in log.read_text()

    # 3. An earlier model repository in the folder; resumed from step 4, killed while the new model.safetensors is
    # half written: the folder still loads the earlier model, bit for bit.
    torch.manual_seed(0)
    earlier = task.earlier_model()
    earlier.save_pretrained(output_dir)
    log = tmp_path / "3-final-save.log"
    with paused(launch(task, output_dir, log, *resume, pause_at="final-save"), log):
        with pytest.raises(SafetensorError):
            load_file(output_dir / STAGING_DIR_NAME / "model.safetensors")  # half written
        assert verify_checkpoint(checkpoints / "step_6") is None
        loaded = type(earlier).from_pretrained(output_dir).state_dict()
        assert all(torch.equal(value, loaded[name]) for name, value in earlier.state_dict().items())

    # 4. The newest checkpoint is corrupted (same size, other bytes): skipped with a warning naming why.
    with open(checkpoints / "step_6" / "model.safetensors", "r+b") as handle:
        handle.seek(-8, os.SEEK_END)
        handle.write(b"\x00" * 8)
    text = finish(launch(task, output_dir, tmp_path / "4-resume.log", *resume), tmp_path / "4-resume.log")
    assert "Skipping checkpoint" in text and "step_6: model.safetensors does not match its SHA-256" in text
    assert "at step 4." in text and f"Removing {output_dir / STAGING_DIR_NAME}" in text

    finish(reference, tmp_path / "reference.log")
    assert same_weights(tmp_path / "reference" / "model.safetensors", output_dir / "model.safetensors")
    expected = json.loads((tmp_path / "reference" / "all_results.json").read_text())
    actual = json.loads((output_dir / "all_results.json").read_text())
    expected.pop("train_runtime_seconds"), actual.pop("train_runtime_seconds")
    assert actual == expected and not (output_dir / STAGING_DIR_NAME).exists()
    assert sorted(path.name for path in checkpoints.iterdir()) == ["step_4", "step_6"]
    assert verify_checkpoint(checkpoints / "step_6") is None  # written again by the last run
    print(f"5 launches, 3 SIGKILLs: {time.monotonic() - started:.0f} s")
