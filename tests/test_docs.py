"""The documentation's code runs: every ```python block of README.md and docs/*.md, in order, one fresh Python process
per file (a block sees the names of the blocks above it in the same file), offline, in an empty working folder. A
block that cannot run here (it needs the Hub, a real checkpoint, a dataset or a GPU, or takes minutes) says why in the
line before it, `<!-- not run: <reason> -->`; each such block is reported as a skip with its reason.

The shell blocks' commands of the package's scripts (`examples/*.py`, `benchmarks/*.py`, `python -m denseclip_hf.*`)
are checked against the scripts themselves: each flag a command passes is one that the script's `--help` lists.
"""

import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = re.compile(r"^<!-- not run: (?P<reason>\S.*?) -->$")
FENCE = re.compile(r"^```(?P<language>\S*)\s*$")


@dataclass(frozen=True)
class CodeBlock:
    """A fenced code block: its file, the line of its opening fence (1-based), language, code, and the reason of
    the `<!-- not run: ... -->` marker on the line before it (`None` without one)."""

    path: Path
    line: int
    language: str
    source: str
    not_run: str | None

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def code_blocks(path: Path) -> list[CodeBlock]:
    """The fenced code blocks of a Markdown file, in order. A `not run` marker must be followed by a code block."""
    lines = path.read_text().splitlines()
    blocks, index = [], 0
    while index < len(lines):
        marker = NOT_RUN.match(lines[index].strip())
        opening = FENCE.match(lines[index])
        if marker and not (index + 1 < len(lines) and FENCE.match(lines[index + 1])):
            raise ValueError(
                f"{path.name}:{index + 1}: a `not run` marker must be the line right before a code block."
            )
        if opening is None:
            index += 1
            continue
        end = next(end for end in range(index + 1, len(lines)) if lines[end].startswith("```"))
        previous = NOT_RUN.match(lines[index - 1].strip()) if index else None
        blocks.append(
            CodeBlock(
                path=path,
                line=index + 1,
                language=opening["language"],
                source="\n".join(lines[index + 1 : end]) + "\n",
                not_run=previous["reason"] if previous else None,
            )
        )
        index = end + 1
    return blocks


BLOCKS = [block for path in DOCUMENTS for block in code_blocks(path)]
PYTHON = [block for block in BLOCKS if block.language == "python"]
RUN_FILES = sorted({block.path for block in PYTHON if block.not_run is None})

# Runs the blocks of each file in a namespace and a working folder of its own, all files in one Python process (one
# import of torch and transformers); each block compiles under its Markdown file's name, padded so that a traceback
# gives the line in the Markdown file. Prints {file: traceback or None} as JSON.
DRIVER = textwrap.dedent(
    """
    import json, os, sys, traceback

    results = {}
    for document, blocks in json.loads(open(sys.argv[1]).read()).items():
        folder = os.path.join(sys.argv[2], str(len(results)))
        os.makedirs(folder)
        os.chdir(folder)
        namespace = {"__name__": "__main__"}
        try:
            for block in blocks:
                exec(compile("\\n" * block["line"] + block["source"], document, "exec"), namespace)
            results[document] = None
        except BaseException:
            results[document] = traceback.format_exc()
    print(json.dumps(results))
    """
)


def offline_environment(tmp_path: Path) -> dict[str, str]:
    """This process's environment, with the package's sources first on the path, the Hub unreachable and remote code
    cached in `tmp_path`."""
    path = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    return {
        **os.environ,
        "PYTHONPATH": path,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_MODULES_CACHE": str(tmp_path / "hf-modules"),
    }


@pytest.fixture(scope="module")
def documents_run(tmp_path_factory) -> dict[str, str | None]:
    """Runs the Python blocks of every document (not those marked `not run`): {document: traceback, or None}."""
    tmp_path = tmp_path_factory.mktemp("docs")
    blocks = {
        str(path.relative_to(ROOT)): [
            {"line": block.line, "source": block.source}
            for block in PYTHON
            if block.path == path and block.not_run is None
        ]
        for path in RUN_FILES
    }
    (tmp_path / "blocks.json").write_text(json.dumps(blocks))
    result = subprocess.run(
        [sys.executable, "-c", DRIVER, str(tmp_path / "blocks.json"), str(tmp_path / "work")],
        cwd=tmp_path,
        env=offline_environment(tmp_path),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-6000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize("path", RUN_FILES, ids=[str(path.relative_to(ROOT)) for path in RUN_FILES])
def test_python_blocks_run(path: Path, documents_run: dict[str, str | None]):
    error = documents_run[str(path.relative_to(ROOT))]
    assert error is None, error[-6000:]


NOT_RUN_BLOCKS = [block for block in PYTHON if block.not_run is not None]


@pytest.mark.parametrize("block", NOT_RUN_BLOCKS, ids=[block.name for block in NOT_RUN_BLOCKS])
def test_python_blocks_not_run_say_why(block: CodeBlock):
    pytest.skip(f"{block.name} not run: {block.not_run}")


def test_every_marker_belongs_to_a_python_block():
    """A `not run` marker on a shell block would hide nothing: shell blocks are not run (their flags are checked)."""
    marked = [block.name for block in BLOCKS if block.not_run is not None and block.language != "python"]
    assert not marked, f"`not run` markers on blocks that are not Python: {marked}"


# ---------------------------------------------------------------------------------------------------------------------
# Shell blocks: the package's commands and their flags
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """A command of a shell block that runs one of the package's scripts, and the flags it passes to the script, each
    with the word after it (its value, or `None` when another flag or nothing follows)."""

    block: CodeBlock
    script: str  # "examples/train_seg.py", "benchmarks/inference.py" or "-m denseclip_hf.<module>"
    flags: tuple[tuple[str, str | None], ...]


def shell_commands(block: CodeBlock) -> list[Command]:
    """The package's script calls of a shell block: continuation lines joined, comments dropped."""
    commands = []
    for line in block.source.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        for index, word in enumerate(words):
            if not {"python", "launch"} & set(words[:index]):  # e.g. `cp examples/app.py ...` runs nothing
                continue
            if re.fullmatch(r"(examples|benchmarks)/\w+\.py", word):
                script, arguments = word, words[index + 1 :]
            elif word == "-m" and index + 1 < len(words) and words[index + 1].startswith("denseclip_hf."):
                script, arguments = f"-m {words[index + 1]}", words[index + 2 :]
            else:
                continue
            flags = []
            for position, argument in enumerate(arguments):
                if argument.startswith("--"):
                    flag, _, value = argument.partition("=")
                    following = arguments[position + 1] if position + 1 < len(arguments) else None
                    value = value or (None if following is None or following.startswith("-") else following)
                    flags.append((flag, value))
            commands.append(Command(block, script, tuple(flags)))
            break
    return commands


COMMANDS = [command for block in BLOCKS if block.language == "bash" for command in shell_commands(block)]

# Prints every script's `--help`, as a JSON object, from one Python process.
HELP_DRIVER = textwrap.dedent(
    """
    import contextlib, io, json, os, re, runpy, sys

    helps = {}
    for script in sys.argv[1:]:
        helps[script] = ""
        path = script[3:].replace(".", "/") + ".py" if script.startswith("-m ") else script
        source = open(os.path.join("src", path) if script.startswith("-m ") else path).read()
        if not re.search(r"ArgumentParser|parse_\\w*args", source):
            continue  # a script without a command line would run its work: no usage, the test says so
        sys.argv = [script, "--help"]
        output = io.StringIO()
        with contextlib.redirect_stdout(output):
            try:
                if script.startswith("-m "):
                    runpy.run_module(script[3:], run_name="__main__", alter_sys=True)
                else:  # as `python script`: the script's folder first on the path
                    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
                    runpy.run_path(script, run_name="__main__")
                    sys.path.pop(0)
            except SystemExit:
                pass
        helps[script] = output.getvalue()
    print(json.dumps(helps))
    """
)


@pytest.fixture(scope="module")
def script_helps(tmp_path_factory) -> dict[str, str]:
    scripts = sorted({command.script for command in COMMANDS})
    result = subprocess.run(
        [sys.executable, "-c", HELP_DRIVER, *scripts],
        cwd=ROOT,
        env=offline_environment(tmp_path_factory.mktemp("helps")),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-6000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize(
    "command", COMMANDS, ids=[f"{command.block.name}:{command.script.removeprefix('-m ')}" for command in COMMANDS]
)
def test_shell_commands_pass_flags_the_scripts_have(command: Command, script_helps: dict[str, str]):
    """Each flag is one the script lists; the value of a flag with choices (`--recipe`, `--mode`) is one of them."""
    help_text = script_helps[command.script]
    assert "usage:" in help_text, f"{command.script} --help printed no usage:\n{help_text}"
    offered = set(re.findall(r"(?<![\w-])--[\w-]+", help_text))
    unknown = [flag for flag, _ in command.flags if flag not in offered]
    assert not unknown, f"{command.block.name}: {command.script} has no flag {unknown}"
    for flag, value in command.flags:
        choices = re.search(rf"{flag} \{{([^}}]+)\}}", help_text)
        if choices and value is not None:
            assert value in choices.group(1).split(","), f"{command.block.name}: {flag} {value} is not a choice"


def test_documents_have_code_to_check():
    """The collection above finds the blocks (a changed fence or marker syntax would silently check nothing)."""
    assert len(RUN_FILES) >= 3 and len(COMMANDS) >= 20 and NOT_RUN_BLOCKS


# ---------------------------------------------------------------------------------------------------------------------
# Names: what the documents call the package's classes, their members, modules and constants exists
# ---------------------------------------------------------------------------------------------------------------------

# Backticked `DenseClipX` or `DenseClipX.member`, a module file of the package, or a constant in capitals.
CLASS_NAME = re.compile(r"`(DenseClip\w+)(?:\.(\w+))?")
MODULE_FILE = re.compile(
    r"`((?:configuration|modeling|image_processing|loss|protocol|loading)_\w+\.py|tensor_ops\.py|checkpoint_conversion\.py)`"
)
CONSTANT = re.compile(r"`([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+)`")
# Capitals that are environment variables or other libraries' names, not the package's.
FOREIGN_CONSTANTS = re.compile(
    r"(HF|ACCELERATE|GRADIO|DENSECLIP|TRANSFORMERS|CUDA)_\w+|OPENAI_CLIP_(MEAN|STD)|(IMREAD|INTER)_\w+"
)


def package_namespace() -> dict[str, object]:
    """Every top-level name of every module of the package (the training subpackage included)."""
    import importlib
    import pkgutil

    import denseclip_hf

    names: dict[str, object] = {}
    for module_info in pkgutil.walk_packages(denseclip_hf.__path__, "denseclip_hf."):
        module = importlib.import_module(module_info.name)
        names.update(vars(module))
    return names


def documented_names() -> list[tuple[str, str]]:
    """(where, text) of every backticked name in the documents."""
    found = []
    for path in DOCUMENTS:
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            where = f"{path.relative_to(ROOT)}:{number}"
            found += [(where, match.group(0)) for match in CLASS_NAME.finditer(line)]
            found += [(where, f"`{match.group(1)}`") for match in MODULE_FILE.finditer(line)]
            found += [(where, f"`{match.group(1)}`") for match in CONSTANT.finditer(line)]
    return found


def test_documented_names_exist():
    namespace = package_namespace()
    sources = {path.name for path in (ROOT / "src" / "denseclip_hf").rglob("*.py")}
    missing = []
    for where, text in documented_names():
        name = text.strip("`")
        if name.endswith(".py"):
            exists = name in sources
        elif class_name := CLASS_NAME.match(text):
            owner = namespace.get(class_name.group(1))
            member = class_name.group(2)
            exists = owner is not None and (member is None or hasattr(owner, member) or _is_field(owner, member))
        elif FOREIGN_CONSTANTS.fullmatch(name):
            continue
        else:
            exists = name in namespace
        if not exists:
            missing.append(f"{where}: {text}")
    assert not missing, "The documents name what the package does not have:\n" + "\n".join(missing)


def _is_field(owner: object, member: str) -> bool:
    """A dataclass field (outputs, configs) that has no class attribute."""
    fields = getattr(owner, "__dataclass_fields__", {})
    return member in fields
