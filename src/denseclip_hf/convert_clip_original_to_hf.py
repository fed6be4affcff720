"""Converts CLIP weights in OpenAI's or OpenCLIP's format (a ViT) to a transformers `CLIPModel` folder with the CLIP
tokenizer:

    python -m denseclip_hf.convert_clip_original_to_hf --checkpoint ViT-B-16.pt --output_dir clip-vit-b16

ResNet CLIPs have no transformers `CLIPModel`: `DenseClipForSemanticSegmentation.from_clip_pretrained` takes their
files (and ViT files) directly and converts them in memory (`denseclip_hf.checkpoint_conversion.
convert_clip_checkpoint`).
"""

import argparse

from transformers import CLIPModel, CLIPTokenizer

from .checkpoint_conversion import convert_clip_checkpoint


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Convert an OpenAI/OpenCLIP CLIP ViT checkpoint to a transformers CLIPModel folder (with the CLIP "
        "tokenizer). ResNet CLIPs have no transformers CLIPModel: pass their files to "
        "DenseClipForSemanticSegmentation.from_clip_pretrained directly."
    )
    parser.add_argument("--checkpoint", required=True, help="OpenAI .pt (TorchScript or state dict) or OpenCLIP file")
    parser.add_argument("--output_dir", required=True, help="Folder to write the CLIPModel to")
    parser.add_argument("--vision_heads", type=int, help="ViT attention heads (default: width // 64)")
    parser.add_argument("--text_heads", type=int, help="Text attention heads (default: width // 64)")
    parser.add_argument(
        "--hidden_act", choices=("quick_gelu", "gelu"), help="quick_gelu (OpenAI, default) or gelu (most OpenCLIP)"
    )
    args = parser.parse_args(argv)
    clip = convert_clip_checkpoint(
        args.checkpoint, vision_heads=args.vision_heads, text_heads=args.text_heads, hidden_act=args.hidden_act
    )
    if not clip.image_tower.in_transformers_clip:
        parser.error(
            f"this is a {clip.image_tower.family} CLIP, which transformers' CLIPModel cannot hold: use "
            "DenseClipForSemanticSegmentation.from_clip_pretrained(checkpoint_path, id2label=...) instead."
        )
    model = CLIPModel(clip.clip_config())
    model.load_state_dict(clip.state_dict, strict=True)
    model.save_pretrained(args.output_dir)
    CLIPTokenizer.from_pretrained(clip.tokenizer_path).save_pretrained(args.output_dir)
    print(f"Wrote a CLIPModel ({clip.vision_config.num_hidden_layers}-layer ViT) to {args.output_dir}")


if __name__ == "__main__":
    main()
