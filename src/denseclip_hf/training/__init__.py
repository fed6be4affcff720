"""Training DenseCLIP for semantic segmentation (`examples/train_seg.py`)."""
