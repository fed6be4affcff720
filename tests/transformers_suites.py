"""transformers' own common test suites (`ModelTesterMixin`, `ConfigTester`, `BackboneTesterMixin`,
`ImageProcessingTestMixin`), taken at test time from the source distribution of the installed transformers version.

The sdist ships `tests/test_*_common.py` but not the few modules they import from elsewhere in transformers'
repository; `SHIMS` stands in for those (all of them test features DenseCLIP has not: generation, the exporters of
`transformers.exporters`, Hub-hosted test images). The extracted files go to a cache folder
(`$DENSECLIP_TRANSFORMERS_TESTS`, default `~/.cache/denseclip_hf/transformers-tests-<version>`), which `.ci/run`
fills before the tests; without it the first import downloads the sdist from the package index.
"""

import importlib
import os
import subprocess
import sys
import tarfile
import tempfile
import textwrap
from pathlib import Path

import transformers

PACKAGE = "transformers_common_tests"
SUITES = (
    "test_modeling_common.py",
    "test_configuration_common.py",
    "test_backbone_common.py",
    "test_image_processing_common.py",
)
SHIMS = {
    # DenseCLIP generates nothing: no generation tests apply.
    "generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n",
    # The exporter tests cover `transformers.exporters`; the package's ONNX export has tests of its own.
    "exporters/test_export.py": "class ExportTesterMixin:\n    pass\n",
    # `ConfigTester.check_config_arguments_init` sets these on configs without sub-configs and reads them back.
    "utils/test_configuration_utils.py": textwrap.dedent(
        """\
        config_common_kwargs = {
            "return_dict": False,
            "output_hidden_states": True,
            "output_attentions": True,
            "dtype": "float16",
            "chunk_size_feed_forward": 5,
            "architectures": ["BertModel"],
            "id2label": {0: "label"},
            "label2id": {"label": "0"},
            "problem_type": "regression",
        }
        """
    ),
    # Test images are read from local paths only (no Hub access in tests).
    "../fetch_hub_objects_for_ci.py": "def url_to_local_path(url):\n    return url\n",
}


def suites_folder() -> Path:
    """The folder holding the `transformers_common_tests` package (extracted once per transformers version)."""
    default = Path.home() / ".cache" / "denseclip_hf" / f"transformers-tests-{transformers.__version__}"
    folder = Path(os.environ.get("DENSECLIP_TRANSFORMERS_TESTS", default))
    if not (folder / PACKAGE / SUITES[0]).is_file():
        extract_suites(folder)
    return folder


def extract_suites(folder: Path) -> None:
    """Downloads transformers' sdist of the installed version and writes the suites and the shims under `folder`."""
    version = transformers.__version__
    with tempfile.TemporaryDirectory() as download:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
        result = subprocess.run(
            [*command, "--dest", download, f"transformers=={version}"], capture_output=True, text=True
        )
        archives = list(Path(download).glob("transformers-*.tar.gz"))
        if result.returncode or not archives:
            raise OSError(
                f"Could not download the transformers {version} source distribution for its common test suites "
                f"(pip said: {result.stderr.strip()[-500:]}). Run `bash .ci/run` once with access to the package "
                "index, or set DENSECLIP_TRANSFORMERS_TESTS to a folder holding them."
            )
        staging = Path(tempfile.mkdtemp(dir=folder.parent if folder.parent.exists() else None))
        package = staging / PACKAGE
        package.mkdir(parents=True)
        with tarfile.open(archives[0]) as archive:
            for suite in SUITES:
                member = archive.extractfile(f"transformers-{version}/tests/{suite}")
                (package / suite).write_bytes(member.read())
        (package / "__init__.py").write_text("")
        for path, source in SHIMS.items():
            target = (package / path).resolve()
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.parent != staging:
                (target.parent / "__init__.py").touch()
            target.write_text(source)
        folder.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, folder) if not folder.exists() else None
        if not (folder / PACKAGE / SUITES[0]).is_file():
            raise OSError(f"{folder} exists but holds no {PACKAGE}: remove it and run the tests again.")


def import_suite(name: str):
    """A module of the suites, e.g. `import_suite("test_modeling_common")`."""
    folder = str(suites_folder())
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(f"{PACKAGE}.{name}")


if __name__ == "__main__":  # `.ci/run`: fetch the suites before the tests run
    print(f"transformers common test suites in {suites_folder()}")
