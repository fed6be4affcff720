"""The training loop of DenseCLIP with Accelerate (CPU, one or many GPUs, several machines), for every task.

`train(args)` runs the whole job of a training script (`examples/train_seg.py`, `examples/train_det.py`): the task's
data, model, optimizer and schedule, the training loop with gradient accumulation (and the task's gradient clipping),
periodic (`--eval_steps`: every N steps or every epoch) and final validation, atomic checkpoints with exact resume
(`checkpointing.py`), and the output folder as a complete Hub model repository (weights and code, processor, results,
the task's prediction picture and model card), published atomically (`repository.py`). Trackers (`--with_tracking`)
log to `<output_dir>/runs/`.

What differs between tasks comes from a [`TrainingTask`] that the arguments make (`args.make_task()`): semantic
segmentation (`segmentation_task.SegmentationTask`) or detection (`detection_task.DetectionTask`). The loop itself
(launch, resume, steps, accumulation, checkpoints, validation schedule, trackers, publishing, upload) is shared.

Determinism: shuffling and augmentation are functions of `(seed, epoch, index)` (see `data.py`) and the RNG of
dropout and of the detectors' samplers is re-seeded from `(seed, process, epoch, batch)` before every batch, so an
interrupted and resumed run computes the same steps as an uninterrupted one.
"""

import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from huggingface_hub import HfApi
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .checkpointing import find_latest_checkpoint, load_checkpoint, save_checkpoint
from .launch import check_launch, configure_logging
from .optimization import build_optimizer, num_update_steps_per_epoch
from .repository import STAGING_DIR_NAME, publish_repository

logger = get_logger(__name__)

RANDOM_WEIGHTS_NOTICE = """
==========================================================================================================
CLIP weights are RANDOM: no --model_name_or_path was given, so this run trains a small DenseCLIP from
scratch (no network needed). With network access, train on real CLIP weights with, for example:
  accelerate launch {script} --model_name_or_path {clip_example}
==========================================================================================================
""".strip("\n")


@dataclass
class TaskData:
    """Training and validation splits and the class names by label id (what every task's data holds)."""

    train: datasets.Dataset
    validation: datasets.Dataset
    id2label: dict[int, str]


class TrainingTask(Protocol):
    """The task-specific parts of a training run; the loop calls them in this order.

    `tracker_project`, `script` and `clip_example` name the task in tracker logs, launch errors and the random-weights
    notice. `build_dataloaders` may return `None` as validation loader when `validate` reads `run.validation`
    itself (detection's COCO evaluation); `clip_gradients` is called on the step's accumulated gradients, before the
    optimizer step, on every process; `repository_writer` runs on every process (predictions, gathered weights) and
    returns what the main process writes into the staged repository folder beside the weights, processor and
    `all_results.json`.
    """

    args: Any
    tracker_project: str
    script: str
    clip_example: str

    def load_data(self) -> TaskData: ...

    def build_model(self, data: TaskData, accelerator: Accelerator) -> torch.nn.Module: ...

    def build_image_processor(self, model: torch.nn.Module) -> Any: ...

    def build_dataloaders(
        self, data: TaskData, image_processor: Any, model: torch.nn.Module
    ) -> tuple[DataLoader, DataLoader | None]: ...

    def build_scheduler(
        self, optimizer: torch.optim.Optimizer, max_train_steps: int, steps_per_epoch: int
    ) -> LambdaLR: ...

    def clip_gradients(self, accelerator: Accelerator, model: torch.nn.Module) -> None: ...

    def validate(self, run: "TrainingRun", step: int) -> dict: ...

    def metrics_table(self, metrics: dict) -> str: ...

    def repository_writer(self, run: "TrainingRun", results: dict) -> Callable[[Path], None]: ...


def batch_seed(seed: int, process_index: int, epoch: int, batch_index: int) -> int:
    """The torch seed (dropout, samplers) of one training batch, a function of its position only."""
    return int(np.random.SeedSequence([seed, process_index, epoch, batch_index]).generate_state(1)[0])


def base_learning_rate(optimizer: torch.optim.Optimizer) -> float:
    """The current learning rate of the parameters at the recipe's rate (not the image encoder's multiple)."""
    return next(group["lr"] for group in optimizer.param_groups if group["lr_multiplier"] == 1.0)


def _create_accelerator(args: Any) -> Accelerator:
    """The `Accelerator` of the launch (processes, devices, precision, trackers) with the gradient accumulation of the
    recipe. Tracker logs go to `<output_dir>/runs/` (TensorBoard: `runs/denseclip_<task>/`). `args` is a task's
    training arguments (`SegmentationTrainingArguments`, `DetectionTrainingArguments`): their `tracker_project`,
    `script` and `clip_example` name the task."""
    output_dir, tracking = Path(args.checkpoints.output_dir), args.tracking
    trackers = tracking.trackers()
    accelerator = Accelerator(
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "runs")),
    )
    check_launch(accelerator, args.script)
    accelerator.gradient_accumulation_steps = args.optimization.resolve_gradient_accumulation_steps(
        accelerator.num_processes
    )
    configure_logging(accelerator)
    logger.info(accelerator.state, main_process_only=False)
    if args.model.model_name_or_path is None:
        logger.warning(RANDOM_WEIGHTS_NOTICE.format(script=args.script, clip_example=args.clip_example))
    if tracking.with_tracking and not trackers:
        logger.info(
            f"--with_tracking --report_to {tracking.report_to}: no tracker is installed (pip install tensorboard); "
            "losses and metrics go to this log and all_results.json only."
        )
    if trackers:
        # Tracker hyper-parameters: scalars and strings only.
        config = {
            name: value if isinstance(value, (int, float, str, bool)) else str(value)
            for name, value in args.to_flat_dict().items()
        }
        accelerator.init_trackers(args.tracker_project, config)
    return accelerator


@dataclass
class TrainingRun:
    """Everything a training run works with, prepared by Accelerate."""

    task: TrainingTask
    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    train_dataloader: DataLoader
    eval_dataloader: DataLoader | None
    validation: datasets.Dataset
    image_processor: Any
    id2label: dict[int, str]
    max_train_steps: int
    steps_per_epoch: int
    eval_steps: int | None  # validations during training every this many steps (`resolve_eval_steps`)

    @property
    def args(self) -> Any:
        return self.task.args

    def validate(self, step: int) -> dict:
        """Validation metrics of the current model (the task's), logged and tracked at `step`."""
        return self.task.validate(self, step)

    def save_checkpoint(self, step: int) -> None:
        checkpoints = self.args.checkpoints
        save_checkpoint(self.accelerator, checkpoints.output_dir, step, checkpoints.checkpoints_total_limit)


def _prepare_run(task: TrainingTask, accelerator: Accelerator, data: TaskData) -> TrainingRun:
    """The task's model, processor, data loaders, optimizer and schedule, prepared for the launch."""
    optimization = task.args.optimization
    model = task.build_model(data, accelerator)
    if optimization.channels_last:  # before the optimizer: its state takes the weights' layout
        model.to(memory_format=torch.channels_last)
    image_processor = task.build_image_processor(model)
    train_dataloader, eval_dataloader = task.build_dataloaders(data, image_processor, model)
    optimizer = build_optimizer(  # the authors' AdamW groups, for every task
        model,
        optimization.learning_rate,
        optimization.weight_decay,
        optimization.image_encoder_lr_multiplier,
        optimization.weight_decay_exemptions,
        accelerator.device.type,
    )
    if eval_dataloader is None:
        model, optimizer, train_dataloader = accelerator.prepare(model, optimizer, train_dataloader)
    else:
        model, optimizer, train_dataloader, eval_dataloader = accelerator.prepare(
            model, optimizer, train_dataloader, eval_dataloader
        )
    if len(train_dataloader) == 0:
        raise ValueError(
            f"{len(data.train)} training examples make no full batch of {optimization.per_device_train_batch_size} "
            f"per device on {accelerator.num_processes} processes."
        )
    steps_per_epoch = num_update_steps_per_epoch(len(train_dataloader), accelerator.gradient_accumulation_steps)
    max_train_steps = optimization.max_train_steps or optimization.num_train_epochs * steps_per_epoch
    warmup = optimization.num_warmup_steps
    if warmup >= max_train_steps:
        raise ValueError(f"--num_warmup_steps {warmup} must be below the {max_train_steps} steps.")
    # Stepped once per optimizer step by the loop (not by Accelerate, which would step it once per process).
    scheduler = task.build_scheduler(optimizer, max_train_steps, steps_per_epoch)
    accelerator.register_for_checkpointing(scheduler)
    return TrainingRun(
        task=task,
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        train_dataloader=train_dataloader,
        eval_dataloader=eval_dataloader,
        validation=data.validation,
        image_processor=image_processor,
        id2label=data.id2label,
        max_train_steps=max_train_steps,
        steps_per_epoch=steps_per_epoch,
        eval_steps=optimization.resolve_eval_steps(steps_per_epoch),
    )


def _resume(run: TrainingRun) -> int:
    """Restores the checkpoint of `--resume_from_checkpoint` (a folder or `latest`); returns its step (0 if none)."""
    output_dir, resume = run.args.checkpoints.output_dir, run.args.checkpoints.resume_from_checkpoint
    if resume is None:
        return 0
    latest = resume == "latest"
    checkpoint = find_latest_checkpoint(output_dir) if latest else Path(resume)
    if checkpoint is None:
        logger.warning(f"No complete checkpoint in {output_dir}: starting from scratch.")
        return 0
    step = load_checkpoint(run.accelerator, checkpoint, verify=not latest)  # `find_latest_checkpoint` verified it
    logger.info(f"Resumed from {checkpoint} at step {step}.")
    return step


def _train(run: TrainingRun, completed_steps: int) -> int:
    """The training loop from step `completed_steps` to `max_train_steps`; returns the last step.

    A resumed run starts in epoch `completed_steps // steps_per_epoch` and skips the batches of that epoch that the
    checkpointed steps consumed. The last step of an epoch may accumulate fewer batches.
    """
    accelerator, model, optimizer, scheduler = run.accelerator, run.model, run.optimizer, run.scheduler
    optimization, checkpoints = run.args.optimization, run.args.checkpoints
    if completed_steps >= run.max_train_steps:
        logger.info(f"The checkpoint is at step {completed_steps} of {run.max_train_steps}: nothing left to train.")
        return completed_steps
    accumulation = accelerator.gradient_accumulation_steps
    starting_epoch = completed_steps // run.steps_per_epoch
    skipped_batches = (completed_steps % run.steps_per_epoch) * accumulation
    num_epochs = math.ceil(run.max_train_steps / run.steps_per_epoch)
    logger.info(
        f"***** Training: recipe {optimization.recipe}, {len(run.train_dataloader.dataset)} examples, "
        f"{run.max_train_steps} steps ({num_epochs} epochs) of {optimization.per_device_train_batch_size} images "
        f"per device x {accelerator.num_processes} processes x {accumulation} accumulation steps *****"
    )
    progress_bar = tqdm(
        total=run.max_train_steps,
        initial=completed_steps,
        desc="training",
        disable=not accelerator.is_local_main_process,
    )
    model.train()
    for epoch in range(starting_epoch, num_epochs):
        run.train_dataloader.set_epoch(epoch)
        first_batch = skipped_batches if epoch == starting_epoch else 0
        batches = (
            accelerator.skip_first_batches(run.train_dataloader, first_batch) if first_batch else run.train_dataloader
        )
        step_losses = []
        for batch_index, batch in enumerate(batches, start=first_batch):
            torch.manual_seed(batch_seed(optimization.seed, accelerator.process_index, epoch, batch_index))
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    run.task.clip_gradients(accelerator, model)
                optimizer.step()
                optimizer.zero_grad()
            step_losses.append(loss.detach())
            if not accelerator.sync_gradients:
                continue
            learning_rate = base_learning_rate(optimizer)  # the rate of the step just taken
            scheduler.step()
            completed_steps += 1
            loss_value = torch.stack(step_losses).mean().item()  # over the step's batches, on this process
            step_losses = []
            progress_bar.update(1)
            progress_bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{learning_rate:.2e}")
            if accelerator.trackers:
                accelerator.log({"train_loss": loss_value, "learning_rate": learning_rate}, completed_steps)
            every = checkpoints.checkpoint_every_n_steps
            if every is not None and completed_steps % every == 0:
                run.save_checkpoint(completed_steps)
            if run.eval_steps and completed_steps % run.eval_steps == 0 and completed_steps < run.max_train_steps:
                run.validate(completed_steps)
            if completed_steps >= run.max_train_steps:
                break
        if checkpoints.checkpointing_steps == "epoch":
            run.save_checkpoint(completed_steps)
        if completed_steps >= run.max_train_steps:
            break
    progress_bar.close()
    return completed_steps


def train(args: Any) -> dict:
    """Trains, validates and writes the output folder; returns the contents of `all_results.json`. `args` is a task's
    training arguments (`parse_training_args`, `parse_detection_training_args`), which make the task."""
    task = args.make_task()
    accelerator = _create_accelerator(args)
    set_seed(args.optimization.seed)
    with accelerator.main_process_first():
        data = task.load_data()
    run = _prepare_run(task, accelerator, data)
    with flushing_denormals(args.optimization.flush_denormal and accelerator.device.type == "cpu"):
        start_time = time.time()
        completed_steps = _train(run, _resume(run))
        train_runtime = time.time() - start_time
        metrics = run.validate(completed_steps)
    logger.info(f"Validation ({len(data.validation)} images):\n{task.metrics_table(metrics)}")
    results = {f"eval_{name}": value for name, value in metrics.items()}
    per_device = args.optimization.per_device_train_batch_size
    total_batch = per_device * accelerator.num_processes * accelerator.gradient_accumulation_steps
    results.update(
        train_steps=completed_steps,
        total_train_batch_size=total_batch,
        train_runtime_seconds=round(train_runtime, 1),
        eval_samples=len(data.validation),
    )
    _save_outputs(run, results)
    if args.hub.push_to_hub and accelerator.is_main_process:
        _push_to_hub(args)
    accelerator.wait_for_everyone()
    accelerator.end_training()  # closes the trackers' logs and the process group
    return results


@contextmanager
def flushing_denormals(enabled: bool) -> Iterator[None]:
    """The block with the CPU's float arithmetic flushing denormal numbers (magnitudes below 1.2e-38 in float32) to
    zero (`torch.set_flush_denormal`), when `enabled` and the CPU can (x86 with SSE3); IEEE denormals again after it.
    On x86 an operation on denormals is up to ~100x slower, and a training run can meet them (tiny gradients and
    their squares): a 1333 x 800 Mask R-CNN step with random weights took 170 s instead of 21 s."""
    if not (enabled and torch.set_flush_denormal(True)):
        yield
        return
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def _save_outputs(run: TrainingRun, results: dict) -> None:
    """Publishes the Hub repository (see [`publish_repository`]): weights + config + code, processor config, results,
    and the task's files (prediction picture, model card)."""
    accelerator, output_dir = run.accelerator, Path(run.args.checkpoints.output_dir)
    write_task_files = run.task.repository_writer(run, results)
    state_dict = accelerator.get_state_dict(run.model)  # on every process: FSDP and DeepSpeed gather the weights
    unwrapped = accelerator.unwrap_model(run.model)

    def write(folder: Path) -> None:
        unwrapped.save_pretrained(folder, state_dict=state_dict)
        run.image_processor.save_pretrained(folder)
        (folder / "all_results.json").write_text(json.dumps(results, indent=2) + "\n")
        write_task_files(folder)

    if accelerator.is_main_process:
        publish_repository(output_dir, write)
        logger.info(f"Saved the model repository to {output_dir}")
    accelerator.wait_for_everyone()


def _push_to_hub(args: Any) -> None:
    api = HfApi(token=args.hub.hub_token)
    output_dir = args.checkpoints.output_dir
    repo_id = api.create_repo(args.hub_repo_id, exist_ok=True).repo_id
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=output_dir,
        commit_message=f"DenseCLIP {args.tracker_project.removeprefix('denseclip_').replace('_', ' ')}, trained with "
        f"{args.script}",
        ignore_patterns=["checkpoints/**", "runs/**", f"{STAGING_DIR_NAME}/**"],
    )
    logger.info(f"Uploaded {output_dir} to {commit.repo_url} ({commit.commit_url})")


__all__ = ["TaskData", "TrainingRun", "TrainingTask", "base_learning_rate", "batch_seed", "train"]
