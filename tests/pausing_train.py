"""A training script (`examples/train_seg.py`, `examples/train_det.py`) that stops at a chosen moment, so that a test
can SIGKILL it exactly there.

Launched by the crash tests as `accelerate launch tests/pausing_train.py examples/train_<task>.py <its flags>`. With
`DENSECLIP_PAUSE_AT` set, the process writes the file `DENSECLIP_PAUSED_FILE` when it reaches the moment and then
waits for the test to kill it:

- `forward:N`: the N-th forward pass of the model (in the middle of a training step);
- `checkpoint:STEP`: the first `torch.save` into the temporary folder of checkpoint STEP (the optimizer state, after
  the model weights), after half of its bytes are on disk;
- `final-save`: the write of `model.safetensors` of the output repository, after half of its bytes are on disk.

The file writes are the library's own; only the byte count of the one interrupted file is cut.
"""

import io
import os
import runpy
import sys
import time
from pathlib import Path

import safetensors.torch
import torch
import transformers.modeling_utils

from denseclip_hf.modeling_denseclip import DenseClipForSemanticSegmentation
from denseclip_hf.modeling_denseclip_detection import DenseClipForInstanceSegmentation, DenseClipForObjectDetection
from denseclip_hf.training.repository import STAGING_DIR_NAME

# The models the training scripts train; `forward:N` counts the forward passes of whichever the run builds.
MODEL_CLASSES = (DenseClipForSemanticSegmentation, DenseClipForObjectDetection, DenseClipForInstanceSegmentation)


def pause(moment: str) -> None:
    marker = Path(os.environ["DENSECLIP_PAUSED_FILE"])
    marker.with_suffix(".partial").write_text(moment)
    os.replace(marker.with_suffix(".partial"), marker)
    while True:
        time.sleep(60)


def write_half(data: bytes, path: str | os.PathLike, moment: str) -> None:
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2])
        handle.flush()
        os.fsync(handle.fileno())
    pause(moment)


def install(moment: str) -> None:
    kind, _, value = moment.partition(":")
    if kind == "forward":
        calls = []

        def counting(forward):
            def counting_forward(self, *args, **kwargs):
                calls.append(1)
                if len(calls) == int(value):
                    pause(moment)
                return forward(self, *args, **kwargs)

            return counting_forward

        for model_class in MODEL_CLASSES:
            model_class.forward = counting(model_class.forward)
    elif kind == "checkpoint":
        torch_save = torch.save

        def slow_save(obj, f, *args, **kwargs):
            if isinstance(f, (str, os.PathLike)) and f".tmp-step_{value}" in str(f):
                buffer = io.BytesIO()
                torch_save(obj, buffer, *args, **kwargs)
                write_half(buffer.getvalue(), f, moment)
            return torch_save(obj, f, *args, **kwargs)

        torch.save = slow_save
    elif kind == "final-save":
        safe_save_file = transformers.modeling_utils.safe_save_file

        def slow_safe_save_file(tensors, filename, metadata=None):
            if Path(filename).parent.name == STAGING_DIR_NAME:
                write_half(safetensors.torch.save(tensors, metadata=metadata), filename, moment)
            return safe_save_file(tensors, filename, metadata=metadata)

        transformers.modeling_utils.safe_save_file = slow_safe_save_file
    else:
        raise ValueError(f"Unknown DENSECLIP_PAUSE_AT {moment!r}: forward:N, checkpoint:STEP or final-save.")


if __name__ == "__main__":
    if os.environ.get("DENSECLIP_PAUSE_AT"):
        install(os.environ["DENSECLIP_PAUSE_AT"])
    script = sys.argv.pop(1)  # the training script; its flags follow
    sys.argv[0] = script
    runpy.run_path(script, run_name="__main__")
