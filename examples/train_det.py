"""Train a DenseCLIP detector (RetinaNet, Mask R-CNN) with Accelerate.

    accelerate launch examples/train_det.py                      # offline demo: synthetic scenes, random weights
    accelerate launch examples/train_det.py --model_type maskrcnn   # the same with Mask R-CNN
    accelerate launch --multi_gpu --num_processes 8 examples/train_det.py \\
        --recipe coco-retinanet-denseclip-rn50 --model_name_or_path RN50.pt --coco_dir data/coco   # paper Table 3

`python examples/train_det.py --help` lists every flag; see docs/detection.md, "Training".
"""

from denseclip_hf.training.detection_arguments import parse_detection_training_args
from denseclip_hf.training.loop import train


def main(argv: list[str] | None = None) -> dict:
    return train(parse_detection_training_args(argv))


if __name__ == "__main__":
    main()
