"""This package against the DenseCLIP authors' own segmentation code (their mmseg segmentor, built from their
repository), on the same random weights, side by side: the default eval forward, sliding windows, probabilities, the
image side alone and a training step.

    PYTHONPATH=src python benchmarks/authors_side_by_side.py --peer_dir ../shared/peer \\
        [--peer_python ~/.cache/denseclip-peer/venv/bin/python] [--denseclip_src ~/.cache/denseclip-peer/official] \\
        [--models vit-b r50] [--rounds 2] [--repeats 3] [--train_steps 2] [--no_train] \\
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

The outputs are compared: the package's logits and probabilities against the authors' on the same input.
"""

import argparse
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
    return {"times": times, "peak_rss_gib": _peak_gib()}


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


def package_infer(workdir: Path, repeats: int) -> dict:
    import torch

    torch.set_num_threads(2)
    model = _package_model(workdir).eval()
    whole, slide = _inputs()
    with torch.no_grad():
        calls = {
            "eval 512x512": lambda: model(whole, test_mode=model.config.test_mode).logits,
            "slide 512x683": lambda: model(slide, test_mode="slide").logits,
            "probabilities 512x683": lambda: model.predict_probabilities(slide, SLIDE_IMAGE),
            "image side 512x512": lambda: model(whole, test_mode="whole").logits,
            "single pass 512x512 (1/4 resolution)": lambda: model(whole, test_mode="plain").logits,
        }
        times = _timed(calls, repeats)
        reference = torch.load(workdir / "authors_outputs.pt")
        differences = {}
        for name, expected in reference.items():
            got = calls[name]()
            differences[name] = float((got - expected).abs().max() / expected.abs().max())
    return {"times": times, "relative_difference": differences, "peak_rss_gib": _peak_gib()}


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
    if not os.access(peer_python, os.X_OK):
        problems.append(
            f"--peer_python (or PEER_PY) {peer_python!r} is not an executable: build the reference venv with "
            "`bash <peer_dir>/setup.sh`"
        )
    if not (Path(source) / "segmentation" / "denseclip").is_dir():
        problems.append(
            f"--denseclip_src (or DENSECLIP_SRC) {source!r} holds no segmentation/denseclip: export the authors' "
            "repository there (<peer_dir>/README.md, step 2)"
        )
    if problems:
        print("The side-by-side run against the authors' code needs their reference environment:", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        sys.exit(2)
    return str(Path(peer_dir).resolve()), peer_python, source


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
        target = TARGETS.get(name, {})
        differences = result.get("relative_difference", {})
        for run in ("eval 512x512", "slide 512x683", "probabilities 512x683", "image side 512x512", "train step"):
            if run not in authors or run not in package:
                continue
            theirs, ours = _median(authors[run]), _median(package[run])
            row = {"model": name, "run": run, "authors_s": theirs, "package_s": ours, "speedup": theirs / ours}
            if run in target:
                row["target"] = target[run]
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
    started, machine_before = datetime.datetime.now(datetime.timezone.utc), _machine()
    results = {}
    for name in args.models:
        workdir = args.workdir / name if args.workdir else Path(tempfile.mkdtemp(prefix=f"authors-{name}-"))
        workdir.mkdir(parents=True, exist_ok=True)
        result = results[name] = {"authors": {}, "package": {}, "workdir": str(workdir)}
        phases = [
            ("authors", peer_python, "authors_infer", args.repeats),
            ("package", sys.executable, "package_infer", args.repeats),
        ]
        if not args.no_train:
            phases += [
                ("authors", peer_python, "authors_train", args.train_steps),
                ("package", sys.executable, "package_train", args.train_steps),
            ]
        peaks = {"authors": 0.0, "package": 0.0}
        for _ in range(args.rounds):
            for side, python, phase, count in phases:
                print(f"{name}: {phase} ...", file=sys.stderr, flush=True)
                out = _phase(python, [phase, name, str(workdir), str(count)], env)
                for run, times in out["times"].items():
                    result[side].setdefault(run, []).extend(times)
                if "relative_difference" in out:
                    result["relative_difference"] = out["relative_difference"]
                if phase.endswith("train"):
                    peaks[side] = max(peaks[side], out["peak_rss_gib"])
        if not args.no_train:
            result["train_peak_gib"] = peaks
    rows, markdown = summarize(results)
    machine_after = _machine()
    header = (
        f"Side by side with the authors' code, {started:%Y-%m-%d %H:%M} UTC: {machine_before['cpu']}, "
        f"{machine_before['cores']} cores, 2 threads per side; load average {machine_before['load_average']} before, "
        f"{machine_after['load_average']} after; {args.rounds} rounds x {args.repeats} calls "
        f"({'inference only' if args.no_train else f'{args.train_steps} training steps'}), medians.\n\n"
    )
    from configs import save_results

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
    )


if __name__ == "__main__":
    main()
