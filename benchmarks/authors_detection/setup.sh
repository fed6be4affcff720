#!/usr/bin/env bash
# Build the reference venv that runs the DenseCLIP authors' DETECTION code (mmdet 2.28.2 on mmcv 1.7.2 lite, CPU).
# From the package registry only; it does not fetch the authors' repository (export it to $DENSECLIP_SRC, default
# ~/.cache/denseclip-peer/official, so that $DENSECLIP_SRC/detection/denseclip exists).
#   DET_VENV   venv path (default ~/.cache/denseclip-peer/venv-det)
#   PYTHON     the python that creates it (default python3)
set -euo pipefail
VENV="${DET_VENV:-$HOME/.cache/denseclip-peer/venv-det}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-python3}"

"$PY" -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install -q --upgrade pip

# CPU torch first and pinned in every command after: pip must never pull another torch.
"$PIP" install -q "torch==2.13.0"

# mmcv 1.7.2 without compiled ops (MMCV_WITH_OPS=0): its setup.py imports pkg_resources, so it builds without
# isolation against setuptools<70. mmcv-full would compile for an hour on two cores.
"$PIP" install -q "setuptools<70" wheel
MMCV_WITH_OPS=0 "$PIP" install -q --no-build-isolation "torch==2.13.0" "mmcv==1.7.2"

# mmdet 2.x and what the authors' detection/denseclip imports (timm<1.0: `timm.models.layers`).
"$PIP" install -q "torch==2.13.0" "mmdet==2.28.2" "timm==0.6.13" regex ftfy psutil

# Smoke test: mmdet's detectors and the authors' package import with our op shim (see ops_shim.py).
HERE="$HERE" "$VENV/bin/python" - <<'PYEOF'
import os, sys, warnings
warnings.filterwarnings("ignore")
sys.path.insert(0, os.environ["HERE"])
import ops_shim
ops_shim.install(os.path.join(os.environ["HERE"], "..", "..", "src"))
import torch, mmcv, mmdet, timm
import mmcv.ops, mmdet.models
print("torch", torch.__version__, "mmcv", mmcv.__version__, "mmdet", mmdet.__version__, "timm", timm.__version__)
PYEOF
echo "venv ready: $VENV"
