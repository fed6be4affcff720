"""Train DenseCLIP for semantic segmentation with Accelerate.

    accelerate launch examples/train_seg.py                      # offline demo: synthetic scenes, random weights
    accelerate launch --multi_gpu --num_processes 8 examples/train_seg.py \\
        --recipe ade20k-vit-b16 --model_name_or_path openai/clip-vit-base-patch16 \\
        --train_dir data/ADEChallengeData2016 --do_reduce_labels   # the paper's ViT-B/16 ADE20K run

`python examples/train_seg.py --help` lists every flag; see docs/training.md.
"""

from denseclip_hf.training.arguments import parse_training_args
from denseclip_hf.training.loop import train


def main(argv: list[str] | None = None) -> dict:
    return train(parse_training_args(argv))


if __name__ == "__main__":
    main()
