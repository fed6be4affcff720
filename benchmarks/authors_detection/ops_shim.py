"""The compiled operators that mmcv 1.7.2 lite lacks, supplied from this package (run inside the reference venv).

mmcv built with `MMCV_WITH_OPS=0` has no `mmcv._ext`, so `import mmcv.ops` (and with it every mmdet detector) fails.
`install()` makes mmcv's and mmdet's Python code run unchanged around two operators of `denseclip_hf.box_ops`,
plain PyTorch and proven equal to mmcv's CPU kernels on the `official_mmcv_ops` fixture:

- NMS: `mmcv._ext` is a stand-in module whose `nms(boxes, scores, iou_threshold, offset)` is `box_ops.nms`. mmcv's
  `nms`, `batched_nms` and `NMSop` (score filtering, `max_num`, class offsets, splitting) are theirs.
- RoIAlign: `mmcv.ops.roi_align.roi_align` (the module's function that mmcv's `RoIAlign` module and mmdet's
  `BitmapMasks.crop_and_resize` call, normally `RoIAlignFunction.apply`) is `box_ops.roi_align`, which autograd
  differentiates (training back-propagates through the RoI features, as through mmcv's backward kernel).

Every other entry of `mmcv._ext` raises when called: the DenseCLIP detectors need no other compiled op on a CPU
(FocalLoss takes mmdet's PyTorch path off CUDA). The package side of the benchmark uses the very same two operators,
so the comparison measures everything except them.

torchvision (imported by timm and mmcv) is the PyPI build, whose compiled ops cannot load beside a CPU torch; its
import then fails on `torch.library.register_fake("torchvision::nms")` (and `qnms`) for undefined operators. Their
schemas are declared here (no kernels): nothing in these runs calls a torchvision op.

    import ops_shim; ops_shim.install(package_src)  # before importing mmcv.ops / mmdet
"""

import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path

import torch

# torchvision's schemas of the two operators that its import registers fake kernels for unconditionally.
_TORCHVISION_SCHEMAS = {
    "nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_LIBRARIES: list = []  # keeps the torch.library fragments alive


def _declare_torchvision_schemas() -> None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or "torchvision" in sys.modules:
        return
    compiled = sorted(Path(spec.origin).parent.glob("_C*.so"))
    if compiled:
        try:
            torch.ops.load_library(str(compiled[0]))
            return  # torchvision's own ops load: nothing to declare
        except (OSError, RuntimeError):
            pass
    library = torch.library.Library("torchvision", "FRAGMENT")
    for name, schema in _TORCHVISION_SCHEMAS.items():
        if not hasattr(torch.ops.torchvision, name):
            library.define(name + schema)
    _LIBRARIES.append(library)


def _box_ops(package_src: str):
    """`denseclip_hf.box_ops` loaded alone from the package's sources (it imports nothing of the package)."""
    path = Path(package_src) / "denseclip_hf" / "box_ops.py"
    if not path.is_file():
        raise OSError(f"{path} does not exist: give the package's src/ folder (the one holding denseclip_hf/).")
    spec = importlib.util.spec_from_file_location("denseclip_box_ops", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Extension(types.ModuleType):
    """`mmcv._ext`: `nms` from the package, every other compiled function a placeholder that raises."""

    def __init__(self, box_ops) -> None:
        super().__init__("mmcv._ext")
        # No loader: mmcv's `check_ops_exist()` (its optimizer builder's test for deformable convolutions, which
        # these models have none of) answers False.
        self.__spec__ = importlib.machinery.ModuleSpec("mmcv._ext", None)
        self._box_ops = box_ops

    def nms(self, boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, offset: int = 0) -> torch.Tensor:
        if offset != 0:
            raise NotImplementedError("the package's nms computes areas without +1 (offset 0) only")
        return self._box_ops.nms(boxes, scores, float(iou_threshold))

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        def missing(*args, **kwargs):
            raise NotImplementedError(f"mmcv._ext.{name} is not available: mmcv lite, see ops_shim.py")

        return missing


def install(package_src: str) -> None:
    """Installs the shims; call before importing `mmcv.ops` or `mmdet`. `package_src`: the package's src/ folder."""
    if "mmcv._ext" in sys.modules:
        return
    _declare_torchvision_schemas()
    box_ops = _box_ops(package_src)
    if importlib.util.find_spec("mmcv._ext") is not None:
        raise RuntimeError("mmcv has compiled ops (mmcv-full): this shim is for mmcv lite only")
    sys.modules["mmcv._ext"] = _Extension(box_ops)
    import mmcv.ops

    def roi_align(
        features: torch.Tensor,
        rois: torch.Tensor,
        output_size,
        spatial_scale: float = 1.0,
        sampling_ratio: int = 0,
        pool_mode: str = "avg",
        aligned: bool = True,
    ) -> torch.Tensor:
        if pool_mode != "avg":
            raise NotImplementedError("the package's roi_align averages (pool_mode='avg') only")
        return box_ops.roi_align(features, rois, output_size, float(spatial_scale), int(sampling_ratio), aligned)

    # The module's function (what mmcv's RoIAlign and mmdet's `from mmcv.ops.roi_align import roi_align` find) and
    # its re-export in mmcv.ops.
    sys.modules["mmcv.ops.roi_align"].roi_align = roi_align
    mmcv.ops.roi_align = roi_align
