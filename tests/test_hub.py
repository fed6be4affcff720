"""The Hub, for real: the real `huggingface_hub` client (and transformers on top of it) pushes to and loads from a Hub
on loopback (tests/hub_server.py, started by conftest with HF_ENDPOINT pointing at it). Repositories saved by this
package load by repo id at a branch, a tag and a commit sha, in the pipeline and with remote code where the package
is not installed; private repositories need the token; the converter's --push_to_hub uploads a folder that loads back;
a missing repository, revision or Hub gives an error that says so."""

import re
import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from conftest import CLASS_NAMES, run_without_denseclip_hf, tiny_config
from hub_server import ORGANIZATION, TOKEN
from huggingface_hub import HfApi
from PIL import Image
from safetensors.torch import load_file
from test_convert_denseclip import authors_checkpoint, head_options
from transformers import CLIPConfig, CLIPModel, pipeline

from denseclip_hf import DenseClipForSemanticSegmentation, DenseClipImageProcessor
from denseclip_hf.convert_denseclip_original_to_hf import main as convert_main

CLIP_TOWERS = ("text_model", "text_projection", "vision_model", "visual_projection")


def decisive_model(tokenizer, seed: int) -> DenseClipForSemanticSegmentation:
    """A tiny random DenseCLIP whose classifier separates classes clearly (no ties between predictions)."""
    torch.manual_seed(seed)
    model = DenseClipForSemanticSegmentation(tiny_config(tokenizer)).eval()
    with torch.no_grad():
        model.decoder.head.classifier.weight.normal_(std=1.0)
    return model


Weights = torch.nn.Module | dict[str, torch.Tensor]


def assert_same_weights(loaded: Weights, expected: Weights) -> None:
    """Bit for bit, every tensor."""
    actual, expected = (w if isinstance(w, dict) else w.state_dict() for w in (loaded, expected))
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


def scene() -> Image.Image:
    return Image.fromarray(np.random.RandomState(3).randint(0, 256, (48, 72, 3), dtype=np.uint8))


def reference_segmentation(model, processor, image: Image.Image) -> np.ndarray:
    """Class ids from the in-memory model and processor, at the image's size (no Hub involved)."""
    with torch.no_grad():
        outputs = model(**processor(images=image, return_tensors="pt"))
    return processor.post_process_semantic_segmentation(outputs, target_sizes=[image.size[::-1]])[0].numpy()


def class_ids(segments: list[dict], image: Image.Image) -> np.ndarray:
    """The pipeline's named masks back to one class id per pixel."""
    ids = np.full(image.size[::-1], -1)
    for segment in segments:
        ids[np.asarray(segment["mask"]) > 0] = CLASS_NAMES.index(segment["label"])
    return ids


@dataclass
class Published:
    repo_id: str
    processor: DenseClipImageProcessor
    models: dict[str, DenseClipForSemanticSegmentation]  # by revision
    first_commit: str


@pytest.fixture(scope="module")
def published(hub, tokenizer) -> Published:
    """One repository, pushed with `push_to_hub`, in three versions: the first one tagged `v1` (and reachable by its
    commit sha), a second one on a branch `experiment` made from it, the third one on `main`."""
    repo_id = f"{ORGANIZATION}/denseclip-tiny"
    processor = DenseClipImageProcessor(size={"shortest_edge": 64, "longest_edge": 256})
    first, second, third = (decisive_model(tokenizer, seed) for seed in range(3))
    first.push_to_hub(repo_id, token=TOKEN)
    first_commit = processor.push_to_hub(repo_id, token=TOKEN).oid
    HfApi(token=TOKEN).create_tag(repo_id, tag="v1")
    second.push_to_hub(repo_id, token=TOKEN, revision="experiment")
    third.push_to_hub(repo_id, token=TOKEN)
    models = {"main": third, "v1": first, first_commit: first, "experiment": second}
    return Published(repo_id, processor, models, first_commit)


def test_push_to_hub_stores_the_weights_in_lfs(published, hub, tmp_path):
    """What the client uploaded: the weights through the LFS batch API (binary files go there on the Hub), the
    config as a regular file; both byte for byte what `save_pretrained` writes."""
    published.models["v1"].save_pretrained(tmp_path)
    files = hub.repositories[published.repo_id].commits[published.first_commit]
    assert files["model.safetensors"].lfs and not files["config.json"].lfs
    for name in ("model.safetensors", "config.json", "modeling_denseclip.py"):
        assert files[name].data == (tmp_path / name).read_bytes(), name
    assert {"preupload", "lfs_batch", "lfs_upload", "lfs_verify", "commit"} <= set(hub.routes_called)


@pytest.mark.parametrize("revision", [None, "main", "v1", "first commit", "experiment"])
def test_from_pretrained_loads_each_revision(published, revision):
    revision = published.first_commit if revision == "first commit" else revision
    model = DenseClipForSemanticSegmentation.from_pretrained(published.repo_id, revision=revision)
    assert_same_weights(model, published.models[revision or "main"])
    assert DenseClipImageProcessor.from_pretrained(published.repo_id, revision=revision).to_dict() == (
        published.processor.to_dict()
    )


def test_revisions_are_listed(published):
    refs = HfApi().list_repo_refs(published.repo_id)
    assert {branch.name for branch in refs.branches} == {"main", "experiment"}
    assert [(tag.name, tag.target_commit) for tag in refs.tags] == [("v1", published.first_commit)]


def test_pipeline_by_repo_id_and_revision(published):
    image = scene()
    for revision in ("main", "experiment"):
        segments = pipeline("image-segmentation", model=published.repo_id, revision=revision)(image)
        expected = reference_segmentation(published.models[revision], published.processor, image)
        np.testing.assert_array_equal(class_ids(segments, image), expected)


def test_remote_code_by_repo_id_without_the_package(published, tmp_path):
    """`AutoModelForSemanticSegmentation` and the pipeline with `trust_remote_code=True`, where `denseclip_hf` cannot
    be imported: each revision's code and weights come from the Hub and give that revision's logits."""
    image, revisions = scene(), ["main", "v1", published.first_commit, "experiment"]
    image.save(tmp_path / "scene.png")
    pixel_values = published.processor(images=image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = {revision: published.models[revision](pixel_values).logits for revision in revisions}
    v1_ids = torch.from_numpy(reference_segmentation(published.models["v1"], published.processor, image))
    torch.save({"pixel_values": pixel_values, "logits": logits, "v1_ids": v1_ids}, tmp_path / "io.pt")
    run_without_denseclip_hf(
        f"""
        import numpy as np
        import torch
        from PIL import Image
        from transformers import AutoModelForSemanticSegmentation, pipeline

        repo_id, io = {published.repo_id!r}, torch.load({str(tmp_path / "io.pt")!r})
        for revision, expected in io["logits"].items():
            model = AutoModelForSemanticSegmentation.from_pretrained(
                repo_id, revision=revision, trust_remote_code=True
            )
            assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
            with torch.no_grad():
                assert torch.equal(model.eval()(io["pixel_values"]).logits, expected), revision
        assert "denseclip_hf" not in sys.modules
        segmenter = pipeline("image-segmentation", model=repo_id, revision="v1", trust_remote_code=True)
        image = Image.open({str(tmp_path / "scene.png")!r})
        ids = np.full(io["v1_ids"].shape, -1)
        for segment in segmenter(image):
            ids[np.asarray(segment["mask"]) > 0] = {CLASS_NAMES!r}.index(segment["label"])
        np.testing.assert_array_equal(ids, io["v1_ids"].numpy())
        """,
        tmp_path,
        online=True,
    )


def test_private_repository_needs_the_token(hub_repo_id, tokenizer):
    model = decisive_model(tokenizer, seed=4)
    model.push_to_hub(hub_repo_id, token=TOKEN, private=True)
    with pytest.raises(OSError, match="not a valid model identifier(.|\n)*private repository(.|\n)*token"):
        DenseClipForSemanticSegmentation.from_pretrained(hub_repo_id)
    with pytest.raises(OSError, match="401(.|\n)*Invalid credentials"):
        DenseClipForSemanticSegmentation.from_pretrained(hub_repo_id, token="hf_not_a_token")
    assert_same_weights(DenseClipForSemanticSegmentation.from_pretrained(hub_repo_id, token=TOKEN), model)


def clip_tensors(model: DenseClipForSemanticSegmentation) -> dict[str, torch.Tensor]:
    """The CLIP towers of a DenseCLIP model, under their `CLIPModel` names."""
    towers = {}
    for key, tensor in model.base_model.state_dict().items():
        tower, _, name = key.partition(".")
        if tower in ("text_encoder", "image_encoder") and name.split(".")[0] in CLIP_TOWERS:
            towers[name] = tensor
    return towers


def test_clip_weights_by_repo_id_and_revision(hub_repo_id, tiny_clip_dir, tmp_path):
    """`from_clip_pretrained` on a CLIP repository (weights and tokenizer) takes the towers of the requested revision,
    not those of main."""
    api = HfApi(token=TOKEN)
    api.create_repo(hub_repo_id)
    api.upload_folder(repo_id=hub_repo_id, folder_path=tiny_clip_dir)
    api.create_tag(hub_repo_id, tag="v1")
    torch.manual_seed(1)
    CLIPModel(CLIPConfig.from_pretrained(tiny_clip_dir)).save_pretrained(tmp_path / "retrained")
    api.upload_folder(repo_id=hub_repo_id, folder_path=tmp_path / "retrained")
    model = DenseClipForSemanticSegmentation.from_clip_pretrained(
        hub_repo_id, id2label=dict(enumerate(CLASS_NAMES)), revision="v1"
    )
    v1, main = (load_file(folder / "model.safetensors") for folder in (tiny_clip_dir, tmp_path / "retrained"))
    v1.pop("logit_scale")
    assert_same_weights(clip_tensors(model), v1)
    assert not torch.equal(v1["text_projection.weight"], main["text_projection.weight"])


def test_converter_pushes_a_folder_that_loads_by_repo_id(hub, hub_repo_id, tmp_path, monkeypatch):
    """`--push_to_hub ORG/NAME --private --revision BRANCH`, with the token of HF_TOKEN: one commit of the converted
    folder on that branch, which loads by repo id with the token."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    torch.save(authors_checkpoint("vit"), tmp_path / "checkpoint.pth")
    options = [f"--{name}={value}" for name, value in head_options("vit").items()]
    argv = ["--checkpoint", str(tmp_path / "checkpoint.pth"), "--output_dir", str(tmp_path / "converted"), *options]
    convert_main([*argv, "--push_to_hub", hub_repo_id, "--private", "--revision", "converted"])

    api = HfApi(token=TOKEN)
    assert api.model_info(hub_repo_id).private
    assert sorted(api.list_repo_files(hub_repo_id, revision="converted")) == sorted(
        path.name for path in (tmp_path / "converted").iterdir()
    )
    assert api.list_repo_files(hub_repo_id) == []  # main keeps the empty initial commit
    assert len(hub.repositories[hub_repo_id].commits) == 2
    model = DenseClipForSemanticSegmentation.from_pretrained(hub_repo_id, revision="converted", token=TOKEN)
    assert_same_weights(model, load_file(tmp_path / "converted" / "model.safetensors"))
    processor = DenseClipImageProcessor.from_pretrained(hub_repo_id, revision="converted", token=TOKEN)
    assert processor.to_dict() == DenseClipImageProcessor.from_pretrained(tmp_path / "converted").to_dict()


def test_converter_push_options_need_a_repository(tmp_path, capsys):
    with pytest.raises(SystemExit):
        convert_main(["--checkpoint", "x.pth", "--output_dir", str(tmp_path), "--private"])
    assert "--private and --revision apply to --push_to_hub REPO_ID" in capsys.readouterr().err


@pytest.mark.parametrize("missing", ["repository", "revision"])
def test_missing_repository_or_revision_is_named(published, missing):
    if missing == "repository":
        repo_id, revision = f"{ORGANIZATION}/no-such-model", None
        message = f"{repo_id} is not a local folder and is not a valid model identifier"
    else:
        repo_id, revision = published.repo_id, "no-such-branch"
        message = "no-such-branch is not a valid git identifier (branch name, tag name or commit id)"
    with pytest.raises(OSError, match=re.escape(message)):
        DenseClipForSemanticSegmentation.from_pretrained(repo_id, revision=revision)


def test_unreachable_hub(published, hub, hub_repo_id, monkeypatch):
    """With the Hub down, a model downloaded before loads from the cache; any other says it could not connect, after
    the client's retries (their waits are skipped here: 1 + 2 + 4 + 8 + 8 s in huggingface_hub 2.4)."""
    DenseClipForSemanticSegmentation.from_pretrained(published.repo_id, revision="experiment")
    waits = []
    with hub.unreachable():
        model = DenseClipForSemanticSegmentation.from_pretrained(published.repo_id, revision="experiment")
        monkeypatch.setattr(time, "sleep", waits.append)
        with pytest.raises(OSError, match=f"couldn't connect to '{hub.url}'"):
            DenseClipForSemanticSegmentation.from_pretrained(hub_repo_id)
        monkeypatch.undo()
    assert waits, "the client gave up without retrying"
    assert_same_weights(model, published.models["experiment"])
