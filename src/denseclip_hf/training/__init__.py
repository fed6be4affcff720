"""Training and evaluating DenseCLIP for semantic segmentation (`examples/train_seg.py`, `examples/evaluate_seg.py`),
one module per concern.

| module | what it holds |
|---|---|
| `recipes` | the `--recipe` presets (`Recipe`, `RECIPES`): the paper's settings per row |
| `arguments` | the command-line arguments, one dataclass per concern, and `parse_training_args` |
| `model_loading` | the model a run starts from: the offline random default, CLIP, or DenseCLIP; SyncBatchNorm |
| `optimization` | AdamW parameter groups (the authors' by default), the poly schedule with warmup |
| `data` | Hub / folder / synthetic datasets, class names, training and validation batches |
| `transforms` | the authors' training augmentation |
| `evaluation` | predictions under an explicit test protocol and their confusion matrix across processes |
| `evaluation_job` | `evaluate_model(args)`: the whole job of `examples/evaluate_seg.py`, and its arguments |
| `detection_data` | detection data (COCO folders, Hub datasets in COCO format, synthetic scenes) in one format |
| `detection_evaluation` | COCO results of a detector over all processes and their COCO AP (`pycocotools`) |
| `detection_evaluation_job` | `evaluate_detector(args)`: the job of `examples/evaluate_det.py`, and its arguments |
| `metrics` | mIoU and accuracies from a confusion matrix |
| `checkpointing` | atomic training checkpoints and resuming, atomic result files |
| `repository` | the output folder's model repository, written atomically |
| `model_card` | the README of a trained model of any task (one builder; each task supplies its `TaskCard`) |
| `launch` | what every launched script checks and sets up first (launch settings, logging) |
| `loop` | `train(args)`: the whole Accelerate training job of every task (`TrainingTask`) |
| `segmentation_task` | what is segmentation's in a training run (`SegmentationTask`) |
| `detection_task` | what is detection's in a training run (`DetectionTask`, `examples/train_det.py`) |
| `detection_arguments` | the command-line arguments of `examples/train_det.py`, `parse_detection_training_args` |
| `detection_batches` | detection training batches: flips, padding, aspect-ratio grouped sampler |

Nothing is imported here: the modules load `datasets` and `accelerate`, so each is imported on use.
"""
