"""Evaluate a DenseCLIP model for semantic segmentation with Accelerate, by the authors' test protocol.

    accelerate launch examples/evaluate_seg.py --model_name_or_path outputs/denseclip-synthetic   # synthetic scenes
    accelerate launch examples/evaluate_seg.py --model_name_or_path denseclip-vitb16-ade20k \\
        --train_dir data/ADEChallengeData2016 --do_reduce_labels                # the paper's single-scale number
    ... --multi_scale --flip                                                    # the paper's multi-scale number

Writes eval_results.json, eval_results.md and eval_predictions.png to --output_dir. `python
examples/evaluate_seg.py --help` lists every flag; see docs/inference.md.
"""

from denseclip_hf.training.evaluation_job import evaluate_model, parse_evaluation_args


def main(argv: list[str] | None = None) -> dict:
    return evaluate_model(parse_evaluation_args(argv))


if __name__ == "__main__":
    main()
