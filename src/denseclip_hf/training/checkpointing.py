"""Atomic training checkpoints: `accelerate` state folders that are either complete or ignored.

Layout under `<output_dir>/checkpoints/`:
- `.tmp-step_N/`: a checkpoint being written (left behind only by a crash; never loaded, removed by the next save);
- `step_N/`: a finished checkpoint: the `accelerate` state (model, optimizer, scheduler, RNG, ...) and, written last,
  `checkpoint_manifest.json` with the size and SHA-256 of every file. The folder is renamed from `.tmp-step_N` only
  after the manifest is on disk, so a `step_N` folder without a valid manifest is partial or corrupt.

`denseclip_hf.file_utils.write_text_atomically` writes any other file of a run (results, tables) the same way.
"""

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

from accelerate import Accelerator

from ..file_utils import fsync_directory, write_text_atomically

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR_NAME = "checkpoints"
MANIFEST_NAME = "checkpoint_manifest.json"
_CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")
_TEMPORARY_PREFIX = ".tmp-"


def checkpoints_root(output_dir: str | os.PathLike) -> Path:
    """The folder holding the checkpoints of a run: `<output_dir>/checkpoints`."""
    return Path(output_dir) / CHECKPOINTS_DIR_NAME


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step N of a `step_N` folder, `None` for any other name."""
    match = _CHECKPOINT_PATTERN.match(Path(path).name)
    return int(match.group(1)) if match else None


def _file_digest(path: Path, flush: bool = False) -> str:
    """SHA-256 of a file; with `flush`, after flushing it to disk (so that the rename that follows publishes durable
    data)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        if flush:
            os.fsync(handle.fileno())
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _state_files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.is_file() and path.name != MANIFEST_NAME)


def write_manifest(folder: Path, step: int) -> None:
    """Writes `checkpoint_manifest.json` (step, and size + SHA-256 of every file) into `folder`, durably."""
    files = {
        str(path.relative_to(folder)): {"size": path.stat().st_size, "sha256": _file_digest(path, flush=True)}
        for path in _state_files(folder)
    }
    write_text_atomically(folder / MANIFEST_NAME, json.dumps({"step": step, "files": files}, indent=1))


def verify_checkpoint(folder: str | os.PathLike) -> str | None:
    """Why `folder` is not a complete checkpoint (missing manifest, missing, truncated or altered file), or `None`."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        return f"no {MANIFEST_NAME} (the save did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        int(manifest["step"])
    except (ValueError, KeyError, TypeError) as error:
        return f"unreadable {MANIFEST_NAME} ({error})"
    if not files:
        return "the manifest lists no files"
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{name} has {path.stat().st_size} bytes, expected {expected['size']}"
        if _file_digest(path) != expected["sha256"]:
            return f"{name} does not match its SHA-256"
    return None


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete `step_N` checkpoint with the highest N under `<output_dir>/checkpoints`, or `None`.

    Partial or corrupt folders are skipped with a warning; temporary `.tmp-*` folders are never considered.
    """
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return None
    candidates = sorted(
        (path for path in root.iterdir() if path.is_dir() and checkpoint_step(path) is not None),
        key=checkpoint_step,
        reverse=True,
    )
    for candidate in candidates:
        problem = verify_checkpoint(candidate)
        if problem is None:
            return candidate
        logger.warning(f"Skipping checkpoint {candidate}: {problem}.")
    return None


def prune_checkpoints(output_dir: str | os.PathLike, total_limit: int | None) -> list[Path]:
    """Keeps the `total_limit` newest finished (manifest written) `step_N` checkpoints; deletes the other finished
    ones and every unfinished `step_N` folder older than the newest finished one. Returns the deleted folders."""
    root = checkpoints_root(output_dir)
    if total_limit is None or not root.is_dir():
        return []
    checkpoints = sorted((path for path in root.iterdir() if checkpoint_step(path) is not None), key=checkpoint_step)
    finished = [path for path in checkpoints if (path / MANIFEST_NAME).is_file()]
    if not finished:
        return []
    kept, newest = finished[-total_limit:], checkpoint_step(finished[-1])
    stale = [path for path in checkpoints if path not in kept and checkpoint_step(path) < newest]
    for path in stale:
        shutil.rmtree(path)
    return stale


def _remove_temporary_folders(root: Path) -> None:
    for path in root.glob(f"{_TEMPORARY_PREFIX}*"):
        logger.warning(f"Removing {path}, left behind by an interrupted checkpoint save.")
        shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(
    accelerator: Accelerator, output_dir: str | os.PathLike, step: int, total_limit: int | None = None
) -> Path:
    """Saves the `accelerate` state as `<output_dir>/checkpoints/step_<step>`, atomically; call on every process.

    The state goes to `.tmp-step_<step>`, the manifest is written last, then the folder is renamed to `step_<step>`
    and older checkpoints are pruned to `total_limit`. A crash at any point leaves the previous checkpoints intact and
    no `step_<step>` folder that could be mistaken for a complete one.
    """
    root = checkpoints_root(output_dir)
    temporary, final = root / f"{_TEMPORARY_PREFIX}step_{step}", root / f"step_{step}"
    save_on_each_node = accelerator.project_configuration.save_on_each_node
    is_writer = accelerator.is_local_main_process if save_on_each_node else accelerator.is_main_process
    if is_writer:
        root.mkdir(parents=True, exist_ok=True)
        _remove_temporary_folders(root)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if is_writer:
        write_manifest(temporary, step)
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        fsync_directory(root)
        for path in prune_checkpoints(output_dir, total_limit):
            logger.info(f"Deleted old checkpoint {path} (checkpoints_total_limit={total_limit}).")
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, folder: str | os.PathLike, verify: bool = True) -> int:
    """Restores the state saved by [`save_checkpoint`] (model, optimizer, scheduler, RNG, ...); returns its step.

    Raises a `ValueError` if `folder` is not a complete checkpoint. `verify=False` skips that check (hashing every
    file), for a folder that [`find_latest_checkpoint`] has just verified.
    """
    problem = verify_checkpoint(folder) if verify else None
    if problem is not None:
        raise ValueError(f"Cannot resume from {folder}: {problem}.")
    accelerator.load_state(str(folder))
    return int(json.loads((Path(folder) / MANIFEST_NAME).read_text())["step"])


__all__ = [
    "checkpoints_root",
    "find_latest_checkpoint",
    "load_checkpoint",
    "prune_checkpoints",
    "save_checkpoint",
    "verify_checkpoint",
]
