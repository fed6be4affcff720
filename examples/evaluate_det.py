"""Evaluate a DenseCLIP detector (RetinaNet or Mask R-CNN) with COCO AP by pycocotools, with Accelerate.

    accelerate launch examples/evaluate_det.py --model_name_or_path outputs/denseclip-det-synthetic   # synthetic
    accelerate launch examples/evaluate_det.py --model_name_or_path denseclip-maskrcnn-rn50-coco \\
        --coco_dir data/coco                                   # COCO val2017: the paper's Table 3 / 4 numbers
    accelerate launch examples/evaluate_det.py --model_name_or_path ... --dataset_name ORG/NAME   # a Hub dataset

Writes eval_results.json, eval_results.md, coco_results.json and eval_predictions.png to --output_dir. `python
examples/evaluate_det.py --help` lists every flag; see docs/detection.md.
"""

from denseclip_hf.training.detection_evaluation_job import evaluate_detector, parse_detection_evaluation_args


def main(argv: list[str] | None = None) -> dict:
    return evaluate_detector(parse_detection_evaluation_args(argv))


if __name__ == "__main__":
    main()
