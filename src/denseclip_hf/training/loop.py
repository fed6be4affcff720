"""The training loop of DenseCLIP semantic segmentation with Accelerate (CPU, one or many GPUs, several machines).

`train(args)` runs the whole job of `examples/train_seg.py`: data, model, the paper's optimizer and schedule, the
training loop with gradient accumulation, periodic and final validation (`evaluation.py`: exact mIoU from a confusion
matrix gathered across processes), atomic checkpoints with exact resume (`checkpointing.py`), and the output folder as
a complete Hub model repository (weights and code, processor, results, prediction grid, model card), published
atomically (`repository.py`). Trackers (`--with_tracking`) log to `<output_dir>/runs/`.

Determinism: shuffling and augmentation are functions of `(seed, epoch, index)` (see `data.py`) and the dropout RNG
is re-seeded from `(seed, process, epoch, batch)` before every batch, so an interrupted and resumed run computes the
same steps as an uninterrupted one.
"""

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

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

from ..image_processing_denseclip import DenseClipImageProcessor
from ..visualization import palette_for, prediction_grid
from .arguments import SegmentationTrainingArguments
from .checkpointing import find_latest_checkpoint, load_checkpoint, save_checkpoint
from .data import (
    SegmentationData,
    check_label_range,
    evaluation_dataloader,
    training_dataloader,
)
from .evaluation import EvaluationProtocol, evaluate, predict_examples
from .launch import check_launch, configure_logging
from .metrics import format_metrics_table, segmentation_metrics
from .model_card import write_model_card
from .model_loading import convert_batchnorm_for_launch, load_model
from .optimization import build_optimizer, num_update_steps_per_epoch, poly_schedule_with_warmup
from .repository import STAGING_DIR_NAME, publish_repository
from .transforms import SegmentationAugmentation

logger = get_logger(__name__)

NUM_VISUALIZED_IMAGES = 6
RANDOM_WEIGHTS_NOTICE = """
==========================================================================================================
CLIP weights are RANDOM: no --model_name_or_path was given, so this run trains a small DenseCLIP from
scratch (no network needed). With network access, train on real CLIP weights with, for example:
  accelerate launch examples/train_seg.py --model_name_or_path openai/clip-vit-base-patch16
==========================================================================================================
""".strip("\n")


def batch_seed(seed: int, process_index: int, epoch: int, batch_index: int) -> int:
    """The torch seed (dropout) of one training batch, a function of its position only."""
    return int(np.random.SeedSequence([seed, process_index, epoch, batch_index]).generate_state(1)[0])


def base_learning_rate(optimizer: torch.optim.Optimizer) -> float:
    """The current learning rate of the parameters at the recipe's rate (not the image encoder's multiple)."""
    return next(group["lr"] for group in optimizer.param_groups if group["lr_multiplier"] == 1.0)


def _create_accelerator(args: SegmentationTrainingArguments) -> Accelerator:
    """The `Accelerator` of the launch (processes, devices, precision, trackers) with the gradient accumulation of the
    recipe. Tracker logs go to `<output_dir>/runs/` (TensorBoard: `runs/denseclip_semantic_segmentation/`)."""
    output_dir, tracking = Path(args.checkpoints.output_dir), args.tracking
    trackers = tracking.trackers()
    accelerator = Accelerator(
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "runs")),
    )
    check_launch(accelerator)
    accelerator.gradient_accumulation_steps = args.optimization.resolve_gradient_accumulation_steps(
        accelerator.num_processes
    )
    configure_logging(accelerator)
    logger.info(accelerator.state, main_process_only=False)
    if args.model.model_name_or_path is None:
        logger.warning(RANDOM_WEIGHTS_NOTICE)
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
        accelerator.init_trackers("denseclip_semantic_segmentation", config)
    return accelerator


def _load_data(args: SegmentationTrainingArguments, accelerator: Accelerator) -> SegmentationData:
    with accelerator.main_process_first():
        data = args.data.load(args.optimization.seed)
    check_label_range(data.train, len(data.id2label), args.data.do_reduce_labels)
    return data


def build_dataloaders(
    args: SegmentationTrainingArguments,
    data: SegmentationData,
    image_processor: DenseClipImageProcessor,
    ignore_index: int,
) -> tuple[DataLoader, DataLoader]:
    """Training batches (augmented crops, see [`training_dataloader`]) and validation batches (see
    [`evaluation_dataloader`]); not yet prepared by Accelerate."""
    optimization, augmentation = args.optimization, args.augmentation
    augment = SegmentationAugmentation(
        crop_size=augmentation.crop_size,
        scale=tuple(augmentation.image_scale),
        ratio_range=tuple(augmentation.ratio_range),
        cat_max_ratio=augmentation.cat_max_ratio,
        do_reduce_labels=args.data.do_reduce_labels,
        ignore_index=ignore_index,
        image_mean=tuple(image_processor.image_mean),
        image_std=tuple(image_processor.image_std),
    )
    train_dataloader = training_dataloader(
        data.train,
        augment,
        optimization.per_device_train_batch_size,
        optimization.seed,
        optimization.dataloader_num_workers,
    )
    eval_dataloader = evaluation_dataloader(
        data.validation,
        image_processor,
        optimization.per_device_eval_batch_size,
        optimization.dataloader_num_workers,
    )
    return train_dataloader, eval_dataloader


@dataclass
class TrainingRun:
    """Everything a training run works with, prepared by Accelerate."""

    args: SegmentationTrainingArguments
    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    train_dataloader: DataLoader
    eval_dataloader: DataLoader
    image_processor: DenseClipImageProcessor
    id2label: dict[int, str]
    max_train_steps: int
    steps_per_epoch: int

    def validate(self, step: int) -> dict:
        """Validation metrics of the current model (see [`segmentation_metrics`]), logged and tracked at `step`."""
        config = self.accelerator.unwrap_model(self.model).config
        protocol = EvaluationProtocol.for_model(config)  # the model's test protocol, as examples/evaluate_seg.py
        with self.accelerator.autocast():  # the launch's mixed precision, as in training
            confusion = evaluate(
                self.model,
                self.eval_dataloader,
                self.accelerator,
                protocol,
                len(self.id2label),
                config.semantic_loss_ignore_index,
            )
        metrics = segmentation_metrics(confusion, self.id2label)
        logger.info(
            f"step {step}: mIoU {metrics['mean_iou']:.4f}, mean accuracy {metrics['mean_accuracy']:.4f}, "
            f"pixel accuracy {metrics['overall_accuracy']:.4f} ({protocol.describe()})"
        )
        if self.accelerator.trackers:
            scalars = {f"eval_{name}": metrics[name] for name in ("mean_iou", "mean_accuracy", "overall_accuracy")}
            per_class = {
                f"eval_iou/{name}": iou for name, iou in metrics["per_category_iou"].items() if iou is not None
            }
            self.accelerator.log({**scalars, **per_class}, step=step)
        return metrics

    def save_checkpoint(self, step: int) -> None:
        checkpoints = self.args.checkpoints
        save_checkpoint(self.accelerator, checkpoints.output_dir, step, checkpoints.checkpoints_total_limit)


def _prepare_run(args: SegmentationTrainingArguments, accelerator: Accelerator, data: SegmentationData) -> TrainingRun:
    """Model, processor, data loaders, the paper's optimizer and poly schedule, prepared for the launch."""
    optimization, image_scale = args.optimization, args.augmentation.image_scale
    model = load_model(
        args.model.model_name_or_path,
        data.id2label,
        optimization.loss_reduction,
        args.augmentation.crop_size,
        backbone_name_or_path=args.model.backbone_name_or_path,
        decoder_type=args.model.decoder_type,
        decode_head_channels=args.model.decode_head_channels,
        prompting_type=args.model.prompting_type,
    )
    model = convert_batchnorm_for_launch(
        model, optimization.sync_batchnorm, accelerator.num_processes, accelerator.device.type
    )
    image_processor = DenseClipImageProcessor(
        size={"shortest_edge": min(image_scale), "longest_edge": max(image_scale)},
        do_reduce_labels=args.data.do_reduce_labels,
        test_mode=model.config.test_mode,
    )
    train_dataloader, eval_dataloader = build_dataloaders(
        args, data, image_processor, model.config.semantic_loss_ignore_index
    )
    optimizer = build_optimizer(
        model,
        optimization.learning_rate,
        optimization.weight_decay,
        optimization.image_encoder_lr_multiplier,
        optimization.weight_decay_exemptions,
        accelerator.device.type,
    )
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
    scheduler = poly_schedule_with_warmup(
        optimizer,
        max_train_steps,
        optimization.lr_power,
        optimization.min_learning_rate,
        warmup,
        optimization.warmup_ratio,
    )
    accelerator.register_for_checkpointing(scheduler)
    return TrainingRun(
        args=args,
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        train_dataloader=train_dataloader,
        eval_dataloader=eval_dataloader,
        image_processor=image_processor,
        id2label=data.id2label,
        max_train_steps=max_train_steps,
        steps_per_epoch=steps_per_epoch,
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
            eval_steps = optimization.eval_steps
            if eval_steps and completed_steps % eval_steps == 0 and completed_steps < run.max_train_steps:
                run.validate(completed_steps)
            if completed_steps >= run.max_train_steps:
                break
        if checkpoints.checkpointing_steps == "epoch":
            run.save_checkpoint(completed_steps)
        if completed_steps >= run.max_train_steps:
            break
    progress_bar.close()
    return completed_steps


def train(args: SegmentationTrainingArguments) -> dict:
    """Trains, validates and writes the output folder; returns the contents of `all_results.json`."""
    accelerator = _create_accelerator(args)
    set_seed(args.optimization.seed)
    data = _load_data(args, accelerator)
    run = _prepare_run(args, accelerator, data)
    start_time = time.time()
    completed_steps = _train(run, _resume(run))
    train_runtime = time.time() - start_time

    metrics = run.validate(completed_steps)
    logger.info(f"Validation ({len(data.validation)} images):\n{format_metrics_table(metrics)}")
    results = {f"eval_{name}": value for name, value in metrics.items()}
    per_device = args.optimization.per_device_train_batch_size
    total_batch = per_device * accelerator.num_processes * accelerator.gradient_accumulation_steps
    results.update(
        train_steps=completed_steps,
        total_train_batch_size=total_batch,
        train_runtime_seconds=round(train_runtime, 1),
        eval_samples=len(data.validation),
    )
    _save_outputs(run, data.validation, results)
    if args.hub.push_to_hub and accelerator.is_main_process:
        _push_to_hub(args)
    accelerator.wait_for_everyone()
    accelerator.end_training()  # closes the trackers' logs and the process group
    return results


def _save_outputs(run: TrainingRun, validation: datasets.Dataset, results: dict) -> None:
    """Publishes the Hub repository (see [`publish_repository`]): weights + config + code, processor config, results,
    prediction grid, model card."""
    accelerator, output_dir = run.accelerator, Path(run.args.checkpoints.output_dir)
    examples = validation.select(range(min(NUM_VISUALIZED_IMAGES, len(validation))))
    protocol = EvaluationProtocol.for_model(accelerator.unwrap_model(run.model).config)
    with accelerator.autocast():
        labels, predictions = predict_examples(run.model, examples, run.image_processor, protocol, accelerator.device)
    state_dict = accelerator.get_state_dict(run.model)  # on every process: FSDP and DeepSpeed gather the weights
    unwrapped = accelerator.unwrap_model(run.model)
    config = unwrapped.config

    def write(folder: Path) -> None:
        unwrapped.save_pretrained(folder, state_dict=state_dict)
        run.image_processor.save_pretrained(folder)
        (folder / "all_results.json").write_text(json.dumps(results, indent=2) + "\n")
        grid = prediction_grid(
            [example["image"] for example in examples],
            predictions,
            config.id2label,
            ground_truths=labels,
            palette=palette_for(config),
        )
        grid.save(folder / "validation_predictions.png")
        write_model_card(folder, config, results, run.args)

    if accelerator.is_main_process:
        publish_repository(output_dir, write)
        logger.info(f"Saved the model repository to {output_dir}")
    accelerator.wait_for_everyone()


def _push_to_hub(args: SegmentationTrainingArguments) -> None:
    api = HfApi(token=args.hub.hub_token)
    output_dir = args.checkpoints.output_dir
    repo_id = api.create_repo(args.hub_repo_id, exist_ok=True).repo_id
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=output_dir,
        commit_message="DenseCLIP semantic segmentation, trained with examples/train_seg.py",
        ignore_patterns=["checkpoints/**", "runs/**", f"{STAGING_DIR_NAME}/**"],
    )
    logger.info(f"Uploaded {output_dir} to {commit.repo_url} ({commit.commit_url})")


__all__ = ["TrainingRun", "base_learning_rate", "build_dataloaders", "train"]
