"""Annotation checks and the `on_bad_annotation` policy (fail | skip | drop).

Checked per image: the image header is readable and non-empty, a JPEG / PNG file is complete (its
end marker is there; optionally the whole image decodes: `verify_images`), its size agrees with the annotation's, points are finite, inside the image
(within `outside_tolerance` pixels; those are clipped onto the border pixels), not duplicated,
boxes are finite and not inverted, and an instance map has the image's size. Readers add their own
problems (images without annotation files and the reverse, unparsable files).

Policies:
- fail: raise a DataError naming the first problem's file (and line or key), counting the rest;
- skip: leave out every image with a problem and report them;
- drop: remove only the offending points of point-level problems (an instance map is renumbered
  on load), skip images with image-level problems, and report them.
The report is one warning of this module's logger (on stderr unless logging is configured).
"""
from __future__ import annotations

import logging
import os

import numpy as np
from PIL import Image

from crowdseg.errors import ConfigError, DataError
from datamodules.readers.common import Problem, Record, image_size, truncated
from datamodules.readers.idmaps import id_map_size

POLICIES = ("fail", "skip", "drop")
DUPLICATE_POLICIES = ("fail", "drop", "keep")  # data.on_duplicate_points
MAX_REPORT_LINES = 30
log = logging.getLogger(__name__)


def check_record(record: Record, outside_tolerance: float = 1.0, verify_image: bool = False) -> list[Problem]:
    """Problems of one record; clips points lying at most `outside_tolerance` px outside the image."""
    problems: list[Problem] = []
    name = record.name
    if record.image_path is not None:
        try:
            size = image_size(record.image_path)
            if truncated(record.image_path):
                return [Problem(str(record.image_path), "truncated image file (no end-of-image marker)", record=name)]
            if verify_image:
                with Image.open(record.image_path) as im:
                    im.load()
        except DataError as exc:
            return [Problem(str(record.image_path), str(exc).partition(": ")[2], record=name)]
        except (OSError, SyntaxError, ValueError) as exc:
            return [Problem(str(record.image_path), f"unreadable or truncated image ({exc})", record=name)]
        if record.size is not None and tuple(record.size) != size:
            return [Problem(record.source, f"annotation says the image is {record.size[1]}x{record.size[0]} "
                                           f"but {record.image_path.name} is {size[1]}x{size[0]}", record=name)]
        record.size = size
    elif record.size is None:
        return [Problem(record.source, "no image file and no image size", record=name)]
    h, w = record.size

    pts = record.points
    finite = np.isfinite(pts).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        problems.append(Problem(record.source, f"{len(bad)} point(s) are NaN or infinite (point index {bad[0]})",
                                record=name, point_indices=bad))
    lo = -0.5 - outside_tolerance
    with np.errstate(invalid="ignore"):
        outside = finite & ((pts[:, 0] < lo) | (pts[:, 1] < lo) | (pts[:, 0] > w - 0.5 + outside_tolerance)
                            | (pts[:, 1] > h - 0.5 + outside_tolerance))
    if outside.any():
        bad = np.flatnonzero(outside)
        x, y = pts[bad[0]]
        problems.append(Problem(record.source, f"{len(bad)} point(s) outside the {w}x{h} image, e.g. point index "
                                               f"{bad[0]} at x={x:.2f} y={y:.2f} (0-based)",
                                record=name, point_indices=bad))
    ok = finite & ~outside
    if ok.any():
        record.points = pts.copy()
        record.points[ok] = np.clip(pts[ok], 0, [w - 1, h - 1])
    if len(pts) > 1:
        _, first = np.unique(pts, axis=0, return_index=True)
        dup = np.setdiff1d(np.arange(len(pts)), first)
        if len(dup):
            x, y = pts[dup[0]]
            problems.append(Problem(record.source, f"{len(dup)} duplicate point(s), e.g. point index {dup[0]} "
                                                   f"repeats x={x:.2f} y={y:.2f}", record=name, point_indices=dup,
                                    duplicate=True))
    if record.boxes is not None and len(record.boxes):
        b = record.boxes
        bad_box = ~np.isfinite(b).all(axis=1)
        with np.errstate(invalid="ignore"):
            bad_box |= (b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1])
        if bad_box.any():
            bad = np.flatnonzero(bad_box)
            problems.append(Problem(record.source, f"{len(bad)} box(es) are not finite or have x1 < x0 / y1 < y0, "
                                                   f"e.g. box index {bad[0]}: {b[bad[0]].tolist()}",
                                    record=name, point_indices=bad))
    if record.mask_path is not None:
        try:
            mh, mw = id_map_size(record.mask_path)
        except DataError as exc:
            problems.append(Problem(str(record.mask_path), str(exc).partition(": ")[2], record=name))
        else:
            if (mh, mw) != (h, w):
                problems.append(Problem(str(record.mask_path), f"instance map is {mw}x{mh} but the image is {w}x{h}",
                                        record=name))
    return problems


def apply_policy(records: list[Record], problems: list[Problem], policy: str, dataset: str = "",
                 setting: str = "on_bad_annotation") -> list[Record]:
    """Fail, skip or drop according to `policy`; returns the records to use. `setting` names the
    config key(s) the report's header gives `policy` for."""
    if policy not in POLICIES:
        raise ConfigError(f"key 'data.on_bad_annotation': expected one of {', '.join(POLICIES)}, got {policy!r}")
    if not problems:
        return records
    if policy == "fail":
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise DataError(f"{problems[0]}{more}; set data.on_bad_annotation=skip (or drop) to leave them out")
    by_name = {r.name: r for r in records}
    skipped: dict[str, list[Problem]] = {}
    dropped: dict[str, int] = {}
    fixable: dict[str, list[np.ndarray]] = {}
    for p in problems:
        if p.record is None or p.record not in by_name:
            continue
        if policy == "drop" and p.point_indices is not None:
            fixable.setdefault(p.record, []).append(p.point_indices)
        else:
            skipped.setdefault(p.record, []).append(p)
    for name, index_lists in fixable.items():
        if name in skipped:
            continue
        record = by_name[name]
        bad = np.unique(np.concatenate(index_lists))
        record.keep_points(np.setdiff1d(np.arange(len(record.points)), bad))
        dropped[name] = len(bad)
    kept = [r for r in records if r.name not in skipped]
    _report(problems, len(records), len(kept), dropped, policy, dataset, setting)
    return kept


def _report(problems: list[Problem], n_before: int, n_after: int, dropped: dict[str, int], policy: str,
            dataset: str, setting: str = "on_bad_annotation") -> None:
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return
    label = f" of {dataset}" if dataset else ""
    lines = [f"[crowdseg] {len(problems)} annotation problem(s){label} ({setting}={policy}): "
             f"kept {n_after} of {n_before} images"
             + (f", dropped {sum(dropped.values())} point(s) in {len(dropped)} image(s)" if dropped else "")]
    for p in problems[:MAX_REPORT_LINES]:
        action = "points dropped" if p.record in dropped else ("skipped" if p.record else "ignored")
        lines.append(f"  [{action}] {p}")
    if len(problems) > MAX_REPORT_LINES:
        lines.append(f"  ... and {len(problems) - MAX_REPORT_LINES} more")
    log.warning("\n".join(lines))


def validate(records: list[Record], problems: list[Problem], policy: str = "fail", outside_tolerance: float = 1.0,
             verify_images: bool = False, dataset: str = "", on_duplicate_points: str = "drop") -> list[Record]:
    """Check every record, then apply `policy` to the reader's and the checks' problems.

    Exact duplicate points (the same head annotated twice, as in ShanghaiTech's official ground truth)
    are dropped with a report when `on_duplicate_points` is "drop", follow `policy` when "fail", and
    are no problem at all when "keep" (the ground truth as published, for the test split)."""
    if on_duplicate_points not in DUPLICATE_POLICIES:
        raise ConfigError(f"key 'data.on_duplicate_points': expected one of {', '.join(DUPLICATE_POLICIES)}, "
                          f"got {on_duplicate_points!r}")
    problems = list(problems)
    for record in records:
        problems += check_record(record, outside_tolerance, verify_images)
    duplicates = [p for p in problems if p.duplicate]
    others = [p for p in problems if not p.duplicate]
    if on_duplicate_points == "fail" or not duplicates:
        return apply_policy(records, problems, policy, dataset)
    if on_duplicate_points == "keep":
        return apply_policy(records, others, policy, dataset)
    if policy == "drop":  # one pass: dropping points renumbers the others, so all indices go together
        setting = "on_bad_annotation=drop, on_duplicate_points" if others else "on_duplicate_points"
        return apply_policy(records, problems, "drop", dataset, setting)
    records = apply_policy(records, others, policy, dataset)
    kept = {r.name for r in records}
    return apply_policy(records, [p for p in duplicates if p.record in kept], "drop", dataset, "on_duplicate_points")
