"""The output folder of a training run as a model repository, published so that a crash never leaves a loadable mix.

`output_dir` holds the repository files at its top level (what `from_pretrained(output_dir)` reads) next to the
run's `checkpoints/` and `runs/`, so the folder itself cannot be swapped by one rename. [`publish_repository`]
makes the weights' entry point (`model.safetensors`, or the index of sharded weights) the commit mark instead: without
it, `from_pretrained` raises an `OSError` ("no file named model.safetensors"), while a missing `config.json` is not
enough (a model class's `from_pretrained` then falls back to its default config).

1. every file (weights and code, processor, results, model card, pictures) is written into
   `<output_dir>/.tmp-repository/` and flushed to disk. A crash here leaves the previous repository of `output_dir`
   (a re-run into the same folder) complete and loadable; the hidden staging folder is never loaded;
2. the previous weights are deleted, their entry point first, then its `config.json`: from here on
   `from_pretrained(output_dir)` raises an `OSError` rather than load anything;
3. every new file but the entry point is renamed into place (each rename is atomic, so every file present is
   complete), then the entry point: the folder loads the new repository, all of it.

A crash during 2 or 3 leaves a folder without weights: relaunching the run with `--resume_from_checkpoint latest`
publishes it again. Each save first removes a `.tmp-repository/` left behind by an interrupted one.
"""

import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from transformers.utils import (
    CONFIG_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
)

from ..file_utils import fsync_directory, fsync_file

logger = logging.getLogger(__name__)

STAGING_DIR_NAME = ".tmp-repository"
# The files from which `from_pretrained` starts loading weights, in its order of preference.
WEIGHTS_ENTRY_NAMES = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
# Every file that `from_pretrained` may load weights from: the entry points and the shards they list.
_WEIGHTS_PATTERN = re.compile(r"(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?")


def _entry_point(names: set[str]) -> str:
    entries = [name for name in WEIGHTS_ENTRY_NAMES if name in names]
    if len(entries) != 1 or CONFIG_NAME not in names:
        raise ValueError(
            f"A model repository has a {CONFIG_NAME} and one of {WEIGHTS_ENTRY_NAMES}; the writer left "
            f"{sorted(names)}."
        )
    return entries[0]


def publish_repository(output_dir: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Publishes the files that `write(folder)` writes into `folder` as the model repository of `output_dir`.

    `write` must write flat files: a `config.json` and weights (`save_pretrained`), anything else beside them. At
    every moment `from_pretrained(output_dir)` loads either the previous repository or the new one, complete, or
    raises an `OSError` (see the module docstring). Returns `output_dir`.
    """
    output_dir = Path(output_dir)
    staging = output_dir / STAGING_DIR_NAME
    output_dir.mkdir(parents=True, exist_ok=True)
    if staging.exists():
        logger.warning(f"Removing {staging}, left behind by an interrupted save of the model repository.")
        shutil.rmtree(staging)
    staging.mkdir()
    write(staging)
    if any(not path.is_file() for path in staging.iterdir()):
        raise ValueError(f"A model repository is flat files; the writer left folders in {staging}.")
    new_names = {path.name for path in staging.iterdir()}
    entry_point = _entry_point(new_names)
    for name in new_names:
        fsync_file(staging / name)
    fsync_directory(staging)

    old_weights = sorted(
        (path for path in output_dir.iterdir() if path.is_file() and _WEIGHTS_PATTERN.fullmatch(path.name)),
        key=lambda path: path.name not in WEIGHTS_ENTRY_NAMES,  # entry points first
    )
    for path in [*old_weights, output_dir / CONFIG_NAME]:
        path.unlink(missing_ok=True)
    fsync_directory(output_dir)
    for name in sorted(new_names - {entry_point}):
        os.replace(staging / name, output_dir / name)
    fsync_directory(output_dir)
    os.replace(staging / entry_point, output_dir / entry_point)
    fsync_directory(output_dir)
    staging.rmdir()
    return output_dir


__all__ = ["STAGING_DIR_NAME", "WEIGHTS_ENTRY_NAMES", "publish_repository"]
