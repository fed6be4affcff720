"""The DenseCLIP authors' detectors, built from their repository through mmdet's registries (run in the reference venv
of `setup.sh`; none of their code is copied: it is imported from `$DENSECLIP_SRC/detection`).

    import official_detectors as od
    od.setup(package_src)                       # the op shim, then mmdet and the authors' `denseclip` package
    config, model = od.build("retinanet")       # their RN50 config, 80 COCO classes, no pretrained weights
    od.randomize_(model, seed=7)                # every parameter and buffer, reproducibly

What the authors' `train.py` does to build a model, minus the checkpoint: `Config.fromfile` of their config,
`model.class_names` = COCO's classes, `build_detector(cfg.model, train_cfg=cfg.train_cfg, test_cfg=cfg.test_cfg)`
(their configs keep both at the top level), `pretrained=None` (the configs name CLIP's `pretrained/RN50.pt`; the
weights are random here).
"""

import os
import sys
from pathlib import Path

CONFIGS = {
    "retinanet": "retinanet_denseclip_r50_fpn_1x_coco.py",
    "mask_rcnn": "mask_rcnn_denseclip_r50_fpn_1x_coco.py",
}


def source() -> Path:
    """The authors' detection folder: `$DENSECLIP_SRC/detection` (default ~/.cache/denseclip-peer/official)."""
    root = Path(os.path.expanduser(os.environ.get("DENSECLIP_SRC") or "~/.cache/denseclip-peer/official"))
    folder = root / "detection"
    if not (folder / "denseclip").is_dir():
        raise OSError(f"{folder} holds no denseclip/: export the authors' repository to DENSECLIP_SRC")
    return folder


def setup(package_src: str) -> None:
    """Installs the op shim (the package's NMS and RoIAlign as mmcv's ops) and registers the authors' modules."""
    import warnings

    warnings.filterwarnings("ignore")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import ops_shim

    ops_shim.install(package_src)
    sys.path.insert(0, str(source()))
    import denseclip  # noqa: F401  (registers DenseCLIP_RetinaNet / DenseCLIP_MaskRCNN and their modules)


def build(name: str):
    """(config, model) of the authors' `name` detector ("retinanet" or "mask_rcnn"), in eval mode."""
    from mmcv import Config
    from mmdet.datasets import CocoDataset
    from mmdet.models import build_detector

    config = Config.fromfile(str(source() / "configs" / CONFIGS[name]))
    config.model.pretrained = None
    config.model.class_names = list(CocoDataset.CLASSES)
    model = build_detector(config.model, train_cfg=config.get("train_cfg"), test_cfg=config.get("test_cfg"))
    model.CLASSES = CocoDataset.CLASSES
    return config, model.eval()


def randomize_(model, seed: int) -> None:
    """Every parameter and buffer of `model` drawn from a generator seeded with `seed`: normalization layers as
    trained ones look (weight U(0.5, 1.5), bias and BatchNorm running mean N(0, 0.1), running variance U(0.5, 1.5));
    matrices and kernels N(0, 1 / fan_in) (CLIP's `(in, out)` projection matrices: fan-in = rows); embeddings,
    prompt contexts and other vectors N(0, 0.1); the prompting's `gamma` +-U(0.2, 0.8) so that the context decoder
    weighs in."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    norms = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.modules.batchnorm._BatchNorm)
    done = set()
    with torch.no_grad():
        for prefix, module in model.named_modules():
            if not isinstance(module, norms):
                continue
            for name, tensor in module.named_parameters(recurse=False):
                if name == "weight":
                    tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
                else:
                    tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))
                done.add(f"{prefix}.{name}")
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=generator))
        for name, tensor in model.named_parameters():
            if name in done:
                continue
            if name == "gamma":
                size = 0.2 + 0.6 * torch.rand(tensor.shape, generator=generator)
                tensor.copy_(size * torch.randn(tensor.shape, generator=generator).sign())
            elif tensor.dim() >= 2 and "embedding" not in name and name != "contexts":
                fan_in = tensor.shape[0] if name.endswith("proj") and tensor.dim() == 2 else tensor[0].numel()
                tensor.copy_(torch.randn(tensor.shape, generator=generator) / fan_in**0.5)
            else:
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))


def classifier(model):
    """The final classifier that `calibrate_` rescales: RetinaNet's `retina_cls` conv, Mask R-CNN's box `fc_cls`."""
    return model.roi_head.bbox_head.fc_cls if hasattr(model, "roi_head") else model.bbox_head.retina_cls


def calibrate_(model, image, metas) -> None:
    """Rescales the classifier of random weights as a trained one scores, from one forward on `image` (as the
    package's `benchmarks/detection.py` does): RetinaNet logits of mean -4.6 (the focal-loss prior) and std 1, so that
    every level fills its 1000 candidates; Mask R-CNN class logits of mean 0 and std 3, so that most RoIs have a class
    above 0.05. Then 100 detections (and masks) per image come out, as from a trained COCO model."""
    import torch

    layer = classifier(model)
    logits = []
    hook = layer.register_forward_hook(lambda module, inputs, output: logits.append(output.detach().flatten()))
    with torch.no_grad():
        model.simple_test(image, metas, rescale=True)
    hook.remove()
    values = torch.cat(logits)
    mean, std = (0.0, 3.0) if hasattr(model, "roi_head") else (-4.6, 1.0)
    scale = std / values.std()
    with torch.no_grad():
        layer.weight.mul_(scale)
        layer.bias.copy_((layer.bias - values.mean()) * scale + mean)
