"""COCO evaluation of the detectors: results equal the authors' `results2json` of their detections (fixtures), the
metrics equal an independent `pycocotools` run over the results file written to disk, two processes equal one, the
job's outputs on the synthetic scenes, and bad inputs."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from conftest import reset_accelerate
from datasets import Dataset, Features, Value
from datasets import Image as ImageFeature
from detection_fixtures import FIXTURE_SIZE, detector, fixture, is_retinanet, rgb_image, tiny_config
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from test_detection_data import write_coco_folder

from denseclip_hf import (
    DenseClipDetectionImageProcessor,
    DenseClipForInstanceSegmentation,
    DenseClipForObjectDetection,
)
from denseclip_hf.synthetic import SYNTHETIC_DETECTION_CLASS_NAMES, load_synthetic_dataset
from denseclip_hf.training.detection_data import load_detection_data
from denseclip_hf.training.detection_evaluation import coco_metrics, detection_results, evaluate_detection
from denseclip_hf.training.detection_evaluation_job import evaluate_detector, parse_detection_evaluation_args
from denseclip_hf.visualization import detection_grid, draw_detections

SCRIPT = Path(__file__).parents[1] / "examples" / "evaluate_det.py"
MODELS = {"retinanet": DenseClipForObjectDetection, "maskrcnn": DenseClipForInstanceSegmentation}
SUFFIXES = ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l")
pytestmark = pytest.mark.usefixtures("datasets_cache")  # COCO folders are cached by `datasets`: here, per test


@pytest.fixture
def accelerator():
    reset_accelerate()
    yield Accelerator(cpu=True)
    reset_accelerate()


def random_detector(name: str):
    """A tiny random detector for the synthetic classes that keeps every detection (score threshold 0), so that even
    untrained it gives 100 detections per image to score."""
    torch.manual_seed(0)
    config = tiny_config(name, SYNTHETIC_DETECTION_CLASS_NAMES)
    config.score_threshold = 0.0
    return MODELS[name](config).eval()


def processor() -> DenseClipDetectionImageProcessor:
    return DenseClipDetectionImageProcessor(size=dict(FIXTURE_SIZE))


def run_job(argv: list[str]) -> dict:
    reset_accelerate()
    try:
        return evaluate_detector(parse_detection_evaluation_args(argv))
    finally:
        reset_accelerate()


def independent_metrics(gt_file: Path, results_file: Path, iou_type: str) -> list[float]:
    """`COCOeval` over the two files, the way mmdet calls it (segm results without their boxes)."""
    ground = COCO(str(gt_file))
    results = json.loads(results_file.read_text())
    if iou_type == "segm":
        results = [{key: value for key, value in result.items() if key != "bbox"} for result in results]
    evaluation = COCOeval(ground, ground.loadRes(results), iou_type)
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    return [float(value) for value in evaluation.stats[:6]]


def written_ground_truth(dataset, path: Path) -> Path:
    """The dataset's COCO json, written here from its columns (category id = label + 1)."""
    names = dataset.features["objects"]["category"].feature.names
    images, annotations = [], []
    for example in dataset:
        images.append({"id": example["image_id"], "width": example["width"], "height": example["height"]})
        objects = example["objects"]
        for index in range(len(objects["bbox"])):
            annotations.append(
                {
                    "id": 1000 + len(annotations),
                    "image_id": example["image_id"],
                    "category_id": objects["category"][index] + 1,
                    "bbox": objects["bbox"][index],
                    "area": objects["area"][index],
                    "iscrowd": objects["iscrowd"][index],
                    "segmentation": objects["segmentation"][index],
                }
            )
    categories = [{"id": label + 1, "name": name} for label, name in enumerate(names)]
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Results and metrics
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["retinanet", "maskrcnn"])
def test_results_are_the_authors_results2json_of_their_detections(accelerator, name):
    """The authors' final detections of the fixture images (`bbox2result` per class: boxes + scores, masks) made into
    COCO results here as mmdet's `results2json` does, against `detection_results` of the same model and images."""
    tensors, meta = fixture(name)
    category_ids = [1, 2, 3, 10, 11][: len(meta["class_names"])]
    image_ids = [42, 7]
    features = Features({"image": ImageFeature(), "image_id": Value("int64")})
    images = [Image.fromarray(rgb_image(name, image)) for image in (0, 1)]
    dataset = Dataset.from_dict({"image": images, "image_id": image_ids}, features=features)
    results = detection_results(detector(name), processor(), dataset, accelerator, category_ids=category_ids)
    expected = []
    for image, image_id in enumerate(image_ids):
        boxes = tensors[f"expected.img{image}.det_bboxes"].numpy()
        labels = tensors[f"expected.img{image}.det_labels"].tolist()
        for index, (row, label) in enumerate(zip(boxes, labels, strict=True)):
            x1, y1, x2, y2, score = row.tolist()
            result = {"image_id": image_id, "category_id": category_ids[label], "bbox": [x1, y1, x2 - x1, y2 - y1]}
            result["score"] = score
            if not is_retinanet(name):
                mask = tensors[f"expected.img{image}.det_masks"][index].numpy()
                rle = mask_utils.encode(np.array(mask[:, :, None], order="F", dtype="uint8"))[0]
                result["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
            expected.append(result)
    # The authors list the detections class by class (score order within a class), the model by score overall.
    ordered = sorted(results, key=lambda result: (image_ids.index(result["image_id"]), result["category_id"]))
    assert len(ordered) == len(expected) == sum(meta["detection_counts"].values())
    for got, want in zip(ordered, expected, strict=True):
        assert (got["image_id"], got["category_id"]) == (want["image_id"], want["category_id"])
        np.testing.assert_allclose(got["bbox"], want["bbox"], rtol=2e-6, atol=2e-4)
        assert got["score"] == pytest.approx(want["score"], rel=1e-5)
        assert got.get("segmentation") == want.get("segmentation")


@pytest.mark.parametrize("name", ["retinanet", "maskrcnn"])
def test_metrics_equal_an_independent_pycocotools_run_over_the_files(accelerator, tmp_path, name):
    """Synthetic scenes (a crowd object among them), a random tiny detector: `coco_metrics` of the results equals
    `COCOeval` run here over the results file and a ground-truth json written to disk, and the results file
    round-trips through `COCO.loadRes` (segm areas from the masks)."""
    dataset = load_synthetic_dataset("validation", 20, task="detection").select([0, 19])
    assert 1 in [flag for objects in dataset["objects"] for flag in objects["iscrowd"]]
    model = random_detector(name)
    category_ids = [1, 2, 3, 4]
    results = detection_results(model, processor(), dataset, accelerator, category_ids=category_ids)
    assert len(results) == 2 * model.config.max_detections
    # The objects of the first scene found as well (boxes and masks as they are), so that the metrics are not all 0.
    objects = dataset[0]["objects"]
    for box, label, rle in zip(objects["bbox"], objects["category"], objects["segmentation"], strict=True):
        found = {"image_id": 0, "category_id": category_ids[label], "bbox": box, "score": 0.99}
        results.append(found if name == "retinanet" else {**found, "segmentation": rle})
    results_file = tmp_path / "results.json"
    results_file.write_text(json.dumps(results))
    gt_file = written_ground_truth(dataset, tmp_path / "gt.json")
    iou_types = ("bbox",) if name == "retinanet" else ("bbox", "segm")
    from_dataset = coco_metrics(dataset, results, iou_types, category_ids=category_ids)
    from_json = coco_metrics(json.loads(gt_file.read_text()), results, iou_types)
    assert from_dataset == from_json
    for iou_type in iou_types:
        expected = independent_metrics(gt_file, results_file, iou_type)
        assert [from_dataset[f"{iou_type}_{suffix}"] for suffix in SUFFIXES] == expected
        assert 0 < from_dataset[f"{iou_type}_mAP_50"] < 1
    # Two same-size images per forward: the same detections as one by one (in eval mode nothing mixes a batch).
    evaluated = evaluate_detection(
        model, processor(), dataset, category_ids, accelerator, batch_size=2, progress=False
    )
    assert evaluated == coco_metrics(dataset, results[: 2 * model.config.max_detections], iou_types, category_ids)
    loaded = COCO(str(gt_file)).loadRes(str(results_file))
    assert len(loaded.anns) == len(results)
    for annotation, result in zip(loaded.anns.values(), results, strict=True):
        assert annotation["bbox"] == result["bbox"] and annotation["score"] == result["score"]
    if name == "maskrcnn":  # as segm results (mmdet's way, without boxes): COCO takes the areas from the masks
        masks_only = [{key: value for key, value in result.items() if key != "bbox"} for result in results]
        for annotation, result in zip(COCO(str(gt_file)).loadRes(masks_only).anns.values(), results, strict=True):
            assert annotation["area"] == mask_utils.decode(result["segmentation"]).sum()


def test_coco_folder_is_scored_against_its_own_json(accelerator, tmp_path):
    """A COCO folder: the job's ground truth is the annotation file itself, restricted to the evaluated images; it
    equals scoring against the dataset made from it."""
    write_coco_folder(tmp_path)
    data = load_detection_data(coco_dir=tmp_path, max_eval_samples=1)
    results = [{"image_id": 11, "category_id": 3, "bbox": [4.0, 6.0, 20.0, 10.0], "score": 0.9},
               {"image_id": 11, "category_id": 7, "bbox": [10.0, 12.0, 12.0, 20.0], "score": 0.8}]  # fmt: skip
    content = json.loads(Path(data.validation_annotation_file).read_text())
    on_file = coco_metrics(content, results, ("bbox",), image_ids=data.validation["image_id"])
    on_dataset = coco_metrics(data.validation, results, ("bbox",), category_ids=data.category_ids)
    assert on_file == on_dataset
    # Image 11 has one car and one kite, found with IoU 195 / 205 (AP 1 at every threshold 0.5..0.95) and 216 / 264
    # (0.82: AP 1 at 0.5..0.8, 0 above, 0.7 over the 10 thresholds); person, only in image 5, is left out.
    assert on_file["bbox_mAP_75"] == pytest.approx(1.0) and on_file["bbox_mAP"] == pytest.approx(0.85)


def test_no_detections_score_zero_and_bad_requests_raise():
    dataset = load_synthetic_dataset("validation", 2, task="detection")
    metrics = coco_metrics(dataset, [], ("bbox", "segm"))
    assert metrics["bbox_mAP"] == metrics["segm_mAP_50"] == 0.0
    with pytest.raises(ValueError, match="iou_types must be a non-empty selection"):
        coco_metrics(dataset, [], ("keypoints",))
    result = {"image_id": 0, "category_id": 0, "bbox": [1.0, 1.0, 5.0, 5.0], "score": 0.5}
    with pytest.raises(ValueError, match="results with a 'segmentation'"):
        coco_metrics(dataset, [result], ("segm",))
    boxes_only = dataset.map(
        lambda objects: {"objects": {**objects, "segmentation": [None] * len(objects["bbox"])}},
        input_columns=["objects"],
    )
    with pytest.raises(ValueError, match="needs a mask"):
        coco_metrics(boxes_only, [], ("segm",))


# ---------------------------------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    folders = {}
    for name in MODELS:
        folder = tmp_path_factory.mktemp(f"tiny-{name}")
        random_detector(name).save_pretrained(folder)
        processor().save_pretrained(folder)
        folders[name] = folder
    return folders


@pytest.fixture(scope="module")
def single_process(model_dirs, tmp_path_factory) -> tuple[dict, Path]:
    output_dir = tmp_path_factory.mktemp("single") / "out"
    argv = ["--model_name_or_path", str(model_dirs["maskrcnn"]), "--max_eval_samples", "5"]
    return run_job([*argv, "--output_dir", str(output_dir), "--num_visualized_images", "2"]), output_dir


def test_job_outputs_on_the_synthetic_scenes(single_process, tmp_path):
    summary, output_dir = single_process
    assert json.loads((output_dir / "eval_results.json").read_text()) == summary
    assert summary["eval_samples"] == 5 and summary["num_processes"] == 1 and summary["architecture"] == "mask_rcnn"
    assert summary["commit_hash"] is None and summary["dataset"]["source"] == "synthetic"
    assert summary["protocol"]["iou_types"] == ["bbox", "segm"] and summary["num_detections"] == 500
    # The written results file scored independently (ground truth written here from the same scenes) gives the
    # reported metrics.
    dataset = load_synthetic_dataset("validation", 5, task="detection")
    results_file = output_dir / "coco_results.json"
    remapped = [
        {**result, "category_id": result["category_id"] + 1} for result in json.loads(results_file.read_text())
    ]
    (tmp_path / "results.json").write_text(json.dumps(remapped))
    gt_file = written_ground_truth(dataset, tmp_path / "gt.json")
    for iou_type in ("bbox", "segm"):
        expected = independent_metrics(gt_file, tmp_path / "results.json", iou_type)
        assert [summary[f"eval_{iou_type}_{suffix}"] for suffix in SUFFIXES] == expected
    report = (output_dir / "eval_results.md").read_text()
    assert "| IoU type | AP | AP50 | AP75 | APs | APm | APl |" in report and "| segm |" in report
    with Image.open(output_dir / "eval_predictions.png") as picture:
        assert picture.width > 2 * 320 and picture.height > 2 * 320


def test_channels_last_gives_the_detections_of_the_default_layout(single_process, model_dirs, tmp_path, monkeypatch):
    """--channels_last evaluates with the convolution weights in channels-last memory: the same detections as the
    default layout (`single_process`) up to float rounding, and the setting is recorded."""
    from denseclip_hf.training import detection_evaluation_job

    evaluated = []
    original = detection_evaluation_job.detection_results

    def recording(model, *args, **kwargs):
        evaluated.append([module.weight for module in model.modules() if isinstance(module, torch.nn.Conv2d)])
        return original(model, *args, **kwargs)

    monkeypatch.setattr(detection_evaluation_job, "detection_results", recording)
    argv = ["--model_name_or_path", str(model_dirs["maskrcnn"]), "--max_eval_samples", "5", "--channels_last"]
    summary = run_job([*argv, "--output_dir", str(tmp_path), "--num_visualized_images", "0"])
    (weights,) = evaluated
    assert all(weight.is_contiguous(memory_format=torch.channels_last) for weight in weights)
    assert any(not weight.is_contiguous() for weight in weights)  # 1x1 kernels are both; the 3x3 ones changed
    assert summary["channels_last"] is True and single_process[0]["channels_last"] is False
    ours = json.loads((tmp_path / "coco_results.json").read_text())
    default = json.loads((single_process[1] / "coco_results.json").read_text())
    assert [(r["image_id"], r["category_id"]) for r in ours] == [(r["image_id"], r["category_id"]) for r in default]
    np.testing.assert_allclose([r["bbox"] for r in ours], [r["bbox"] for r in default], rtol=0, atol=1e-3)
    np.testing.assert_allclose([r["score"] for r in ours], [r["score"] for r in default], rtol=1e-4, atol=1e-6)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_processes_equal_one(model_dirs, single_process, tmp_path):
    """2 CPU processes on 5 images (3 + 2: no padding, no repeat) give the results file and metrics of 1."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launcher += ["--main_process_port", str(_free_port())]
    args = ["--model_name_or_path", str(model_dirs["maskrcnn"]), "--max_eval_samples", "5"]
    args += ["--output_dir", str(tmp_path / "out"), "--num_visualized_images", "0"]
    environment = {**os.environ, "ACCELERATE_USE_CPU": "1"}
    completed = subprocess.run(
        [*launcher, str(SCRIPT), *args], capture_output=True, text=True, timeout=600, env=environment
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "evaluation: 100%" in completed.stderr
    summary = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    one_process, one_dir = single_process
    assert summary["num_processes"] == 2
    metrics = {key: value for key, value in summary.items() if key.startswith("eval_") and "runtime" not in key}
    assert metrics == {key: one_process[key] for key in metrics}
    assert (tmp_path / "out" / "coco_results.json").read_text() == (one_dir / "coco_results.json").read_text()


@pytest.mark.parametrize(
    "make_folder, message",
    [
        (lambda dirs, tmp: tmp / "missing", "Could not load a model config"),
        (lambda dirs, tmp: _without_processor(dirs["retinanet"], tmp), "has no preprocessor_config.json"),
        (lambda dirs, tmp: _fixture_model(tmp), "The model predicts 5 classes but the dataset has 4"),
    ],
)
def test_bad_models_are_clear_errors(model_dirs, tmp_path, make_folder, message):
    folder = make_folder(model_dirs, tmp_path)
    with pytest.raises(ValueError, match=message):
        run_job(["--model_name_or_path", str(folder), "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def _without_processor(folder: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "no-processor"
    copy.mkdir()
    for path in folder.iterdir():
        if path.name != "preprocessor_config.json":
            (copy / path.name).write_bytes(path.read_bytes())
    return copy


def _fixture_model(tmp_path: Path) -> Path:
    detector("retinanet").save_pretrained(tmp_path / "five-classes")
    processor().save_pretrained(tmp_path / "five-classes")
    return tmp_path / "five-classes"


def test_bad_flags_exit_with_a_message(capsys):
    for argv, message in [
        (["--coco_dir", "nowhere"], "--coco_dir nowhere is not a folder"),
        (["--visualization_threshold", "1.5"], "--visualization_threshold must be in [0, 1)"),
        (["--max_eval_samples", "0"], "--max_eval_samples must be > 0"),
    ]:
        with pytest.raises(SystemExit):
            parse_detection_evaluation_args(["--model_name_or_path", "x", *argv])
        assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------------------------------


def test_draw_detections_blends_masks_and_outlines_boxes_in_class_colours():
    image = np.full((40, 60, 3), 100, dtype=np.uint8)
    mask = np.zeros((40, 60), dtype=bool)
    mask[20:30, 5:15] = True
    palette = np.array([[255, 0, 0], [0, 0, 255]], dtype=np.uint8)
    boxes = torch.tensor([[30.0, 25.0, 50.0, 35.0], [4.0, 19.0, 16.0, 31.0]])
    drawn = np.asarray(
        draw_detections(image, boxes, [0, 1], [0.9, 0.5], {0: "car", 1: "tree"}, [np.zeros_like(mask), mask], palette)
    )
    assert drawn.shape == (40, 60, 3)
    blended = np.rint(0.5 * 100 + 0.5 * palette[1]).astype(np.uint8)
    assert (drawn[24:29, 6:14] == blended).all()  # inside the mask, away from the outline
    assert (drawn[35, 40] == palette[0]).all() and (drawn[30, 50] == palette[0]).all()  # the car's box outline
    assert (drawn[20:32, 4] == palette[1]).all()  # the tree's left edge
    # Captions sit on tabs above the boxes (font_size_for(60) = 12 pixels + 2); nothing above them or right below.
    assert (drawn[:5] == 100).all() and (drawn[36:, 20:] == 100).all()
    with pytest.raises(ValueError, match="labels must be class ids 0..1"):
        draw_detections(image, boxes, [0, 2], None, ["car", "tree"])
    with pytest.raises(ValueError, match="one mask per detection at the image's size"):
        draw_detections(image, boxes, [0, 1], None, ["car", "tree"], masks=[mask[:20]] * 2)


def test_detection_grid_draws_ground_truth_and_predictions_per_image():
    scenes = load_synthetic_dataset("validation", 2, task="detection")
    truth = [{"boxes": [[1, 2, 30, 40]], "labels": [1], "masks": None}, {"boxes": [], "labels": []}]
    found = {
        "boxes": torch.tensor([[1.0, 2.0, 30.0, 40.0]]),
        "labels": torch.tensor([1]),
        "scores": torch.tensor([0.8]),
    }
    predictions = [found, {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)}]
    grid = detection_grid(list(scenes["image"]), predictions, SYNTHETIC_DETECTION_CLASS_NAMES, truth, tile_height=64)
    assert grid.height > 2 * 64 and grid.width > 2 * 64
    with pytest.raises(ValueError, match="1 prediction entries"):
        detection_grid(list(scenes["image"]), predictions[:1], SYNTHETIC_DETECTION_CLASS_NAMES)
