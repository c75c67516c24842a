"""Every package directory is listed in setup.cfg, so a non-editable install ships all of it."""
import configparser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_setup_cfg_lists_every_package():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    found = {".".join(p.parent.relative_to(ROOT / "src").parts) for p in (ROOT / "src" / "crowdseg").rglob("__init__.py")}
    found |= {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "datamodules").rglob("__init__.py")}
    assert found == listed, f"add to / remove from setup.cfg [options] packages: {sorted(found ^ listed)}"
