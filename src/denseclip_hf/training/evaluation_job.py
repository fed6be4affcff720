"""The evaluation job of `examples/evaluate_seg.py`: a DenseCLIP model on a dataset's validation split by the
authors' test protocol, with Accelerate (CPU, one or many GPUs, several machines).

`evaluate_model(args)` checks every flag against the model's config before any work, loads the model, its image
processor and the data (the dataset flags of `train_seg.py`, [`DataArguments`]), runs [`evaluate`] (the same code as
the validation of a training run: exact confusion matrix, `gather_for_metrics`) under an explicit
[`EvaluationProtocol`], and writes into `--output_dir`:

| file | content |
|---|---|
| `eval_results.json` | mIoU, mean and pixel accuracy, per class; the protocol, precision, model id and revision |
| `eval_results.md` | the same as a Markdown report with the per-class table |
| `eval_predictions.png` | the first validation images with ground-truth and prediction overlays |
"""

import json
import os
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from transformers import AutoConfig
from transformers.utils import CONFIG_NAME, cached_file
from transformers.utils.hub import extract_commit_hash

from ..configuration_denseclip import TEST_MODES, DenseClipConfig
from ..file_utils import write_text_atomically
from ..image_processing_denseclip import MULTI_SCALE_RATIOS, DenseClipImageProcessor
from ..modeling_denseclip import DenseClipForSemanticSegmentation
from ..visualization import palette_for, prediction_grid, save_figure
from .arguments import CHANNELS_LAST_HELP, DataArguments, choice_metadata, parse_argument_groups
from .data import check_label_range, evaluation_dataloader
from .evaluation import EvaluationProtocol, evaluate, predict_examples
from .launch import check_launch, configure_logging
from .metrics import format_metrics_markdown, format_metrics_table, segmentation_metrics

logger = get_logger(__name__)

SCRIPT = "examples/evaluate_seg.py"
RESULTS_NAME = "eval_results.json"
REPORT_NAME = "eval_results.md"
PICTURE_NAME = "eval_predictions.png"


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class EvaluatedModelArguments:
    """The model to evaluate."""

    _argument_group_name = "model"

    model_name_or_path: str = field(
        metadata=_help("A DenseCLIP model: a local folder (a converted authors' checkpoint, a train_seg.py output) or "
        "a Hub repository, with its preprocessor_config.json."),
    )  # fmt: skip
    revision: str | None = field(default=None, metadata=_help("The Hub revision (branch, tag or commit) to load."))


@dataclass
class ProtocolArguments:
    """The test protocol; every setting left out is the model's (`config.test_mode`, `test_crop_size`, ...)."""

    _argument_group_name = "test protocol"

    mode: str | None = field(
        default=None,
        metadata=choice_metadata(
            "The test protocol (default: the model's config.test_mode; windows: --crop_size, --stride)", TEST_MODES
        ),
    )
    crop_size: list[int] | None = field(
        default=None, metadata=_help("Window size, SIDE or HEIGHT WIDTH (default: the model's test_crop_size).")
    )
    stride: list[int] | None = field(
        default=None,
        metadata=_help("Window step, SIDE or HEIGHT WIDTH (default: the model's test_stride, or two thirds of a given "
        "--crop_size, the authors' rule)."),
    )  # fmt: skip
    multi_scale: bool = field(
        default=False,
        metadata=_help(f"The authors' multi-scale test: each image at the ratios {list(MULTI_SCALE_RATIOS)} of the "
        "processor's size, probabilities averaged at the original size (the paper's MS numbers add --flip)."),
    )  # fmt: skip
    flip: bool = field(default=False, metadata=_help("Also run every input mirrored horizontally and average."))

    def __post_init__(self):
        for name in ("crop_size", "stride"):
            value = getattr(self, name)
            if value is not None and (len(value) not in (1, 2) or min(value) <= 0):
                raise ValueError(f"--{name} takes one or two positive sizes (SIDE or HEIGHT WIDTH), got {value}.")

    def resolve(self, config: DenseClipConfig) -> EvaluationProtocol:
        """The protocol for a model with `config`, checked against it (see [`EvaluationProtocol.for_model`])."""
        return EvaluationProtocol.for_model(
            config,
            mode=self.mode,
            crop_size=self.crop_size,
            stride=self.stride,
            scale_ratios=MULTI_SCALE_RATIOS if self.multi_scale else None,
            flip=self.flip,
            owner=SCRIPT,
            names=("--mode", "--crop_size", "--stride"),
        )


@dataclass
class EvaluationOutputArguments:
    """Batches, outputs, precision and memory layout: the run options every evaluation script has."""

    _argument_group_name = "run"

    per_device_eval_batch_size: int = field(
        default=1,
        metadata=_help(
            "Images per device and batch (segmentation: images of the same size share a forward; "
            "detection: a batch is padded to its largest image, the authors test one image at a time)."
        ),
    )
    output_dir: str | None = field(
        default=None, metadata=_help("Where to write the results. Default: outputs/evaluation/<model folder name>.")
    )
    num_visualized_images: int = field(
        default=6, metadata=_help("Validation images drawn in eval_predictions.png (0: no picture).")
    )
    bf16: bool = field(default=False, metadata=_help("Run the model under bfloat16 autocast."))
    channels_last: bool = field(default=False, metadata=_help(CHANNELS_LAST_HELP))

    def __post_init__(self):
        if self.per_device_eval_batch_size <= 0:
            raise ValueError(f"--per_device_eval_batch_size must be > 0, got {self.per_device_eval_batch_size}.")
        if self.num_visualized_images < 0:
            raise ValueError(f"--num_visualized_images must be >= 0, got {self.num_visualized_images}.")
        if self.output_dir is not None and Path(self.output_dir).is_file():
            raise ValueError(f"--output_dir {self.output_dir} is a file: pass a folder.")


@dataclass
class EvaluationRunArguments(EvaluationOutputArguments):
    """Batches, outputs and speed options of `examples/evaluate_seg.py`."""

    dataloader_num_workers: int = field(default=0, metadata=_help("Data loading worker processes."))
    seed: int = field(
        default=42,
        metadata=_help("Draws the held-out validation share of a dataset without a validation split, like "
        "train_seg.py's --seed (pass the training run's value)."),
    )  # fmt: skip
    torch_compile: bool = field(default=False, metadata=_help("Compile the model's modules with torch.compile."))
    torch_compile_backend: str = field(default="inductor", metadata=_help("The torch.compile backend."))
    torch_compile_mode: str | None = field(
        default=None, metadata=_help("The torch.compile mode (default, reduce-overhead, max-autotune).")
    )

    def __post_init__(self):
        super().__post_init__()
        if self.dataloader_num_workers < 0:
            raise ValueError(f"--dataloader_num_workers must be >= 0, got {self.dataloader_num_workers}.")


def default_output_dir(model_name_or_path: str) -> str:
    """`outputs/evaluation/<model folder name>`, where evaluation scripts write without `--output_dir`."""
    return str(Path("outputs") / "evaluation" / (Path(model_name_or_path.rstrip("/")).name or "model"))


@dataclass
class SegmentationEvaluationArguments:
    """All arguments of `examples/evaluate_seg.py`, one dataclass per concern; `output_dir` defaults to
    `outputs/evaluation/<model folder name>`."""

    model: EvaluatedModelArguments
    protocol: ProtocolArguments = field(default_factory=ProtocolArguments)
    data: DataArguments = field(default_factory=DataArguments)
    run: EvaluationRunArguments = field(default_factory=EvaluationRunArguments)

    def __post_init__(self):
        if self.run.output_dir is None:
            self.run.output_dir = default_output_dir(self.model.model_name_or_path)


EVALUATION_ARGUMENT_GROUPS = tuple(group.type for group in fields(SegmentationEvaluationArguments))


def parse_evaluation_args(argv: list[str] | None = None) -> SegmentationEvaluationArguments:
    """Parses `argv` (default: `sys.argv[1:]`); invalid arguments exit with the usage and a clear message."""
    return parse_argument_groups(
        SegmentationEvaluationArguments, "Evaluate a DenseCLIP model for semantic segmentation.", argv
    )


def load_evaluated_config(
    model_name_or_path: str,
    revision: str | None = None,
    config_classes: tuple[type, ...] = (DenseClipConfig,),
    task: str = "semantic segmentation (train one from CLIP with examples/train_seg.py, or convert the authors' "
    "checkpoint)",
) -> Any:
    """The config of the model to evaluate; a `ValueError` that says what to pass when it is missing or not one of
    `config_classes` (DenseCLIP for `task`)."""
    try:
        config = AutoConfig.from_pretrained(model_name_or_path, revision=revision)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"Could not load a model config from {model_name_or_path!r} (revision {revision!r}): {error}. Pass a "
            "DenseCLIP model folder (e.g. from `python -m denseclip_hf.convert_denseclip_original_to_hf` or "
            "examples/train_seg.py) or a Hub repository of one."
        ) from error
    if not isinstance(config, config_classes):
        raise ValueError(
            f"{model_name_or_path!r} is a {config.model_type!r} model, not DenseCLIP: evaluate a DenseCLIP model for "
            f"{task}."
        )
    return config


def load_evaluation_processor(
    model_name_or_path: str, revision: str | None, protocol: EvaluationProtocol, do_reduce_labels: bool
) -> DenseClipImageProcessor:
    """The model's saved image processor, set to the protocol's `test_mode` and the dataset's `do_reduce_labels`."""
    try:
        processor = DenseClipImageProcessor.from_pretrained(model_name_or_path, revision=revision)
    except OSError as error:
        raise ValueError(
            f"{model_name_or_path!r} has no preprocessor_config.json: evaluation resizes images as the model's own "
            "processor does. Save one next to the model (`DenseClipImageProcessor(size={'shortest_edge': 512, "
            "'longest_edge': 2048}).save_pretrained(folder)`, the authors' resize for 512 crops)."
        ) from error
    processor.test_mode = protocol.mode
    processor.do_reduce_labels = do_reduce_labels
    return processor


def hub_commit_hash(model_name_or_path: str, revision: str | None) -> str | None:
    """The commit a Hub model was loaded from (what `--revision` resolved to); `None` for a local folder."""
    if os.path.isdir(model_name_or_path):
        return None
    return extract_commit_hash(cached_file(model_name_or_path, CONFIG_NAME, revision=revision), None)


def check_dataset_classes(
    config: Any,
    dataset_id2label: dict[int, str],
    hint: str = ", or pass --id2label with them (and --do_reduce_labels for ADE20K-style label maps where 0 means "
    "'unlabelled')",
) -> None:
    """Fails when the dataset and the model (`config`) count different classes (the message ends with `hint`, the
    fix); warns when the names differ."""
    if len(dataset_id2label) != config.num_labels:
        raise ValueError(
            f"The model predicts {config.num_labels} classes but the dataset has {len(dataset_id2label)}: evaluate on "
            f"a dataset with the model's classes{hint}."
        )
    renamed = [
        (label, name, config.id2label[label])
        for label, name in dataset_id2label.items()
        if name.strip() != config.id2label[label].strip()
    ]
    if renamed:
        examples = ", ".join(f"{label}: {data!r} vs {model!r}" for label, data, model in renamed[:3])
        logger.warning(f"{len(renamed)} class names of the dataset differ from the model's ({examples}, ...).")


def compile_model(model: DenseClipForSemanticSegmentation, backend: str, mode: str | None) -> None:
    """Compiles the parts of `model` in place (`nn.Module.compile`): the base model's (image encoder, text encoder,
    prompting) and the decoder's (FPN neck and head), which the test protocol then runs compiled."""
    for module in [*model.base_model.children(), *model.decoder.children()]:
        module.compile(backend=backend, mode=mode)


def evaluate_model(args: SegmentationEvaluationArguments) -> dict:
    """Evaluates the model on the validation split and writes the outputs; returns the contents of
    `eval_results.json`."""
    model_args, run_args = args.model, args.run
    config = load_evaluated_config(model_args.model_name_or_path, model_args.revision)
    commit_hash = hub_commit_hash(model_args.model_name_or_path, model_args.revision)
    protocol = args.protocol.resolve(config)
    processor = load_evaluation_processor(
        model_args.model_name_or_path, model_args.revision, protocol, args.data.do_reduce_labels
    )
    accelerator = Accelerator(mixed_precision="bf16" if run_args.bf16 else None)
    check_launch(accelerator, SCRIPT)
    configure_logging(accelerator)
    logger.info(accelerator.state, main_process_only=False)
    with accelerator.main_process_first():
        # Evaluation reads the validation split only; of the training split just the first example (class names).
        data = replace(args.data, max_train_samples=1).load(run_args.seed, default_id2label=config.id2label)
    check_dataset_classes(config, data.id2label)
    check_label_range(data.validation, config.num_labels, args.data.do_reduce_labels)

    model = DenseClipForSemanticSegmentation.from_pretrained(
        model_args.model_name_or_path, revision=model_args.revision
    )
    model.to(accelerator.device).eval()
    if run_args.channels_last:
        model.to(memory_format=torch.channels_last)
    if run_args.torch_compile:
        compile_model(model, run_args.torch_compile_backend, run_args.torch_compile_mode)
    dataloader = accelerator.prepare(
        evaluation_dataloader(
            data.validation,
            processor,
            run_args.per_device_eval_batch_size,
            run_args.dataloader_num_workers,
            scale_ratios=protocol.scale_ratios,
        )
    )
    logger.info(
        f"***** Evaluating {model_args.model_name_or_path} on {len(data.validation)} images: {protocol.describe()}; "
        f"resize {dict(processor.size)}, {run_args.per_device_eval_batch_size} images per device x "
        f"{accelerator.num_processes} processes, precision {accelerator.mixed_precision} *****"
    )
    start_time = time.time()
    with accelerator.autocast():
        confusion = evaluate(
            model,
            dataloader,
            accelerator,
            protocol,
            config.num_labels,
            config.semantic_loss_ignore_index,
            progress="evaluation",
        )
    runtime = time.time() - start_time
    metrics = segmentation_metrics(confusion, config.id2label)
    results = {
        "model_name_or_path": model_args.model_name_or_path,
        "revision": model_args.revision,
        "commit_hash": commit_hash,
        "dataset": _dataset_description(args.data),
        "eval_samples": len(data.validation),
        "protocol": {**protocol.to_dict(), "resize": dict(processor.size)},
        "mixed_precision": accelerator.mixed_precision,
        "channels_last": run_args.channels_last,
        "torch_compile": run_args.torch_compile,
        "num_processes": accelerator.num_processes,
        **{f"eval_{name}": value for name, value in metrics.items()},
        "eval_runtime_seconds": round(runtime, 2),
    }
    logger.info(f"Results ({len(data.validation)} images, {protocol.describe()}):\n{format_metrics_table(metrics)}")
    if accelerator.is_main_process:
        _write_outputs(results, metrics, model, processor, protocol, data.validation, args, accelerator)
    accelerator.wait_for_everyone()
    return results


def _dataset_description(data: DataArguments) -> dict:
    """The dataset flags that decide which images were evaluated."""
    names = ("dataset_name", "dataset_config_name", "train_dir", "validation_dir", "do_reduce_labels")
    described = {name: getattr(data, name) for name in names}
    described["source"] = "hub" if data.dataset_name else "folder" if data.train_dir else "synthetic"
    described["max_eval_samples"] = data.max_eval_samples
    return described


def _write_outputs(results, metrics, model, processor, protocol, validation, args, accelerator) -> None:
    """Writes `eval_results.json`, `eval_results.md` and (with `--num_visualized_images`) `eval_predictions.png`."""
    output_dir = Path(args.run.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomically(output_dir / RESULTS_NAME, json.dumps(results, indent=2) + "\n")
    report = [
        f"# Evaluation of `{results['model_name_or_path']}`",
        "",
        f"- revision: {results['revision'] or 'default'}",
        f"- dataset: {results['dataset']['source']} ({results['eval_samples']} validation images)",
        f"- protocol: {protocol.describe()}; resize {results['protocol']['resize']}",
        f"- precision: {results['mixed_precision']}, channels-last weights: {results['channels_last']}, "
        f"torch.compile: {results['torch_compile']}",
        "",
        format_metrics_markdown(metrics),
    ]
    write_text_atomically(output_dir / REPORT_NAME, "\n".join(report))
    count = min(args.run.num_visualized_images, len(validation))
    if count:
        examples = list(validation.select(range(count)))
        with accelerator.autocast():
            labels, predictions = predict_examples(model, examples, processor, protocol, accelerator.device)
        picture = prediction_grid(
            [example["image"] for example in examples],
            predictions,
            model.config.id2label,
            ground_truths=labels,
            palette=palette_for(model.config),
            ignore_index=model.config.semantic_loss_ignore_index,
        )
        save_figure(picture, output_dir / PICTURE_NAME)
    logger.info(f"Wrote the results to {output_dir}")


__all__ = [
    "EVALUATION_ARGUMENT_GROUPS",
    "EvaluatedModelArguments",
    "EvaluationOutputArguments",
    "EvaluationRunArguments",
    "ProtocolArguments",
    "SegmentationEvaluationArguments",
    "check_dataset_classes",
    "compile_model",
    "default_output_dir",
    "evaluate_model",
    "hub_commit_hash",
    "load_evaluated_config",
    "load_evaluation_processor",
    "parse_evaluation_args",
]
