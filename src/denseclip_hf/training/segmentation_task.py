"""The semantic segmentation parts of a training run (`examples/train_seg.py`): data, model, the paper's optimizer and
poly schedule, validation (exact mIoU from a confusion matrix gathered across processes, `evaluation.py`), the
prediction grid and the model card. The loop (`loop.train`) runs them; `SegmentationTrainingArguments.make_task()`
makes the task."""

from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader

from ..image_processing_denseclip import DenseClipImageProcessor
from ..visualization import palette_for, prediction_grid
from .arguments import SegmentationTrainingArguments
from .data import SegmentationData, check_label_range, evaluation_dataloader, training_dataloader
from .evaluation import EvaluationProtocol, evaluate, predict_examples
from .loop import TrainingRun
from .metrics import format_metrics_table, segmentation_metrics
from .model_card import segmentation_card, write_model_card
from .model_loading import convert_batchnorm_for_launch, load_model
from .optimization import poly_schedule_with_warmup
from .transforms import SegmentationAugmentation

logger = get_logger(__name__)

NUM_VISUALIZED_IMAGES = 6


class SegmentationTask:
    """DenseCLIP semantic segmentation (see the module docstring and `loop.TrainingTask`)."""

    tracker_project = SegmentationTrainingArguments.tracker_project
    script = SegmentationTrainingArguments.script
    clip_example = SegmentationTrainingArguments.clip_example

    def __init__(self, args: SegmentationTrainingArguments):
        self.args = args

    def load_data(self) -> SegmentationData:
        data = self.args.data.load(self.args.optimization.seed)
        check_label_range(data.train, len(data.id2label), self.args.data.do_reduce_labels)
        return data

    def build_model(self, data: SegmentationData, accelerator: Accelerator) -> torch.nn.Module:
        args, optimization = self.args, self.args.optimization
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
        return convert_batchnorm_for_launch(
            model, optimization.sync_batchnorm, accelerator.num_processes, accelerator.device.type
        )

    def build_image_processor(self, model: torch.nn.Module) -> DenseClipImageProcessor:
        image_scale = self.args.augmentation.image_scale
        return DenseClipImageProcessor(
            size={"shortest_edge": min(image_scale), "longest_edge": max(image_scale)},
            do_reduce_labels=self.args.data.do_reduce_labels,
            test_mode=model.config.test_mode,
        )

    def build_dataloaders(
        self, data: SegmentationData, image_processor: DenseClipImageProcessor, model: torch.nn.Module
    ) -> tuple[DataLoader, DataLoader]:
        """Training batches (augmented crops, see [`training_dataloader`]) and validation batches (see
        [`evaluation_dataloader`]); not yet prepared by Accelerate."""
        optimization, augmentation = self.args.optimization, self.args.augmentation
        augment = SegmentationAugmentation(
            crop_size=augmentation.crop_size,
            scale=tuple(augmentation.image_scale),
            ratio_range=tuple(augmentation.ratio_range),
            cat_max_ratio=augmentation.cat_max_ratio,
            do_reduce_labels=self.args.data.do_reduce_labels,
            ignore_index=model.config.semantic_loss_ignore_index,
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

    def build_scheduler(
        self, optimizer: torch.optim.Optimizer, max_train_steps: int, steps_per_epoch: int
    ) -> LambdaLR:
        """The paper's poly decay with linear warmup over `max_train_steps`."""
        optimization = self.args.optimization
        return poly_schedule_with_warmup(
            optimizer,
            max_train_steps,
            optimization.lr_power,
            optimization.min_learning_rate,
            optimization.num_warmup_steps,
            optimization.warmup_ratio,
        )

    def clip_gradients(self, accelerator: Accelerator, model: torch.nn.Module) -> None:
        """The authors' segmentation configs clip nothing."""

    def validate(self, run: TrainingRun, step: int) -> dict:
        """Validation metrics of the current model (see [`segmentation_metrics`]), logged and tracked at `step`."""
        accelerator = run.accelerator
        config = accelerator.unwrap_model(run.model).config
        protocol = EvaluationProtocol.for_model(config)  # the model's test protocol, as examples/evaluate_seg.py
        with accelerator.autocast():  # the launch's mixed precision, as in training
            confusion = evaluate(
                run.model,
                run.eval_dataloader,
                accelerator,
                protocol,
                len(run.id2label),
                config.semantic_loss_ignore_index,
            )
        metrics = segmentation_metrics(confusion, run.id2label)
        logger.info(
            f"step {step}: mIoU {metrics['mean_iou']:.4f}, mean accuracy {metrics['mean_accuracy']:.4f}, "
            f"pixel accuracy {metrics['overall_accuracy']:.4f} ({protocol.describe()})"
        )
        if accelerator.trackers:
            scalars = {f"eval_{name}": metrics[name] for name in ("mean_iou", "mean_accuracy", "overall_accuracy")}
            per_class = {
                f"eval_iou/{name}": iou for name, iou in metrics["per_category_iou"].items() if iou is not None
            }
            accelerator.log({**scalars, **per_class}, step=step)
        return metrics

    def metrics_table(self, metrics: dict) -> str:
        return format_metrics_table(metrics)

    def repository_writer(self, run: TrainingRun, results: dict) -> Callable[[Path], None]:
        """Predicts the first validation images (every process) and returns the writer of the prediction grid and the
        model card."""
        accelerator = run.accelerator
        examples = run.validation.select(range(min(NUM_VISUALIZED_IMAGES, len(run.validation))))
        config = accelerator.unwrap_model(run.model).config
        protocol = EvaluationProtocol.for_model(config)
        with accelerator.autocast():
            labels, predictions = predict_examples(
                run.model, examples, run.image_processor, protocol, accelerator.device
            )

        def write(folder: Path) -> None:
            grid = prediction_grid(
                [example["image"] for example in examples],
                predictions,
                config.id2label,
                ground_truths=labels,
                palette=palette_for(config),
            )
            grid.save(folder / "validation_predictions.png")
            write_model_card(folder, segmentation_card(config, results, self.args), config, results, self.args)

        return write


__all__ = ["NUM_VISUALIZED_IMAGES", "SegmentationTask"]
