"""The model repository of a run is published atomically: a crash at any file operation leaves a folder that loads the
previous repository or the new one, complete, or fails with an `OSError`, never a mix."""

import json
import os

import pytest
import torch

from denseclip_hf import DenseClipForSemanticSegmentation, DenseClipImageProcessor
from denseclip_hf.training.repository import STAGING_DIR_NAME, publish_repository


class Crash(BaseException):
    """A crash at a chosen moment (a `BaseException`: no `except Exception` of the code under test hides it)."""


class CrashAt:
    """Wraps file operations so that the `moment`-th call of any of them raises [`Crash`] instead of running."""

    def __init__(self, moment: int):
        self.moment, self.calls = moment, 0

    def wrap(self, operation):
        def crashing(*args, **kwargs):
            self.calls += 1
            if self.calls == self.moment:
                raise Crash(f"killed at {operation.__name__} #{self.moment}")
            return operation(*args, **kwargs)

        return crashing


def repository_writer(model: DenseClipForSemanticSegmentation, results: dict, **save_options):
    def write(folder):
        model.save_pretrained(folder, **save_options)
        DenseClipImageProcessor().save_pretrained(folder)
        (folder / "all_results.json").write_text(json.dumps(results))
        (folder / "README.md").write_text(f"# {results['name']}\n")

    return write


def loaded_version(output_dir, models: dict[str, DenseClipForSemanticSegmentation]) -> str:
    """Which of `models` `from_pretrained(output_dir)` loads, bit for bit, or "OSError"; anything else fails."""
    try:
        loaded = DenseClipForSemanticSegmentation.from_pretrained(output_dir)
    except OSError:
        return "OSError"
    state = loaded.state_dict()
    for name, model in models.items():
        if all(torch.equal(value, state[key]) for key, value in model.state_dict().items()):
            results = json.loads((output_dir / "all_results.json").read_text())
            assert results["name"] == name  # the results beside the weights are theirs
            return name
    raise AssertionError("the folder loads weights of neither repository")


@pytest.fixture
def two_models(config):
    torch.manual_seed(1)
    old = DenseClipForSemanticSegmentation(config).eval()
    torch.manual_seed(2)
    new = DenseClipForSemanticSegmentation(config).eval()
    return {"old": old, "new": new}


def test_a_crash_at_any_file_operation_never_leaves_a_loadable_mix(tmp_path, two_models, monkeypatch):
    """The previous repository (sharded weights) is replaced by one with a single weights file; the save is crashed
    at its k-th file operation (rename, delete) for every k, then run again (the relaunch)."""
    operations = {name: getattr(os, name) for name in ("replace", "rename", "unlink", "remove", "rmdir")}
    outcomes = []
    for crash_at in range(1, 100):
        output_dir = tmp_path / f"crash-{crash_at}"
        (output_dir / "checkpoints" / "step_1").mkdir(parents=True)
        (output_dir / "checkpoints" / "step_1" / "state.bin").write_bytes(b"training state")
        old_writer = repository_writer(two_models["old"], {"name": "old"}, max_shard_size="100KB")
        publish_repository(output_dir, old_writer)
        assert len(list(output_dir.glob("model-*-of-*.safetensors"))) > 1
        crash = CrashAt(crash_at)
        with monkeypatch.context() as patch:
            for name, operation in operations.items():
                patch.setattr(os, name, crash.wrap(operation))
            try:
                publish_repository(output_dir, repository_writer(two_models["new"], {"name": "new"}))
                crashed = False
            except Crash:
                crashed = True
        outcomes.append(loaded_version(output_dir, two_models))
        assert (output_dir / "checkpoints" / "step_1" / "state.bin").read_bytes() == b"training state"
        if not crashed:
            break
        publish_repository(output_dir, repository_writer(two_models["new"], {"name": "new"}))  # the relaunch
        assert loaded_version(output_dir, two_models) == "new" and not (output_dir / STAGING_DIR_NAME).exists()
        assert not list(output_dir.glob("model-*"))  # the old shards are gone
    assert outcomes[-1] == "new" and not (output_dir / STAGING_DIR_NAME).exists()
    # The old repository until the commit starts, no config.json while files move, the new one after its config.json.
    first_error, first_new = outcomes.index("OSError"), outcomes.index("new")
    assert set(outcomes[:first_error]) == {"old"} and set(outcomes[first_error:first_new]) == {"OSError"}
    assert set(outcomes[first_new:]) == {"new"}


def test_a_crash_while_writing_keeps_the_previous_repository(tmp_path, two_models):
    output_dir = tmp_path / "out"
    publish_repository(output_dir, repository_writer(two_models["old"], {"name": "old"}))

    def crashing_writer(folder):
        repository_writer(two_models["new"], {"name": "new"})(folder)
        with open(folder / "model.safetensors", "r+b") as handle:
            handle.truncate(100)  # killed while the weights were being written
        raise Crash("killed")

    with pytest.raises(Crash):
        publish_repository(output_dir, crashing_writer)
    assert (output_dir / STAGING_DIR_NAME / "model.safetensors").stat().st_size == 100
    assert loaded_version(output_dir, two_models) == "old"


def test_a_writer_without_weights_is_refused(tmp_path):
    with pytest.raises(ValueError, match="model.safetensors"):
        publish_repository(tmp_path, lambda folder: (folder / "README.md").write_text("no model"))
