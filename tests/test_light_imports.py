"""Loading a config imports neither torch nor Lightning (crowdseg.methods.base): `crowdseg config`,
`--help` and a config error answer without paying for them."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LOAD_EVERY_EXPERIMENT = """
import sys
from pathlib import Path
from crowdseg.cli import usage
from crowdseg.config import load_config
experiments = [p for p in sorted(Path("experiments").rglob("*.yaml")) if "sweeps" not in p.parts]
for path in experiments:
    load_config(path)
usage()
print(len(experiments), [m for m in ("torch", "lightning") if m in sys.modules])
"""


def test_loading_every_experiment_imports_neither_torch_nor_lightning():
    proc = subprocess.run([sys.executable, "-c", LOAD_EVERY_EXPERIMENT], cwd=ROOT, capture_output=True, text=True,
                          check=True)
    count, imported = proc.stdout.split(" ", 1)
    assert int(count) > 20 and imported.strip() == "[]"
