"""The detection parts of a training run (`examples/train_det.py`): COCO-style data (`detection_data`), the detector
(RetinaNet or Mask R-CNN, `model_loading.load_detection_model`), the authors' AdamW groups, step schedule with
warmup and gradient clipping, batches grouped by aspect ratio with flips (`detection_batches`), validation with COCO
AP (`detection_evaluation.evaluate_detection`), the prediction picture and the model card. The loop (`loop.train`)
runs them; `DetectionTrainingArguments.make_task()` makes the task.

Gradient clipping (`--max_grad_norm`, the authors' 0.1) covers the parameters that take gradients. The authors' text
tower takes gradients at learning rate 0, so its gradients count in their clipped norm; this package freezes it
(`requires_grad=False`) unless `--clip_text_encoder_gradients` (then it takes gradients, stays unchanged at learning
rate 0, and the clip is the authors'). See docs/detection.md, "Training", for what the difference costs.
"""

from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader

from ..configuration_denseclip_detection import DenseClipMaskRCNNConfig
from ..image_processing_denseclip_detection import DenseClipDetectionImageProcessor
from .detection_arguments import DetectionTrainingArguments
from .detection_batches import DetectionAugmentation, detection_training_dataloader
from .detection_data import DetectionData, coco_annotations
from .detection_evaluation import detection_picture, evaluate_detection, predict_detections
from .detection_evaluation_job import format_detection_metrics
from .loop import TrainingRun
from .model_card import detection_card, write_model_card
from .model_loading import convert_batchnorm_for_launch, detection_input_size, load_detection_model
from .optimization import step_schedule_with_warmup

logger = get_logger(__name__)

NUM_VISUALIZED_IMAGES = 4
VISUALIZATION_THRESHOLD = 0.3  # the predictions drawn in the picture (examples/evaluate_det.py's default)


class DetectionTask:
    """DenseCLIP object detection / instance segmentation (see the module docstring and `loop.TrainingTask`)."""

    tracker_project = DetectionTrainingArguments.tracker_project
    script = DetectionTrainingArguments.script
    clip_example = DetectionTrainingArguments.clip_example

    def __init__(self, args: DetectionTrainingArguments):
        self.args = args
        self.data: DetectionData | None = None

    def load_data(self) -> DetectionData:
        data = self.args.data.load()
        if data.train is None or len(data.train) == 0:
            raise ValueError(
                f"The dataset has no training images with annotations (split {self.args.data.train_split!r}): a COCO "
                "folder needs train2017/ and annotations/instances_train2017.json, a Hub dataset its training split."
            )
        self.data = data
        return data

    def build_model(self, data: DetectionData, accelerator: Accelerator) -> torch.nn.Module:
        args, optimization = self.args, self.args.optimization
        model = load_detection_model(
            args.model.model_name_or_path,
            args.model.model_type,
            data.id2label,
            args.model.prompting_type,
            detection_input_size(args.augmentation.image_scale),
        )
        text_encoder = model.base_model.text_encoder
        if optimization.clip_text_encoder_gradients and text_encoder is not None:
            text_encoder.requires_grad_(True)  # at learning rate 0 (`parameter_groups`): gradients for the clip only
        return convert_batchnorm_for_launch(
            model, optimization.sync_batchnorm, accelerator.num_processes, accelerator.device.type
        )

    def build_image_processor(self, model: torch.nn.Module) -> DenseClipDetectionImageProcessor:
        """The authors' test pipeline at `--image_scale`, with the model's classes and (Mask R-CNN) mask threshold."""
        longest, shortest = self.args.augmentation.image_scale
        config = model.config
        settings = {"mask_threshold": config.mask_threshold} if isinstance(config, DenseClipMaskRCNNConfig) else {}
        return DenseClipDetectionImageProcessor(
            size={"shortest_edge": shortest, "longest_edge": longest}, num_labels=config.num_labels, **settings
        )

    def build_dataloaders(
        self, data: DetectionData, image_processor: DenseClipDetectionImageProcessor, model: torch.nn.Module
    ) -> tuple[DataLoader, None]:
        """Training batches (see [`detection_training_dataloader`]); validation reads `data.validation` itself (COCO
        evaluation), so there is no validation loader."""
        optimization = self.args.optimization
        augmentation = DetectionAugmentation(
            image_processor,
            self.args.augmentation.flip_probability,
            return_masks=self.args.model.model_type == "maskrcnn",
        )
        train_dataloader = detection_training_dataloader(
            data.train,
            augmentation,
            coco_annotations,
            optimization.per_device_train_batch_size,
            optimization.seed,
            optimization.dataloader_num_workers,
        )
        return train_dataloader, None

    def build_scheduler(
        self, optimizer: torch.optim.Optimizer, max_train_steps: int, steps_per_epoch: int
    ) -> LambdaLR:
        """The authors' step decay at `--lr_milestones` epochs with linear warmup."""
        optimization = self.args.optimization
        return step_schedule_with_warmup(
            optimizer,
            steps_per_epoch,
            optimization.lr_milestones,
            optimization.lr_decay,
            optimization.num_warmup_steps,
            optimization.warmup_ratio,
        )

    def clip_gradients(self, accelerator: Accelerator, model: torch.nn.Module) -> None:
        """Clips the global L2 norm of the gradients to `--max_grad_norm` (mmcv's `clip_grad_norm_` over the parameters
        with a gradient)."""
        if self.args.optimization.clips_gradients:
            accelerator.clip_grad_norm_(model.parameters(), self.args.optimization.max_grad_norm)

    def validate(self, run: TrainingRun, step: int) -> dict:
        """COCO AP of the current model on the validation split (`evaluate_detection`: against the COCO json of a
        COCO folder, else the dataset's own objects), logged and tracked at `step`."""
        accelerator = run.accelerator
        with accelerator.autocast():  # the launch's mixed precision, as in training
            metrics = evaluate_detection(
                run.model,
                run.image_processor,
                run.validation,
                self.data.category_ids,
                accelerator,
                batch_size=self.args.optimization.per_device_eval_batch_size,
                annotation_file=self.data.validation_annotation_file,
            )
        logger.info(f"step {step}: " + ", ".join(f"{name} {value:.4f}" for name, value in metrics.items()))
        if accelerator.trackers:
            accelerator.log({f"eval_{name}": value for name, value in metrics.items()}, step=step)
        return metrics

    def metrics_table(self, metrics: dict) -> str:
        return format_detection_metrics(metrics)

    def repository_writer(self, run: TrainingRun, results: dict) -> Callable[[Path], None]:
        """Detects on the first validation images (every process) and returns the writer of the prediction picture
        (detections above `VISUALIZATION_THRESHOLD` beside the ground truth) and the model card."""
        accelerator = run.accelerator
        examples = list(run.validation.select(range(min(NUM_VISUALIZED_IMAGES, len(run.validation)))))
        images = [example["image"] for example in examples]
        with accelerator.autocast():
            detections = predict_detections(run.model, run.image_processor, images)
        config = accelerator.unwrap_model(run.model).config

        def write(folder: Path) -> None:
            picture = detection_picture(examples, detections, config, VISUALIZATION_THRESHOLD)
            picture.save(folder / "validation_predictions.png")
            write_model_card(folder, detection_card(config, results, self.args), config, results, self.args)

        return write


__all__ = ["NUM_VISUALIZED_IMAGES", "VISUALIZATION_THRESHOLD", "DetectionTask"]
