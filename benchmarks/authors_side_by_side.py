"""This package against the DenseCLIP authors' own segmentation code (their mmseg segmentor, built from their
repository), on the same random weights, side by side: the default eval forward, sliding windows, probabilities, the
image side alone and a training step.

    PYTHONPATH=src python benchmarks/authors_side_by_side.py --peer_dir ../shared/peer \\
        [--peer_python ~/.cache/denseclip-peer/venv/bin/python] [--denseclip_src ~/.cache/denseclip-peer/official] \\
        [--models vit-b r50] [--rounds 2] [--repeats 3] [--train_steps 2] [--no_train] [--malloc retain] \\
        [--output benchmarks/results/authors_side_by_side.json]

Optional: it needs the reference environment that `<peer_dir>/setup.sh` builds (a venv with mmcv 1.7.2 lite,
mmseg 0.30 and the authors' imports), the authors' repository exported to `--denseclip_src`
(github.com/raoyongming/DenseCLIP; see `<peer_dir>/README.md`), and `<peer_dir>/official.py` (which builds their
segmentor through mmseg's registries and randomizes its weights). Each path also comes from the environment
(`PEER_DIR`, `PEER_PY`, `DENSECLIP_SRC`); without them the script says what is missing and exits with status 2. None
of the authors' code is copied here: their phases run in the reference venv and import it from `--denseclip_src`.

Both sides run the authors' full-size models of `official.py` (`vit-b`: ViT-B/16 of their 640x640 config, `r50`:
RN50 of their 512x512 config, 150 ADE20K classes), the authors' weights randomized once (seed 7) and converted with
this package's converter. Every phase is its own process (its peak resident memory is its own), 2 threads; the
authors' and the package's phases alternate for `--rounds` rounds so that load changes hit both, and each timing is
the median over all rounds of `--repeats` calls after a first untimed one. Ratios (authors / package) are what to read;
on a busy machine they move by 10-25%, so run it on an idle one. What is timed, on a 512x512 and a 512x683 image
(`torch.no_grad`):

- "eval 512x512": the authors' single pass resized to the input (`encode_decode`, the text tower on every call)
  against the package's default eval forward (`model(pixel_values, test_mode=config.test_mode)`, what the processor
  asks for: the sliding-window protocol, one window on this image). The authors' own test (`slide_inference`, one
  window) is timed too; it costs more than `encode_decode`, which is the baseline of the targets.
- "slide 512x683": the authors' `slide_inference` against `model(pixel_values, test_mode="slide")` (logits).
- "probabilities 512x683": the authors' `inference` (slide, softmax) against `predict_probabilities`.
- "image side 512x512": the authors' `encode_decode` with their text encoder replaced by its cached output (the
  harness's, not an option of theirs) against the package's single pass resized to the input
  (`test_mode="whole"`); and the package's single pass alone (`test_mode="plain"`, logits at 1/4).
- "train step": batch 2, 512x512 crops, forward with the losses, backward, optimizer step (theirs: their config's
  AdamW through mmcv's `build_optimizer`, `forward_train`; the package's: the training script's `build_optimizer`
  with the recipe's settings), the median of `--train_steps` after a first untimed one; peak resident memory.
- ", channels-last": the package's eval 512x512 and slide 512x683 again with its weights in channels-last memory
  (`model.to(memory_format=torch.channels_last)`, the evaluation script's `--channels_last`: its fastest exact path,
  the same values up to float rounding), against the same runs of the authors.

The eval 512x512 forward is also broken into parts on both sides (`PARTS`: image encoder, text encoder, context
decoder, neck, decode head, resize to the input, and the rest as "other"): the harness wraps those modules' methods
and the final resize function with timers for `--repeats` more calls, and counts the GFLOPs of each part in one call
with torch's `FlopCounterMode` (matrix products, convolutions and attention; 2 FLOPs per multiply-add), then puts the
originals back; neither side's code is edited. The package's text encoder shows 0 where its output is cached.

The outputs are compared: the package's logits and probabilities (channels-last ones too) against the authors' on the
same input.
"""

import argparse
import contextlib
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZE, SLIDE_IMAGE, BATCH = 512, (512, 683), 2
RECIPES = {"vit-b": "ade20k-vit-b16", "r50": "ade20k-rn50"}
# The targets: speed-ups (authors / package) and the training step's memory ratio (package / authors).
TARGETS = {
    "vit-b": {"eval 512x512": 1.5, "slide 512x683": 1.5, "train step": 1.3},
    "r50": {"eval 512x512": 2.5, "slide 512x683": 2.2, "train step": 1.3},
}
MEMORY_TARGET = 0.75
# The package's runs and the authors' run each is compared with: the default path, and the package with its weights in
# channels-last memory (`model.to(memory_format=torch.channels_last)`, the evaluation script's `--channels_last`).
COMPARED = {
    "eval 512x512": "eval 512x512",
    "eval 512x512, channels-last": "eval 512x512",
    "slide 512x683": "slide 512x683",
    "slide 512x683, channels-last": "slide 512x683",
    "probabilities 512x683": "probabilities 512x683",
    "image side 512x512": "image side 512x512",
    "train step": "train step",
}
# The parts of the eval 512x512 forward timed on both sides (`_authors_parts`, `_package_parts`), then what is left.
PARTS = ("image encoder", "text encoder", "context decoder", "neck (FPN)", "decode head", "resize to the input")
BREAKDOWN_ROWS = (*PARTS, "other", "total")
HERE = Path(__file__).resolve().parent


def _inputs():
    import torch

    whole = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    slide = torch.randn(1, 3, *SLIDE_IMAGE, generator=torch.Generator().manual_seed(4))
    return whole, slide


def _timed(calls: dict, repeats: int) -> dict:
    """Each call once untimed, then `repeats` rounds over all of them: seconds per call."""
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return times


def _attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of CPU attention (`_scaled_dot_product_flash_attention_for_cpu`, which torch's counter does not know):
    the two batched products, queries x keys and weights x values, 2 FLOPs per multiply-add."""
    batch, heads, queries, depth = query
    return 2 * batch * heads * queries * key[2] * (depth + value[3])


@contextlib.contextmanager
def _instrumented(parts: dict, counter=None):
    """Wraps each part's methods and functions (`parts`: label -> `[(owner, attribute name)]`) with a timer and, given
    a `FlopCounterMode`, a FLOP reading; yields the seconds and FLOPs spent in each part, summed over the calls, and
    puts the originals back on exit. Neither side's code is edited: the harness sets and removes attributes."""
    seconds, flops, restore = dict.fromkeys(parts, 0.0), dict.fromkeys(parts, 0), []
    for label, targets in parts.items():
        for owner, name in targets:
            original = getattr(owner, name)

            def wrapped(*args, _original=original, _label=label, **kwargs):
                flops_before = counter.get_total_flops() if counter is not None else 0
                start = time.perf_counter()
                try:
                    return _original(*args, **kwargs)
                finally:
                    seconds[_label] += time.perf_counter() - start
                    if counter is not None:
                        flops[_label] += counter.get_total_flops() - flops_before

            restore.append((owner, name, original, name in vars(owner)))
            setattr(owner, name, wrapped)
    try:
        yield seconds, flops
    finally:
        for owner, name, original, own_attribute in reversed(restore):
            setattr(owner, name, original) if own_attribute else delattr(owner, name)


def _breakdown(call, parts: dict, repeats: int) -> dict:
    """`call` by parts: seconds per call of each part over `repeats` calls (timers on the parts), and GFLOPs of one
    call (torch's `FlopCounterMode`, 2 FLOPs per multiply-add of matrix products, convolutions and attention; resizes,
    norms and elementwise operations count 0); "other" is the rest of the call, "total" the whole call."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    times: dict[str, list[float]] = {label: [] for label in BREAKDOWN_ROWS}
    for _ in range(repeats):
        with _instrumented(parts) as (seconds, _):
            start = time.perf_counter()
            call()
            total = time.perf_counter() - start
        for label, spent in seconds.items():
            times[label].append(spent)
        times["other"].append(total - sum(seconds.values()))
        times["total"].append(total)
    attention = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    counter = FlopCounterMode(display=False, custom_mapping={attention: _attention_flops})
    with counter, _instrumented(parts, counter) as (_, flops):
        call()
    total = counter.get_total_flops()
    gflops = {label: count / 1e9 for label, count in flops.items()}
    gflops.update(other=(total - sum(flops.values())) / 1e9, total=total / 1e9)
    return {"times": times, "gflops": gflops}


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# ---------------------------------------------------------------------------------------------------- authors' side
def _official(peer_dir: str, name: str, workdir: Path):
    """The authors' segmentor of `official.py` with the weights in `workdir/ckpt.pth` (randomized there once)."""
    import torch

    sys.path.insert(0, peer_dir)
    import official  # the reference scripts' builder (needs DENSECLIP_SRC)

    official.setup()
    from mmseg.datasets import ADE20KDataset

    classes = list(ADE20KDataset.CLASSES)
    config = official.official_cfg(name)
    model = official.build(config.model, classes, train_cfg=config.get("train_cfg"), test_cfg=config.get("test_cfg"))
    checkpoint = workdir / "ckpt.pth"
    if checkpoint.exists():
        model.load_state_dict(torch.load(checkpoint, weights_only=False)["state_dict"])
    else:
        official.randomize_(model, seed=7)
        torch.save({"state_dict": model.state_dict(), "meta": {"CLASSES": tuple(classes)}}, checkpoint)
    return config, model


def _metas(height: int, width: int) -> list[dict]:
    shape = (height, width, 3)
    return [dict(img_shape=shape, ori_shape=shape, pad_shape=shape, flip=False)]


def _authors_parts(model) -> dict:
    """The parts of the authors' `encode_decode`: their backbone (ViT / ResNet with its pyramid and attention pool),
    text encoder, context decoder, neck and decode head (`forward_test`, which calls the head's `forward` directly),
    and the final `resize` of their segmentor's module."""
    segmentor_module = sys.modules[type(model).__module__]
    return {
        "image encoder": [(model.backbone, "forward")],
        "text encoder": [(model.text_encoder, "forward")],
        "context decoder": [(model.context_decoder, "forward")],
        "neck (FPN)": [(model.neck, "forward")],
        "decode head": [(model.decode_head, "forward_test")],
        "resize to the input": [(segmentor_module, "resize")],
    }


def authors_infer(peer_dir: str, name: str, workdir: Path, repeats: int) -> dict:
    import torch

    torch.set_num_threads(2)
    _, model = _official(peer_dir, name, workdir)
    model.eval()
    whole, slide = _inputs()
    with torch.no_grad():
        calls = {
            "eval 512x512": lambda: model.encode_decode(whole, None),
            "authors' slide_inference 512x512": lambda: model.slide_inference(whole, _metas(SIZE, SIZE), True),
            "slide 512x683": lambda: model.slide_inference(slide, _metas(*SLIDE_IMAGE), True),
            "probabilities 512x683": lambda: model.inference(slide, _metas(*SLIDE_IMAGE), True),
        }
        times = _timed(calls, repeats)
        breakdown = _breakdown(calls["eval 512x512"], _authors_parts(model), repeats)
        outputs = {name: calls[name]() for name in ("eval 512x512", "slide 512x683", "probabilities 512x683")}
        text_embeddings = model.text_encoder(model.texts, model.contexts)

        class CachedText(torch.nn.Module):  # the harness's cache: the authors' image side alone
            def forward(self, texts, contexts):
                return text_embeddings

        model.text_encoder = CachedText()
        times.update(_timed({"image side 512x512": lambda: model.encode_decode(whole, None)}, repeats))
    output_file = workdir / "authors_outputs.pt"
    if not output_file.exists():
        torch.save(outputs, output_file)
    return {"times": times, "breakdown": breakdown, "peak_rss_gib": _peak_gib()}


def authors_train(peer_dir: str, name: str, workdir: Path, steps: int) -> dict:
    import torch

    torch.set_num_threads(2)
    config, model = _official(peer_dir, name, workdir)
    from mmcv.runner import build_optimizer

    model.train()
    optimizer = build_optimizer(model, config.optimizer)
    pixel_values, labels = _train_batch(model.num_classes)
    metas = _metas(SIZE, SIZE) * BATCH

    def step():
        loss, _ = model._parse_losses(model.forward_train(pixel_values, metas, labels[:, None]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return {"times": _timed({"train step": step}, steps), "peak_rss_gib": _peak_gib()}


def _train_batch(num_labels: int):
    import torch

    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(BATCH, 3, SIZE, SIZE, generator=generator)
    labels = torch.randint(0, num_labels, (BATCH, SIZE, SIZE), generator=generator)
    labels[:, :32] = 255  # some ignored pixels, as real label maps have
    return pixel_values, labels


# ---------------------------------------------------------------------------------------------------- package's side
def _package_model(workdir: Path):
    from denseclip_hf import DenseClipForSemanticSegmentation

    folder = workdir / "converted"
    if not (folder / "config.json").exists():
        from denseclip_hf import convert_denseclip_checkpoint

        convert_denseclip_checkpoint(workdir / "ckpt.pth", output_dir=folder)
    return DenseClipForSemanticSegmentation.from_pretrained(folder)


def _package_parts(model) -> dict:
    """The parts of the package's default eval forward that correspond to `_authors_parts`: the image encoder (ViT /
    ResNet with its pyramid and attention pool), the text encoder (not called where its output is cached), the
    context decoder, the FPN neck, the Semantic FPN head, and the test protocol's resize of the logits to the input
    (with its float32 channels-last view of them)."""
    from denseclip_hf import protocol_denseclip

    base = model.denseclip
    return {
        "image encoder": [(base.image_encoder, "forward")],
        "text encoder": [(base.text_encoder, "forward")],
        "context decoder": [(base.prompting.context_decoder, "forward")],
        "neck (FPN)": [(model.decoder.neck, "forward")],
        "decode head": [(model.decoder.head, "forward")],
        "resize to the input": [(protocol_denseclip, "resize_bilinear"), (protocol_denseclip, "channels_last_float")],
    }


def package_infer(workdir: Path, repeats: int) -> dict:
    import torch

    torch.set_num_threads(2)
    model = _package_model(workdir).eval()
    whole, slide = _inputs()
    reference = torch.load(workdir / "authors_outputs.pt")
    differences = {}

    def compare(calls: dict) -> None:
        for name, call in calls.items():
            if COMPARED.get(name) in reference:
                expected = reference[COMPARED[name]]
                differences[name] = float((call() - expected).abs().max() / expected.abs().max())

    with torch.no_grad():
        calls = {
            "eval 512x512": lambda: model(whole, test_mode=model.config.test_mode).logits,
            "slide 512x683": lambda: model(slide, test_mode="slide").logits,
            "probabilities 512x683": lambda: model.predict_probabilities(slide, SLIDE_IMAGE),
            "image side 512x512": lambda: model(whole, test_mode="whole").logits,
            "single pass 512x512 (1/4 resolution)": lambda: model(whole, test_mode="plain").logits,
        }
        times = _timed(calls, repeats)
        breakdown = _breakdown(calls["eval 512x512"], _package_parts(model), repeats)
        compare(calls)
        model.to(memory_format=torch.channels_last)  # the fastest path (`--channels_last`), on the same weights
        channels_last = {
            "eval 512x512, channels-last": calls["eval 512x512"],
            "slide 512x683, channels-last": calls["slide 512x683"],
        }
        times.update(_timed(channels_last, repeats))
        compare(channels_last)
    return {"times": times, "breakdown": breakdown, "relative_difference": differences, "peak_rss_gib": _peak_gib()}


def package_train(workdir: Path, name: str, steps: int) -> dict:
    import torch

    from denseclip_hf.training.optimization import build_optimizer
    from denseclip_hf.training.recipes import RECIPES as PACKAGE_RECIPES

    torch.set_num_threads(2)
    model = _package_model(workdir).train()
    recipe = PACKAGE_RECIPES[RECIPES[name]]
    optimizer = build_optimizer(
        model,
        recipe.learning_rate,
        recipe.weight_decay,
        recipe.image_encoder_lr_multiplier,
        recipe.weight_decay_exemptions,
    )
    pixel_values, labels = _train_batch(model.config.num_labels)

    def step():
        loss = model(pixel_values, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return {"times": _timed({"train step": step}, steps), "peak_rss_gib": _peak_gib()}


# ------------------------------------------------------------------------------------------------------------ driver
def _phase(python: str, args: list[str], env: dict, script: str = __file__) -> dict:
    """`script --phase *args` run by `python`: the JSON it prints after `@@RESULT@@`."""
    done = subprocess.run(
        [python, str(Path(script).resolve()), "--phase", *args], capture_output=True, text=True, env=env
    )
    if done.returncode or "@@RESULT@@" not in done.stdout:
        raise RuntimeError(f"phase {args[0]} failed (status {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.split("@@RESULT@@", 1)[1])


def _reference_paths(args) -> tuple[str, str, str]:
    peer_dir = args.peer_dir or os.environ.get("PEER_DIR")
    peer_python = args.peer_python or os.environ.get("PEER_PY") or "~/.cache/denseclip-peer/venv/bin/python"
    source = args.denseclip_src or os.environ.get("DENSECLIP_SRC") or "~/.cache/denseclip-peer/official"
    peer_python, source = os.path.expanduser(peer_python), os.path.expanduser(source)
    problems = []
    if not peer_dir or not (Path(peer_dir) / "official.py").is_file():
        problems.append(
            f"--peer_dir (or PEER_DIR) must be the folder of the reference scripts with official.py, got {peer_dir!r}"
        )
    check_reference_environment(
        "the authors' code",
        ("--peer_python (or PEER_PY)", peer_python, "bash <peer_dir>/setup.sh"),
        ("segmentation", source, "there (<peer_dir>/README.md, step 2)"),
        problems,
    )
    return str(Path(peer_dir).resolve()), peer_python, source


def check_reference_environment(
    against: str, python: tuple[str, str, str], source: tuple[str, str, str], problems: list[str]
) -> None:
    """Exits with status 2, saying what is missing, unless the reference environment of a side-by-side run against
    `against` is there: `python = (flag, path, setup command)`, the reference venv's python, must be an executable;
    `source = (part, path, where to export)`, the authors' repository exported to `--denseclip_src`, must hold
    `<part>/denseclip`; `problems` are the calling script's own findings. Shared with
    `authors_detection_side_by_side.py`."""
    flag, python_path, setup = python
    part, source_path, export = source
    problems = list(problems)
    if not os.access(python_path, os.X_OK):
        problems.append(f"{flag} {python_path!r} is not an executable: build the reference venv with `{setup}`")
    if not (Path(source_path) / part / "denseclip").is_dir():
        problems.append(
            f"--denseclip_src (or DENSECLIP_SRC) {source_path!r} holds no {part}/denseclip: export the authors' "
            f"repository {export}"
        )
    if problems:
        print(f"The side-by-side run against {against} needs their reference environment:", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        sys.exit(2)


def _machine() -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    return {"cpu": cpu, "cores": os.cpu_count(), "load_average": [round(load, 2) for load in os.getloadavg()]}


def _median(times: list[float]) -> float:
    return statistics.median(times) if times else float("nan")


def summarize(results: dict) -> tuple[list[dict], str]:
    rows, lines = [], []
    lines.append("| model | run | authors (s) | package (s) | speed-up | target | output difference |")
    lines.append("|---|---|---|---|---|---|---|")
    for name, result in results.items():
        authors, package = result["authors"], result["package"]
        target = dict(TARGETS.get(name, {}))
        differences = result.get("relative_difference", {})
        for run, authors_run in COMPARED.items():
            if authors_run not in authors or run not in package:
                continue
            theirs, ours = _median(authors[authors_run]), _median(package[run])
            row = {"model": name, "run": run, "authors_s": theirs, "package_s": ours, "speedup": theirs / ours}
            if authors_run in target:
                row["target"] = target[run] = target[authors_run]
            if run in differences:
                row["relative_difference"] = differences[run]
            rows.append(row)
            goal = (
                f">= {target[run]}x: {'met' if theirs / ours >= target[run] else 'NOT met'}" if run in target else ""
            )
            difference = f"{differences[run]:.1e}" if run in differences else ""
            lines.append(
                f"| {name} | {run} | {theirs:.2f} | {ours:.2f} | {theirs / ours:.2f}x | {goal} | {difference} |"
            )
        extra = {
            "authors' slide_inference 512x512": authors.get("authors' slide_inference 512x512"),
            "single pass 512x512 (1/4 resolution)": package.get("single pass 512x512 (1/4 resolution)"),
        }
        for run, times in extra.items():
            if times:
                side = "authors" if run.startswith("authors") else "package"
                rows.append({"model": name, "run": run, f"{side}_s": _median(times)})
                theirs, ours = (f"{_median(times):.2f}", "") if side == "authors" else ("", f"{_median(times):.2f}")
                lines.append(f"| {name} | {run} | {theirs} | {ours} | | | |")
        if "train_peak_gib" in result:
            theirs, ours = result["train_peak_gib"]["authors"], result["train_peak_gib"]["package"]
            ratio = ours / theirs
            rows.append(
                {
                    "model": name,
                    "run": "train peak memory (GiB)",
                    "authors": theirs,
                    "package": ours,
                    "ratio": ratio,
                    "target": MEMORY_TARGET,
                }
            )
            goal = f"<= {MEMORY_TARGET}x: {'met' if ratio <= MEMORY_TARGET else 'NOT met'}"
            lines.append(f"| {name} | train peak memory (GiB) | {theirs:.2f} | {ours:.2f} | {ratio:.2f}x | {goal} | |")
    breakdown = [(name, result["breakdown"]) for name, result in results.items() if "breakdown" in result]
    if breakdown:
        lines += [
            "",
            "Per part of the eval 512x512 forward (seconds: medians per call, with timers on each part; GFLOPs: one "
            "call under torch's FLOP counter):",
            "",
            "| model | part | authors (s) | package (s) | speed-up | authors GFLOPs | package GFLOPs | FLOP ratio |",
            "|---|---|---|---|---|---|---|---|",
        ]
    for name, sides in breakdown:
        for part in BREAKDOWN_ROWS:
            theirs, ours = (_median(sides[side]["times"][part]) for side in ("authors", "package"))
            flops = [sides[side]["gflops"][part] for side in ("authors", "package")]
            rows.append(
                {
                    "model": name,
                    "run": f"eval 512x512: {part}",
                    "authors_s": theirs,
                    "package_s": ours,
                    "authors_gflops": flops[0],
                    "package_gflops": flops[1],
                }
            )
            speedup, flop_ratio = (f"{a / b:.2f}x" if b > 0 else "" for a, b in ((theirs, ours), flops))
            lines.append(
                f"| {name} | {part} | {theirs:.3f} | {ours:.3f} | {speedup} | {flops[0]:.1f} | {flops[1]:.1f} | "
                f"{flop_ratio} |"
            )
    return rows, "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phase", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--peer_dir", help="folder of the reference scripts (official.py, setup.sh); or PEER_DIR")
    parser.add_argument("--peer_python", help="python of the reference venv; or PEER_PY")
    parser.add_argument("--denseclip_src", help="the authors' repository, exported; or DENSECLIP_SRC")
    parser.add_argument("--models", nargs="+", default=["vit-b", "r50"], choices=["vit-b", "r50"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train_steps", type=int, default=2)
    parser.add_argument("--no_train", action="store_true", help="inference only")
    add_allocator_argument(parser)
    parser.add_argument("--workdir", type=Path, help="where the weights and outputs go (default: a temporary folder)")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "authors_side_by_side.json")
    args = parser.parse_args()
    if args.phase:  # inside a phase process (the reference venv's python or this package's)
        phase, name, workdir, count = args.phase[0], args.phase[1], Path(args.phase[2]), int(args.phase[3])
        peer_dir = os.environ.get("PEER_DIR", "")
        result = {
            "authors_infer": lambda: authors_infer(peer_dir, name, workdir, count),
            "authors_train": lambda: authors_train(peer_dir, name, workdir, count),
            "package_infer": lambda: package_infer(workdir, count),
            "package_train": lambda: package_train(workdir, name, count),
        }[phase]()
        print("@@RESULT@@" + json.dumps(result))
        return

    peer_dir, peer_python, source = _reference_paths(args)
    env = dict(os.environ, PEER_DIR=peer_dir, DENSECLIP_SRC=source, PYTHONWARNINGS="ignore")
    src = str(HERE.parent / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env["PYTHONPATH"]]) if env.get("PYTHONPATH") else src
    allocator = allocator_environment(env, args)
    started, machine_before = datetime.datetime.now(datetime.timezone.utc), _machine()
    results = {}
    for name in args.models:
        workdir = args.workdir / name if args.workdir else Path(tempfile.mkdtemp(prefix=f"authors-{name}-"))
        workdir.mkdir(parents=True, exist_ok=True)
        result = results[name] = {"authors": {}, "package": {}, "workdir": str(workdir)}
        phases = alternating_phases(peer_python, args)
        peaks = {"authors": 0.0, "package": 0.0}
        for _ in range(args.rounds):
            for side, python, phase, count in phases:
                print(f"{name}: {phase} ...", file=sys.stderr, flush=True)
                out = _phase(python, [phase, name, str(workdir), str(count)], env)
                for run, times in out["times"].items():
                    result[side].setdefault(run, []).extend(times)
                if "relative_difference" in out:
                    result["relative_difference"] = out["relative_difference"]
                if "breakdown" in out:
                    parts = result.setdefault("breakdown", {}).setdefault(side, {"times": {}})
                    for part, times in out["breakdown"]["times"].items():
                        parts["times"].setdefault(part, []).extend(times)
                    parts["gflops"] = out["breakdown"]["gflops"]
                if phase.endswith("train"):
                    peaks[side] = max(peaks[side], out["peak_rss_gib"])
        if not args.no_train:
            result["train_peak_gib"] = peaks
    rows, markdown = summarize(results)
    runs = f"{args.rounds} rounds x {args.repeats} calls "
    runs += f"({'inference only' if args.no_train else f'{args.train_steps} training steps'}), {allocator}"
    save_side_by_side(args, "the authors' code", runs, started, machine_before, rows, markdown, results)


# glibc's allocator, the same on both sides (`--malloc`, both side-by-side scripts). "default": glibc hands large
# freed blocks back to the kernel, so the next forward faults fresh zeroed pages in (a process that first
# `torch.load`ed a checkpoint starts with a warmer heap: fewer faults). "retain": it keeps what is freed for the next
# allocation (no mmap for large blocks, no trimming): almost no page faults, a higher peak.
ALLOCATORS = {"default": {}, "retain": {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)}}


def add_allocator_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--malloc",
        choices=list(ALLOCATORS),
        default="default",
        help="glibc allocator settings for both sides' processes: default, or retain (freed memory kept for reuse: "
        + " ".join(f"{k}={v}" for k, v in ALLOCATORS["retain"].items())
        + ")",
    )


def allocator_environment(env: dict, args: argparse.Namespace) -> str:
    """`env` with `args.malloc`'s settings, and the words for the results' header."""
    env.update(ALLOCATORS[args.malloc])
    settings = " ".join(f"{k}={v}" for k, v in ALLOCATORS[args.malloc].items())
    return f"glibc allocator {args.malloc}" + (f" ({settings}) on both sides" if settings else "")


def alternating_phases(reference_python: str, args: argparse.Namespace) -> list[tuple[str, str, str, int]]:
    """One round's phases as `(side, python, phase, count)`: inference on the authors' side (the reference venv's
    `reference_python`) and the package's, then, unless `args.no_train`, a training step on each. Shared with
    `authors_detection_side_by_side.py`."""
    phases = [
        ("authors", reference_python, "authors_infer", args.repeats),
        ("package", sys.executable, "package_infer", args.repeats),
    ]
    if not args.no_train:
        phases += [
            ("authors", reference_python, "authors_train", args.train_steps),
            ("package", sys.executable, "package_train", args.train_steps),
        ]
    return phases


def save_side_by_side(
    args: argparse.Namespace,
    against: str,
    runs: str,
    started: datetime.datetime,
    machine_before: dict,
    rows: list[dict],
    markdown: str,
    results: dict,
    **extra,
) -> None:
    """Write a side-by-side run's JSON and Markdown (`args.output`), headed by the date, the machine, the load average
    before and after and what was run (`runs`). Shared with `authors_detection_side_by_side.py`."""
    from configs import save_results

    machine_after = _machine()
    header = (
        f"Side by side with {against}, {started:%Y-%m-%d %H:%M} UTC: {machine_before['cpu']}, "
        f"{machine_before['cores']} cores, 2 threads per side; load average {machine_before['load_average']} before, "
        f"{machine_after['load_average']} after; {runs}, medians.\n\n"
    )
    save_results(
        args.output,
        rows,
        header + markdown,
        started=started.isoformat(timespec="seconds"),
        machine=machine_before,
        load_average_after=machine_after["load_average"],
        rounds=args.rounds,
        repeats=args.repeats,
        train_steps=args.train_steps,
        raw=results,
        **extra,
    )


if __name__ == "__main__":
    main()
