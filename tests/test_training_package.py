"""The training subpackage loads on use: `import denseclip_hf` stays light and every lazy export resolves."""

import importlib
import json
import subprocess
import sys

import denseclip_hf

LIGHT_IMPORT = """
import json, sys
import denseclip_hf
print(json.dumps(sorted(name for name in sys.modules if name == "datasets" or name.startswith("denseclip_hf."))))
"""


def test_import_loads_no_training_module_nor_datasets():
    completed = subprocess.run([sys.executable, "-c", LIGHT_IMPORT], capture_output=True, text=True, check=True)
    loaded = json.loads(completed.stdout.strip().splitlines()[-1])
    assert "datasets" not in loaded and not [name for name in loaded if name.startswith("denseclip_hf.training")]


def test_every_lazy_export_is_the_object_of_its_module():
    for name, module in denseclip_hf._LAZY_EXPORTS.items():
        assert getattr(denseclip_hf, name) is getattr(importlib.import_module(f"denseclip_hf.{module}"), name)
        assert name in denseclip_hf.__all__
