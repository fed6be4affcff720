"""A Gradio demo of DenseCLIP: upload an image, see its segmentation and which pixels match a class name.

    pip install -e ".[demo]"
    python examples/app.py                                    # the model of `accelerate launch examples/train_seg.py`
    python examples/app.py --model_name_or_path org/denseclip-vit-b16-ade20k    # a Hub repository or a folder

On a Hugging Face Space (this file as `app.py`), set the model with the Space variable `DENSECLIP_MODEL`. The logic is
`denseclip_hf.demo.SegmentationDemo`; this file is only the user interface. See docs/visualization.md.
"""

import argparse
import os

import gradio as gr

from denseclip_hf.demo import DEFAULT_MODEL, SegmentationDemo


def build_app(demo: SegmentationDemo) -> gr.Blocks:
    """The page: an image and a class in, the segmentation with its legend and the class's score map out."""

    def segment(image, class_name, all_classes):
        if image is None:
            raise gr.Error("Upload an image first.")
        try:
            return demo.pictures(image, class_name or None, legend="all" if all_classes else "present")
        except (TypeError, ValueError) as error:
            raise gr.Error(str(error)) from error

    def redraw(image, class_name, all_classes):
        """After another class or legend is chosen: new pictures, or none yet without an image."""
        return (gr.skip(), gr.skip()) if image is None else segment(image, class_name, all_classes)

    with gr.Blocks(title="DenseCLIP") as app:
        gr.Markdown(
            "# DenseCLIP semantic segmentation\n"
            "Upload an image: the left picture is the predicted segmentation, the right one the pixel-text score map "
            "of one class (cosine similarity of each pixel with the class name, the signal DenseCLIP adds to CLIP)."
        )
        with gr.Row():
            image = gr.Image(type="pil", label="Image", image_mode="RGB")
            with gr.Column():
                class_name = gr.Dropdown(
                    choices=demo.class_names, value=None, label="Score map of (empty: the best-matching class)"
                )
                all_classes = gr.Checkbox(value=False, label="Legend: every class (not only those predicted)")
                button = gr.Button("Segment", variant="primary")
        with gr.Row():
            overlay = gr.Image(type="pil", format="png", label="Segmentation")
            heatmap = gr.Image(type="pil", format="png", label="Score map")
        inputs, outputs = [image, class_name, all_classes], [overlay, heatmap]
        button.click(segment, inputs, outputs, api_name="segment")
        image.upload(segment, inputs, outputs, api_name=False)
        class_name.input(redraw, inputs, outputs, api_name=False)
        all_classes.input(redraw, inputs, outputs, api_name=False)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model_name_or_path",
        default=os.environ.get("DENSECLIP_MODEL", DEFAULT_MODEL),
        help=f"A saved model folder or a Hub repository id (default: $DENSECLIP_MODEL, else {DEFAULT_MODEL}).",
    )
    parser.add_argument("--revision", default=None, help="Hub branch, tag or commit.")
    parser.add_argument("--server_name", default=None, help="Address to listen on (Gradio's default: 127.0.0.1).")
    parser.add_argument(
        "--server_port", type=int, default=None, help="Port (Gradio's default: 7860 or the next free)."
    )
    args = parser.parse_args(argv)
    try:
        demo = SegmentationDemo.from_pretrained(args.model_name_or_path, revision=args.revision)
    except (OSError, ValueError) as error:
        parser.exit(1, f"{error}\n")
    build_app(demo).launch(server_name=args.server_name, server_port=args.server_port)


if __name__ == "__main__":
    main()
