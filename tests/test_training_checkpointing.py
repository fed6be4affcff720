"""Atomic training checkpoints: partial or corrupt ones are never loaded, saves are atomic and pruned."""

import logging
from pathlib import Path

import pytest
from conftest import fake_checkpoint

from denseclip_hf.file_utils import write_text_atomically
from denseclip_hf.training.checkpointing import (
    find_latest_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    verify_checkpoint,
)


def test_latest_checkpoint_skips_partial_and_corrupt_ones(tmp_path, caplog):
    fake_checkpoint(tmp_path, 10)
    fake_checkpoint(tmp_path, 20)
    fake_checkpoint(tmp_path, 30, complete=False)  # crashed before its manifest: cannot be complete
    corrupt = fake_checkpoint(tmp_path, 40)
    with open(corrupt / "model.safetensors", "r+b") as handle:
        handle.write(b"\xff")  # same size, altered content
    truncated = fake_checkpoint(tmp_path, 50)
    (truncated / "random_states_0.pkl").write_bytes(b"r")
    (tmp_path / "checkpoints" / ".tmp-step_60").mkdir()
    with caplog.at_level(logging.WARNING):
        assert find_latest_checkpoint(tmp_path).name == "step_20"
    assert "step_50" in caplog.text and "step_40" in caplog.text and "step_30" in caplog.text
    assert "SHA-256" in verify_checkpoint(corrupt)
    assert prune_checkpoints(tmp_path, total_limit=2)  # keeps the 2 newest with a manifest (not hashed: too slow)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [".tmp-step_60", "step_40", "step_50"]


class CrashingAccelerator:
    """Stands in for `Accelerator` in one process; its `save_state` writes part of the state, then fails."""

    class project_configuration:  # noqa: N801
        save_on_each_node = False

    is_main_process = is_local_main_process = True

    def __init__(self, crash: bool):
        self.crash = crash

    def wait_for_everyone(self):
        pass

    def save_state(self, folder):
        Path(folder).mkdir(parents=True)
        Path(folder, "model.safetensors").write_bytes(b"weights")
        if self.crash:
            raise RuntimeError("killed while saving")
        Path(folder, "optimizer.bin").write_bytes(b"state")


def test_save_checkpoint_is_atomic_and_pruned(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(CrashingAccelerator(crash=False), tmp_path, step, total_limit=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_2", "step_3"]
    with pytest.raises(RuntimeError, match="killed"):
        save_checkpoint(CrashingAccelerator(crash=True), tmp_path, 4, total_limit=2)
    assert not (tmp_path / "checkpoints" / "step_4").exists()
    assert find_latest_checkpoint(tmp_path).name == "step_3"
    save_checkpoint(CrashingAccelerator(crash=False), tmp_path, 5, total_limit=2)  # cleans the leftover temp folder
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_3", "step_5"]


def test_text_files_are_replaced_atomically(tmp_path, monkeypatch):
    """A write that fails leaves the previous file and no temporary file; a write that succeeds replaces it."""
    path = tmp_path / "eval_results.json"
    write_text_atomically(path, '{"eval_mean_iou": 0.5}\n')

    def failing_replace(source, destination):
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr("denseclip_hf.training.checkpointing.os.replace", failing_replace)
        with pytest.raises(OSError, match="disk full"):
            write_text_atomically(path, '{"eval_mean_iou": 0.7}\n')
    assert path.read_text() == '{"eval_mean_iou": 0.5}\n' and sorted(tmp_path.iterdir()) == [path]
    write_text_atomically(path, "new\n")
    assert path.read_text() == "new\n" and sorted(tmp_path.iterdir()) == [path]
