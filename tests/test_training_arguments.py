"""Command-line arguments: recipes fill the settings of every concern, bad values fail before any work, and the
data arguments serve other scripts as they are."""

import dataclasses

import pytest
from conftest import fake_checkpoint, write_pair
from transformers import HfArgumentParser

from denseclip_hf.configuration_denseclip import DECODER_TYPES, PROMPTING_TYPES, TEST_MODES
from denseclip_hf.convert_denseclip_original_to_hf import argument_parser as converter_parser
from denseclip_hf.loss_denseclip import LOSS_REDUCTIONS
from denseclip_hf.training.arguments import (
    ARGUMENT_GROUPS,
    RECIPE_SETTING_GROUPS,
    DataArguments,
    OptimizationArguments,
    SharedOptimizationArguments,
    parse_training_args,
)
from denseclip_hf.training.data import load_segmentation_data
from denseclip_hf.training.detection_arguments import DETECTION_ARGUMENT_GROUPS, DetectionOptimizationArguments
from denseclip_hf.training.evaluation_job import EVALUATION_ARGUMENT_GROUPS
from denseclip_hf.training.optimization import WEIGHT_DECAY_EXEMPTIONS
from denseclip_hf.training.recipes import RECIPE_SETTINGS, RECIPES


def test_recipe_defaults_and_overrides(tmp_path):
    args = parse_training_args(["--output_dir", str(tmp_path)])
    assert args.optimization.recipe == "synthetic"
    assert args.optimization.learning_rate == RECIPES["synthetic"].learning_rate
    assert args.checkpoints.checkpointing_steps is None and args.optimization.eval_steps is None
    paper = parse_training_args(
        ["--recipe", "ade20k-vit-b16", "--output_dir", str(tmp_path), "--weight_decay", "0.01"]
    )
    optimization, augmentation = paper.optimization, paper.augmentation
    assert (optimization.learning_rate, optimization.weight_decay, optimization.image_encoder_lr_multiplier) == (
        1e-4,
        0.01,
        0.1,
    )
    assert (optimization.max_train_steps, optimization.total_train_batch_size, augmentation.crop_size) == (
        80_000,
        32,
        640,
    )
    assert (augmentation.image_scale, augmentation.ratio_range, optimization.num_warmup_steps) == (
        [2048, 640],
        [0.5, 2.0],
        1500,
    )
    assert optimization.loss_reduction == "mean_all_pixels"
    assert (paper.checkpoints.checkpointing_steps, optimization.eval_steps) == ("8000", "8000")
    assert optimization.resolve_eval_steps(steps_per_epoch=633) == 8_000
    assert optimization.resolve_gradient_accumulation_steps(num_processes=8) == 1
    assert optimization.resolve_gradient_accumulation_steps(num_processes=2) == 4
    epochs = parse_training_args(
        ["--recipe", "ade20k-vit-b16", "--num_train_epochs", "3", "--output_dir", str(tmp_path)]
    )
    assert epochs.optimization.max_train_steps is None
    with pytest.raises(ValueError, match="multiple of"):
        optimization.resolve_gradient_accumulation_steps(num_processes=3)
    for name, paper_miou in (("ade20k-rn50", (43.5, 44.7)), ("ade20k-rn101", (45.1, 46.5))):
        resnet = parse_training_args(["--recipe", name, "--output_dir", str(tmp_path)])
        optimization, augmentation = resnet.optimization, resnet.augmentation
        assert (augmentation.crop_size, augmentation.image_scale, optimization.max_train_steps) == (
            512,
            [2048, 512],
            80_000,
        )
        assert (
            optimization.learning_rate,
            optimization.image_encoder_lr_multiplier,
            optimization.total_train_batch_size,
        ) == (1e-4, 0.1, 32)
        assert RECIPES[name].paper_miou == paper_miou
    assert resnet.model.prompting_type == "post_model"
    rn50 = parse_training_args(["--recipe", "ade20k-rn50", "--output_dir", str(tmp_path)])
    # Table 2's prompting ablation: the recipe of ade20k-rn50 with another prompting, single-scale mIoU only.
    for name, prompting_type, paper_miou in (
        ("ade20k-rn50-language-only", "language_only", (42.1, None)),
        ("ade20k-rn50-pre-model", "pre_model", (42.9, None)),
    ):
        ablation = parse_training_args(["--recipe", name, "--output_dir", str(tmp_path)])
        assert ablation.model.prompting_type == prompting_type and RECIPES[name].paper_miou == paper_miou
        assert ablation.to_flat_dict() == {**rn50.to_flat_dict(), "prompting_type": prompting_type, "recipe": name}
    flag = ["--recipe", "ade20k-rn50", "--prompting_type", "language_only", "--output_dir", str(tmp_path)]
    assert parse_training_args(flag).model.prompting_type == "language_only"


@pytest.mark.parametrize(
    "name, base, paper_miou",
    [
        ("ade20k-rn50-baseline", "ade20k-rn50", (39.6, 41.6)),
        ("ade20k-rn101-baseline", "ade20k-rn101", (42.7, 44.3)),
        ("ade20k-vit-b16-baseline", "ade20k-vit-b16", (49.4, 50.3)),
    ],
)
def test_clip_semantic_fpn_baseline_recipes_are_the_denseclip_ones_without_text(tmp_path, name, base, paper_miou):
    """Table 1's "CLIP + Semantic FPN" rows: the DenseCLIP recipe of the same backbone, with prompting_type "none"."""
    baseline = parse_training_args(["--recipe", name, "--output_dir", str(tmp_path)])
    denseclip = parse_training_args(["--recipe", base, "--output_dir", str(tmp_path)])
    assert baseline.to_flat_dict() == {**denseclip.to_flat_dict(), "prompting_type": "none", "recipe": name}
    assert RECIPES[name].paper_miou == paper_miou


def test_every_recipe_setting_is_one_flag_of_one_concern(tmp_path):
    """Each recipe setting is a flag of exactly one argument dataclass, left `None` there for the recipe to fill; a
    full parse gives every flag once, with the recipe's values where none was given."""
    flags = [field.name for group in ARGUMENT_GROUPS for field in dataclasses.fields(group)]
    assert len(flags) == len(set(flags))
    assert set(RECIPE_SETTING_GROUPS) == set(RECIPE_SETTINGS)
    for group in ARGUMENT_GROUPS:
        for field in dataclasses.fields(group):
            if field.name in RECIPE_SETTINGS:
                assert field.default is None, field.name
    args = parse_training_args(["--recipe", "ade20k-rn50", "--output_dir", str(tmp_path), "--crop_size", "448"])
    settings = args.to_flat_dict()
    assert list(settings) == flags
    recipe = RECIPES["ade20k-rn50"]
    expected = {name: list(value) if isinstance(value, tuple) else value for name, value in vars(recipe).items()}
    assert {name: settings[name] for name in RECIPE_SETTINGS} == {name: expected[name] for name in RECIPE_SETTINGS} | {
        "crop_size": 448
    }


def test_data_arguments_serve_another_script_as_they_are(tmp_path):
    """An evaluation script adds `DataArguments` to its own parser: the same dataset flags, the same checks, the same
    data as `load_segmentation_data`."""

    @dataclasses.dataclass
    class EvaluationArguments:
        batch_size: int = 1

    ade = tmp_path / "ADEChallengeData2016"
    for split, name in (("training", "ADE_train_1"), ("training", "ADE_train_2"), ("validation", "ADE_val_1")):
        write_pair(ade / "images" / split / f"{name}.jpg", ade / "annotations" / split / f"{name}.png")
    parser = HfArgumentParser((DataArguments, EvaluationArguments))
    data_args, evaluation = parser.parse_args_into_dataclasses(
        ["--train_dir", str(ade), "--do_reduce_labels", "--max_eval_samples", "1", "--batch_size", "4"]
    )
    assert evaluation.batch_size == 4 and data_args.uses_real_data and data_args.do_reduce_labels
    data = data_args.load(seed=0)
    expected = load_segmentation_data(train_dir=str(ade), max_eval_samples=1)
    assert data.id2label == expected.id2label and len(data.id2label) == 150
    assert (len(data.train), len(data.validation)) == (len(expected.train), len(expected.validation)) == (2, 1)
    assert data.validation[0]["image"].size == (8, 6) and data.train[0]["label"].getpixel((0, 0)) == 1
    assert not DataArguments().uses_real_data
    with pytest.raises(ValueError, match="either --dataset_name or --train_dir"):
        DataArguments(dataset_name="x", train_dir=str(ade))
    with pytest.raises(ValueError, match="--max_eval_samples must be > 0"):
        DataArguments(max_eval_samples=0)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dataset_name", "x", "--train_dir", "."], "either --dataset_name or --train_dir"),
        (["--validation_dir", "."], "--validation_dir needs --train_dir"),
        (["--train_dir", "/does/not/exist"], "does not exist"),
        (["--learning_rate", "-1"], "--learning_rate must be > 0"),
        (["--crop_size", "100"], "multiple of 32"),
        (["--ratio_range", "2", "1"], "--ratio_range"),
        (["--max_train_steps", "10", "--num_warmup_steps", "10"], "--num_warmup_steps"),
        (["--checkpointing_steps", "often"], "--checkpointing_steps"),
        (["--resume_from_checkpoint", "/nowhere"], "--resume_from_checkpoint"),
        (["--recipe", "ade20k-rn18"], "invalid choice"),
        (["--per_device_train_batch_size", "0"], "must be > 0"),
    ],
)
def test_bad_arguments_fail_before_any_work(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as error:
        parse_training_args([*argv, "--output_dir", str(tmp_path / "out")])
    assert error.value.code == 2 and message in capsys.readouterr().err


def test_existing_checkpoints_need_resume_or_overwrite(tmp_path, capsys):
    fake_checkpoint(tmp_path, 5)
    with pytest.raises(SystemExit):
        parse_training_args(["--output_dir", str(tmp_path)])
    assert "--resume_from_checkpoint latest" in capsys.readouterr().err
    assert parse_training_args(["--output_dir", str(tmp_path), "--resume_from_checkpoint", "latest"])
    assert parse_training_args(["--output_dir", str(tmp_path), "--overwrite_output_dir"])


@pytest.mark.parametrize(
    "name, backbone, decoder, channels, schedule, paper_miou",
    [
        ("ade20k-any-rn50", "microsoft/resnet-50", "semantic_fpn", None, (1e-4, 0.1, 80_000, 32), (41.0, 43.0)),
        ("ade20k-any-rn101", "microsoft/resnet-101", "semantic_fpn", None, (1e-4, 0.1, 80_000, 32), (43.0, 45.2)),
        (
            "ade20k-swin-t-upernet",
            "microsoft/swin-tiny-patch4-window7-224",
            "upernet",
            512,
            (6e-5, 1.0, 160_000, 16),
            (45.4, 46.5),
        ),
        (
            "ade20k-swin-s-upernet",
            "microsoft/swin-small-patch4-window7-224",
            "upernet",
            512,
            (6e-5, 1.0, 160_000, 16),
            (48.3, 49.7),
        ),
    ],
)
def test_table5_recipes_set_the_model(tmp_path, name, backbone, decoder, channels, schedule, paper_miou):
    """The any-backbone presets (paper Table 5) choose the backbone and decoder; flags override them."""
    args = parse_training_args(["--recipe", name, "--output_dir", str(tmp_path)])
    model, optimization = args.model, args.optimization
    assert (model.backbone_name_or_path, model.decoder_type, model.decode_head_channels) == (
        backbone,
        decoder,
        channels,
    )
    assert (
        optimization.learning_rate,
        optimization.image_encoder_lr_multiplier,
        optimization.max_train_steps,
        optimization.total_train_batch_size,
    ) == schedule
    assert (args.augmentation.crop_size, RECIPES[name].paper_miou) == (512, paper_miou)
    other = parse_training_args(["--recipe", name, "--output_dir", str(tmp_path), "--decoder_type", "semantic_fpn"])
    assert other.model.decoder_type == "semantic_fpn"


def _flag_help(parser, flag: str) -> tuple[list[str], str]:
    """The choices and the help text of `flag` in an argparse parser."""
    action = parser._option_string_actions[flag]
    return list(action.choices), action.help


@pytest.mark.parametrize(
    ("parser", "flag", "choices"),
    [
        (lambda: HfArgumentParser(ARGUMENT_GROUPS), "--prompting_type", PROMPTING_TYPES),
        (lambda: HfArgumentParser(ARGUMENT_GROUPS), "--decoder_type", DECODER_TYPES),
        (lambda: HfArgumentParser(ARGUMENT_GROUPS), "--loss_reduction", LOSS_REDUCTIONS),
        (
            lambda: HfArgumentParser(ARGUMENT_GROUPS),
            "--weight_decay_exemptions",
            {name: exemption.description for name, exemption in WEIGHT_DECAY_EXEMPTIONS.items()},
        ),
        (lambda: HfArgumentParser(EVALUATION_ARGUMENT_GROUPS), "--mode", TEST_MODES),
        (converter_parser, "--loss_reduction", LOSS_REDUCTIONS),
    ],
    ids=["prompting", "decoder", "loss", "weight decay", "evaluation mode", "converter loss"],
)
def test_choice_flags_offer_and_explain_every_choice(parser, flag, choices):
    """Each choice list is spelled once: a flag's choices are its constant's names, its help explains each one."""
    offered, text = _flag_help(parser(), flag)
    assert offered == list(choices)
    for name, meaning in choices.items():
        assert f"{name}: {meaning}" in text


def test_both_scripts_share_one_optimization_base_and_quote_their_own_authors_values():
    """The optimization settings both training scripts have are declared once (`SharedOptimizationArguments`): each
    task's group starts with them, with the same defaults, and adds only its own settings (and its `--recipe`
    presets). Each script's `--help` quotes its own authors' values, taken from its recipes."""
    shared = [field.name for field in dataclasses.fields(SharedOptimizationArguments)]
    own = {OptimizationArguments: ["lr_power", "min_learning_rate", "loss_reduction"]}
    own[DetectionOptimizationArguments] = ["lr_milestones", "lr_decay", "max_grad_norm", "clip_text_encoder_gradients"]
    for group, names in own.items():
        assert issubclass(group, SharedOptimizationArguments)
        assert [field.name for field in dataclasses.fields(group)] == shared + names
        assert set(group.__annotations__) == {"recipe", *names}  # declared in the task: its own, and its presets
        defaults = {field.name: field.default for field in dataclasses.fields(group) if field.name in shared}
        flags = {
            "sync_batchnorm": True,
            "seed": 42,
            "channels_last": False,
            "flush_denormal": True,
        }  # else the recipe's
        assert defaults == {name: flags.get(name) for name in shared}

    segmentation = HfArgumentParser(ARGUMENT_GROUPS)
    detection = HfArgumentParser(DETECTION_ARGUMENT_GROUPS)
    expected = [
        (segmentation, "--learning_rate", "AdamW learning rate (paper: 1e-4)."),
        (segmentation, "--weight_decay", "AdamW weight decay (paper: 1e-4)."),
        (segmentation, "--min_learning_rate", "Final learning rate (paper: 1e-6)."),
        (segmentation, "--warmup_ratio", "Learning-rate factor at the start of the warmup (paper: 1e-6)."),
        (segmentation, "--max_train_steps", "Optimizer steps (paper: 80000); replaces --num_train_epochs when given."),
        (segmentation, "--per_device_train_batch_size", "Batch per device (paper: 4)."),
        (detection, "--learning_rate", "AdamW learning rate (authors: 1e-4 RetinaNet, 2e-4 Mask R-CNN)."),
        (detection, "--image_encoder_lr_multiplier", "Learning-rate factor of the image encoder (authors: 0.1)."),
        (detection, "--warmup_ratio", "Learning-rate factor at the start of the warmup (authors: 0.001)."),
        (detection, "--num_warmup_steps", "Linear warmup steps (authors: 500)."),
        (
            detection,
            "--lr_milestones",
            "Epochs (0-based) from which the learning rate drops by --lr_decay (authors: 8 11).",
        ),
        (detection, "--max_train_steps", "Optimizer steps; replaces --num_train_epochs when given."),  # epochs there
        (detection, "--per_device_train_batch_size", "Batch per device (authors: 2)."),
    ]
    for parser, flag, text in expected:
        assert parser._option_string_actions[flag].help == text, flag
    for parser in (segmentation, detection):
        assert not any("{authors}" in (action.help or "") for action in parser._actions)
    base_help = {field.name: field.metadata["help"] for field in dataclasses.fields(SharedOptimizationArguments)}
    assert base_help["learning_rate"] == "AdamW learning rate{authors}."  # the tasks' quotes are their own copies
