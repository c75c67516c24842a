"""The method registry: the only list of method names (config loading, `crowdseg --help`, errors).

Adding a method is one module `crowdseg/methods/<name>.py` ending in `METHOD = Method(...)`
(see `base.py`), one line here and its experiment files.
"""
from __future__ import annotations

from crowdseg.methods import boxinst, density, dpmo, p2p, rps, xmask
from crowdseg.methods.base import Job, Method

METHODS: dict[str, Method] = {m.name: m for m in (
    p2p.METHOD,
    density.METHOD,
    rps.METHOD,
    dpmo.METHOD,
    boxinst.METHOD,
    xmask.METHOD,
)}


def section_owners() -> dict[str, list[str]]:
    """Section name -> the methods that have it (to say which method a stray key belongs to)."""
    owners: dict[str, list[str]] = {}
    for method in METHODS.values():
        for section in method.sections:
            owners.setdefault(section, []).append(method.name)
    return owners


__all__ = ["METHODS", "Method", "Job", "section_owners"]
