"""Every package directory is listed in setup.cfg, so a non-editable install ships all of it; setup.cfg
holds dependency ranges and requirements.lock the exact versions inside them."""
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


def test_install_requires_holds_ranges_and_the_lock_pins_each_inside_its_range():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = cfg["options"]["install_requires"].split("\n") + cfg["options.extras_require"]["test"].split("\n")
    requirements = [Requirement(line) for line in lines if line.strip()]
    assert not [str(r) for r in requirements if any(s.operator == "==" for s in r.specifier)], "exact pins go in the lock"
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith((" ", "#")):
            name, _, version = line.split(";")[0].strip().partition("==")
            pins[canonicalize_name(name)] = Version(version)
    for requirement in requirements:
        pinned = pins.get(canonicalize_name(requirement.name))
        assert pinned is not None and pinned in requirement.specifier, \
            f"{requirement}: requirements.lock has {pinned}; run `make lock`"
