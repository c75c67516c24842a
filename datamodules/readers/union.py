"""Several datasets read as one (`data.name: union`, the sources in `data.sources`).

Each source is a dict: `name` (a reader of READERS), `root` (relative paths are taken from the union's
`root` when it is given), `tag` (default: the root's last part), `split` (the split passed to its
reader, default the union's split), `splits` (the union splits it belongs to, default all of them), and
any option of its reader (`image_dir`, `category_ids`, `class_ids`, ...; relative `image_dir`s are
taken from the union's root too).

A record's name becomes `<tag>/<name>`: names stay unique across sources, the val carve and the label
split work on the union as on any dataset, and the run's `splits/*.txt` say where every image came from.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from crowdseg.errors import DataError
from datamodules.readers.common import Problem, Record

PATH_OPTIONS = ("image_dir",)


def source_tag(source: dict) -> str:
    return str(source.get("tag") or Path(str(source["root"])).name)


def _resolve(base: Path | None, value: Any) -> Any:
    if base is None or value is None or Path(str(value)).is_absolute():
        return value
    return str(base / str(value))


def read_union(root: str | Path | None, split: str, sources: list[dict], readers: dict[str, Callable]
               ) -> tuple[list[Record], list[Problem]]:
    """Records of every source that belongs to `split`, renamed `<tag>/<name>` (see the module docstring)."""
    if not sources:
        raise DataError("key 'data.sources': data.name=union needs at least one source")
    base = Path(root) if root is not None else None
    checked: list[tuple[str, str, dict]] = []
    for i, source in enumerate(sources):
        source = dict(source)
        if "name" not in source or "root" not in source:
            raise DataError(f"key 'data.sources[{i}]': needs 'name' and 'root'")
        name = source.pop("name")
        if name not in readers or name == "union":
            raise DataError(f"key 'data.sources[{i}].name': {name!r} is not a dataset reader")
        tag = source_tag(source)
        source.pop("tag", None)
        if tag in (t for t, _, _ in checked):
            raise DataError(f"key 'data.sources[{i}].tag': {tag!r} is used by two sources; give each its own tag")
        checked.append((tag, name, source))
    records: list[Record] = []
    problems: list[Problem] = []
    for tag, name, source in checked:
        member_of = source.pop("splits", None)
        inner_split = source.pop("split", split)
        if member_of is not None and split not in member_of:
            continue
        source_root = _resolve(base, source.pop("root"))
        for key in PATH_OPTIONS:
            if key in source:
                source[key] = _resolve(base, source[key])
        found, trouble = readers[name](source_root, inner_split, **source)
        for record in found:
            record.name = f"{tag}/{record.name}"
            record.labels = {**record.labels, "source": tag}
        for problem in trouble:
            if problem.record is not None:
                problem.record = f"{tag}/{problem.record}"
        records += found
        problems += trouble
    return records, problems
