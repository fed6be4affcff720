"""`examples/evaluate_seg.py` on a tiny saved model: its metrics equal a NumPy confusion matrix of
`predict_probabilities(...).argmax(1)` computed here (single scale, multi-scale + flip, bf16 + torch.compile), two
processes equal one, the output files, and bad flags fail before any work."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from conftest import tiny_config
from hub_server import TOKEN
from huggingface_hub import HfApi
from PIL import Image
from torch._dynamo.utils import counters

from denseclip_hf import MULTI_SCALE_RATIOS, DenseClipForSemanticSegmentation, DenseClipImageProcessor
from denseclip_hf.synthetic import SYNTHETIC_CLASS_NAMES, load_synthetic_dataset
from denseclip_hf.training import evaluation_job
from denseclip_hf.training.evaluation_job import evaluate_model, parse_evaluation_args

SCRIPT = Path(__file__).parents[1] / "examples" / "evaluate_seg.py"
NUM_LABELS = len(SYNTHETIC_CLASS_NAMES)
METRICS = ("mean_iou", "mean_accuracy", "overall_accuracy", "per_category_iou", "per_category_accuracy")
HUB_ID, COMMIT = "someone/tiny-denseclip", "0123456789abcdef0123456789abcdef01234567"


def run_evaluation(argv: list[str]) -> dict:
    """`examples/evaluate_seg.py argv` in this process, with a fresh Accelerate state."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        return evaluate_model(parse_evaluation_args(argv))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer) -> Path:
    """A random tiny DenseCLIP (ViT, patch 16) for the synthetic classes, with 64-pixel test windows and a processor
    that resizes the 128x128 scenes to 96x96."""
    torch.manual_seed(0)
    model = DenseClipForSemanticSegmentation(tiny_config(tokenizer, list(SYNTHETIC_CLASS_NAMES), test_crop_size=64))
    folder = tmp_path_factory.mktemp("tiny-denseclip")
    model.save_pretrained(folder)
    DenseClipImageProcessor(size={"shortest_edge": 96, "longest_edge": 192}).save_pretrained(folder)
    return folder


def numpy_metrics(predictions: list[np.ndarray], labels: list[np.ndarray]) -> dict:
    """mIoU, accuracies and per-class values from a confusion matrix counted with NumPy (255 ignored)."""
    confusion = np.zeros((NUM_LABELS, NUM_LABELS), dtype=np.int64)
    for prediction, label in zip(predictions, labels, strict=True):
        valid = label != 255
        confusion += np.bincount(label[valid] * NUM_LABELS + prediction[valid], minlength=NUM_LABELS**2).reshape(
            NUM_LABELS, NUM_LABELS
        )
    hits, truth, predicted = np.diag(confusion), confusion.sum(1), confusion.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(truth + predicted > 0, hits / (truth + predicted - hits), np.nan)
        accuracy = np.where(truth > 0, hits / truth, np.nan)
    per_class = {
        "per_category_iou": dict(zip(SYNTHETIC_CLASS_NAMES, iou, strict=True)),
        "per_category_accuracy": dict(zip(SYNTHETIC_CLASS_NAMES, accuracy, strict=True)),
    }
    per_class = {key: {k: None if np.isnan(v) else float(v) for k, v in d.items()} for key, d in per_class.items()}
    return {
        "mean_iou": float(np.nanmean(iou)),
        "mean_accuracy": float(np.nanmean(accuracy)),
        "overall_accuracy": float(hits.sum() / truth.sum()),
        **per_class,
        "confusion": confusion,
    }


def direct_predictions(
    model_dir: Path, examples, memory_format: torch.memory_format = torch.contiguous_format, **protocol
) -> list[np.ndarray]:
    """`predict_probabilities(...).argmax(1)` of each example on its own, with the saved processor and the model's
    weights in `memory_format`."""
    model = DenseClipForSemanticSegmentation.from_pretrained(model_dir).eval().to(memory_format=memory_format)
    processor = DenseClipImageProcessor.from_pretrained(model_dir)
    scale_ratios = protocol.pop("scale_ratios", None)
    predictions = []
    for example in examples:
        image = example["image"]
        if scale_ratios is None:
            inputs = processor(images=image, return_tensors="pt")["pixel_values"]
        else:
            inputs = processor(images=image, scale_ratios=list(scale_ratios), return_tensors="pt")["pixel_values"]
        probabilities = model.predict_probabilities(inputs, (image.height, image.width), **protocol)
        predictions.append(probabilities.argmax(1)[0].numpy())
    return predictions


def assert_metrics_equal(results: dict, expected: dict) -> None:
    for name in METRICS:
        assert results[f"eval_{name}"] == pytest.approx(expected[name], abs=1e-12), name


@pytest.fixture(scope="module")
def single_process(model_dir, tmp_path_factory) -> tuple[dict, Path]:
    """One process, single scale (the model's sliding windows), 5 synthetic validation scenes, batch 1."""
    output_dir = tmp_path_factory.mktemp("single") / "out"
    argv = ["--model_name_or_path", str(model_dir), "--max_eval_samples", "5", "--output_dir", str(output_dir)]
    return run_evaluation([*argv, "--num_visualized_images", "3"]), output_dir


def test_metrics_equal_a_numpy_confusion_matrix_of_predict_probabilities(model_dir, single_process):
    results, output_dir = single_process
    examples = list(load_synthetic_dataset("validation", 5))
    labels = [np.asarray(example["label"]).astype(np.int64) for example in examples]
    expected = numpy_metrics(direct_predictions(model_dir, examples), labels)
    assert expected["confusion"].diagonal().sum() > 0 and np.count_nonzero(expected["confusion"].sum(0)) > 2
    assert_metrics_equal(results, expected)

    written = json.loads((output_dir / "eval_results.json").read_text())
    assert written == results
    assert written["protocol"] == {
        "mode": "slide",
        "crop_size": [64, 64],
        "stride": [42, 42],  # the authors' two thirds of the crop
        "scale_ratios": None,
        "flip": False,
        "resize": {"shortest_edge": 96, "longest_edge": 192},
    }
    assert written["model_name_or_path"] == str(model_dir) and written["revision"] is None
    assert written["commit_hash"] is None and written["eval_samples"] == 5 and written["num_processes"] == 1
    assert written["mixed_precision"] == "no" and written["torch_compile"] is False and not written["channels_last"]
    assert written["dataset"]["source"] == "synthetic" and written["eval_runtime_seconds"] > 0
    report = (output_dir / "eval_results.md").read_text()
    for name in SYNTHETIC_CLASS_NAMES:
        iou = results["eval_per_category_iou"][name]
        assert f"| {name} | {'n/a' if iou is None else f'{100 * iou:.2f}'} |" in report
    assert f"| **mean** | **{100 * results['eval_mean_iou']:.2f}** |" in report
    picture = Image.open(output_dir / "eval_predictions.png")
    assert picture.width > 3 * 160 and picture.height > 3 * 160  # 3 rows of image | ground truth | prediction


def _write_folder_dataset(folder: Path) -> list[dict]:
    """Synthetic scenes cut to different sizes, as a flat images/ + annotations/ folder (no class names)."""
    boxes = [(0, 0, 128, 128), (0, 0, 128, 128), (16, 0, 112, 128)]  # two of one size share a batch
    examples = []
    for index, (example, box) in enumerate(zip(load_synthetic_dataset("validation", 3), boxes, strict=True)):
        image, label = example["image"].crop(box), example["label"].crop(box)
        for subfolder, picture in (("images", image), ("annotations", label)):
            (folder / subfolder).mkdir(parents=True, exist_ok=True)
            picture.save(folder / subfolder / f"{index}.png")
        examples.append({"image": image, "label": label})
    return examples


def test_multi_scale_flip_equals_predict_probabilities_on_the_processor_inputs(model_dir, tmp_path):
    """--multi_scale --flip on images of different sizes (one batch) equals `predict_probabilities` on the
    processor's list of scales with `flip=True`, image by image; the classes come from the model."""
    examples = _write_folder_dataset(tmp_path / "data")
    argv = ["--model_name_or_path", str(model_dir), "--train_dir", str(tmp_path / "data")]
    argv += ["--validation_dir", str(tmp_path / "data"), "--multi_scale", "--flip"]
    argv += ["--per_device_eval_batch_size", "3"]
    results = run_evaluation([*argv, "--output_dir", str(tmp_path / "out"), "--num_visualized_images", "0"])
    predictions = direct_predictions(model_dir, examples, scale_ratios=MULTI_SCALE_RATIOS, flip=True)
    assert_metrics_equal(results, numpy_metrics(predictions, [np.asarray(ex["label"]) for ex in examples]))
    assert results["protocol"]["scale_ratios"] == list(MULTI_SCALE_RATIOS) and results["protocol"]["flip"]
    assert results["dataset"]["source"] == "folder" and not (tmp_path / "out" / "eval_predictions.png").exists()


def test_bf16_and_torch_compile(model_dir, tmp_path):
    """--bf16 runs the protocol under bfloat16 autocast, --torch_compile through compiled modules (the eager backend
    here: the same operations, traced by dynamo)."""
    argv = ["--model_name_or_path", str(model_dir), "--max_eval_samples", "2", "--output_dir", str(tmp_path)]
    argv += ["--bf16", "--torch_compile", "--torch_compile_backend", "eager", "--num_visualized_images", "0"]
    torch._dynamo.reset()
    counters.clear()
    results = run_evaluation(argv)
    assert counters["stats"]["unique_graphs"] >= 4  # the image encoder, prompting, FPN neck and head at least
    torch._dynamo.reset()
    examples = list(load_synthetic_dataset("validation", 2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        predictions = direct_predictions(model_dir, examples)
    assert_metrics_equal(results, numpy_metrics(predictions, [np.asarray(ex["label"]) for ex in examples]))
    assert results["mixed_precision"] == "bf16" and results["torch_compile"] is True


def test_channels_last(model_dir, tmp_path, monkeypatch):
    """--channels_last evaluates with every convolution weight in channels-last memory: the metrics of the same model
    converted by hand, and the setting is recorded."""
    evaluated = []

    def evaluate(model, *args, **kwargs):
        evaluated.append([module.weight for module in model.modules() if isinstance(module, torch.nn.Conv2d)])
        return original_evaluate(model, *args, **kwargs)

    original_evaluate = evaluation_job.evaluate
    monkeypatch.setattr(evaluation_job, "evaluate", evaluate)
    argv = ["--model_name_or_path", str(model_dir), "--max_eval_samples", "2", "--output_dir", str(tmp_path)]
    results = run_evaluation([*argv, "--channels_last", "--num_visualized_images", "0"])
    (weights,) = evaluated
    assert all(weight.is_contiguous(memory_format=torch.channels_last) for weight in weights)
    assert any(not weight.is_contiguous() for weight in weights)  # 1x1 kernels are both; the 3x3 ones changed
    examples = list(load_synthetic_dataset("validation", 2))
    predictions = direct_predictions(model_dir, examples, memory_format=torch.channels_last)
    assert_metrics_equal(results, numpy_metrics(predictions, [np.asarray(ex["label"]) for ex in examples]))
    assert results["channels_last"] is True
    assert "channels-last weights: True" in (tmp_path / "eval_results.md").read_text()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_processes_equal_one(model_dir, single_process, tmp_path):
    """2 CPU processes (5 images: the last batch is evened out with a repeated image that must not count) give the
    metrics of 1; the model is read by Hub id and revision from an offline Hub cache, and its commit recorded."""
    snapshot = tmp_path / "hub" / f"models--{HUB_ID.replace('/', '--')}"
    shutil.copytree(model_dir, snapshot / "snapshots" / COMMIT)
    (snapshot / "refs").mkdir()
    (snapshot / "refs" / "main").write_text(COMMIT)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launcher += ["--main_process_port", str(_free_port())]
    args = ["--model_name_or_path", HUB_ID, "--revision", "main", "--max_eval_samples", "5"]
    args += ["--output_dir", str(tmp_path / "out"), "--num_visualized_images", "0"]
    environment = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    environment["HF_HUB_OFFLINE"] = "1"
    completed = subprocess.run(
        [*launcher, str(SCRIPT), *args], capture_output=True, text=True, timeout=600, env=environment
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "evaluation: 100%" in completed.stderr
    assert completed.stderr.count("pixel accuracy:") == 1  # the per-class table, printed by the main process
    results = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert results["num_processes"] == 2 and results["eval_samples"] == 5
    assert results["model_name_or_path"] == HUB_ID and results["revision"] == "main"
    assert results["commit_hash"] == COMMIT
    one_process = single_process[0]
    for name in METRICS:
        assert results[f"eval_{name}"] == one_process[f"eval_{name}"], name


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({}, ("slide", (64, 64), (42, 42))),  # the model's config
        ({"crop_size": [48]}, ("slide", (48, 48), (32, 32))),  # the authors' stride for the given crop
        ({"crop_size": [48, 64], "stride": [16]}, ("slide", (48, 64), (16, 16))),
        ({"mode": "whole"}, ("whole", None, None)),
    ],
)
def test_protocol_flags_override_the_model_config(model_dir, settings, expected):
    config = evaluation_job.load_evaluated_config(str(model_dir))
    protocol = evaluation_job.ProtocolArguments(**settings, multi_scale=True).resolve(config)
    assert (protocol.mode, protocol.crop_size, protocol.stride) == expected
    assert protocol.scale_ratios == MULTI_SCALE_RATIOS and not protocol.flip


def _fail(*args, **kwargs):
    raise AssertionError("the evaluation did work before rejecting its flags")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--crop_size", "40"], "`--crop_size`=40 does not fit the model"),
        (["--stride", "80"], "`--stride`=80 must be"),
        (["--crop_size", "64", "--mode", "whole"], "do not apply to `--mode`='whole'"),
        (["--id2label", "{names}"], "The model predicts 10 classes but the dataset has 3"),
    ],
)
def test_bad_flags_fail_before_any_work(model_dir, tmp_path, monkeypatch, flags, message):
    """Flags that contradict the model fail with a message naming the flag before the weights are loaded (and,
    but for the class check, before the data)."""
    (tmp_path / "names.json").write_text(json.dumps(["a", "b", "c"]))
    flags = [flag.format(names=tmp_path / "names.json") for flag in flags]
    monkeypatch.setattr(evaluation_job.DenseClipForSemanticSegmentation, "from_pretrained", _fail)
    if "--id2label" not in flags:
        monkeypatch.setattr(evaluation_job.DataArguments, "load", _fail)
    argv = ["--model_name_or_path", str(model_dir), "--output_dir", str(tmp_path / "out"), *flags]
    with pytest.raises(ValueError) as error:
        run_evaluation([*argv, "--max_eval_samples", "1"])
    assert message in str(error.value)
    assert not (tmp_path / "out").exists()


def test_bad_models_and_arguments_are_clear_errors(model_dir, tiny_clip_dir, tmp_path, capsys):
    for argv, message in [
        (["--mode", "tiles"], "invalid choice: 'tiles'"),
        (["--crop_size", "64", "64", "64"], "--crop_size takes one or two positive sizes"),
        (["--per_device_eval_batch_size", "0"], "--per_device_eval_batch_size must be > 0"),
    ]:
        with pytest.raises(SystemExit):
            parse_evaluation_args(["--model_name_or_path", str(model_dir), *argv])
        assert message in capsys.readouterr().err
    without_processor = tmp_path / "no-processor"
    shutil.copytree(model_dir, without_processor)
    (without_processor / "preprocessor_config.json").unlink()
    for path, message in [
        (tmp_path / "missing", "Could not load a model config"),
        (tiny_clip_dir, "is a 'clip' model, not DenseCLIP"),
        (without_processor, "has no preprocessor_config.json"),
    ]:
        with pytest.raises(ValueError, match=message):
            run_evaluation(["--model_name_or_path", str(path), "--output_dir", str(tmp_path / "out")])


def test_model_by_repo_id_and_revision_from_the_hub(model_dir, single_process, hub_repo_id, tmp_path):
    """`--model_name_or_path ORG/NAME --revision v1` through the real Hub client (the loopback Hub): the tagged
    version is evaluated, not the newer main, and its commit is recorded."""
    api = HfApi(token=TOKEN)
    api.create_repo(hub_repo_id)
    first = api.upload_folder(repo_id=hub_repo_id, folder_path=model_dir)
    api.create_tag(hub_repo_id, tag="v1")
    retrained = DenseClipForSemanticSegmentation.from_pretrained(model_dir)
    with torch.no_grad():
        retrained.decoder.head.classifier.weight.neg_()
    retrained.push_to_hub(hub_repo_id, token=TOKEN)
    argv = ["--model_name_or_path", hub_repo_id, "--revision", "v1", "--max_eval_samples", "5"]
    results = run_evaluation([*argv, "--output_dir", str(tmp_path), "--num_visualized_images", "0"])
    assert_metrics_equal(results, {name: single_process[0][f"eval_{name}"] for name in METRICS})
    assert (results["model_name_or_path"], results["revision"]) == (hub_repo_id, "v1")
    assert results["commit_hash"] == first.oid
    on_main = run_evaluation(
        [*argv[:2], *argv[4:], "--output_dir", str(tmp_path / "main"), "--num_visualized_images", "0"]
    )
    assert on_main["commit_hash"] != first.oid and on_main["eval_mean_iou"] != results["eval_mean_iou"]
