"""Label-fraction splits: which training images are labeled at 5 / 10 / 40 % labels.

A split file lists one image file name per line, the format of published protocol lists (e.g.
XMask's `protocols/sha-5.txt`), so either drops in as `data.labeled_list` (a run's split is
planned by `crowdseg.data.plan_split`, which draws with `make_split` when no list is given). For
dataset D, fraction f and split seed s the files are `datamodules/splits/D/labeled_<f>_seed<s>.txt`
and `unlabeled_<f>_seed<s>.txt`.

Splits are drawn by ranking the training names by sha256("<seed>:<name>"): deterministic for a
split seed (and independent of the training seed, the input order and library versions), and
nested, since every fraction takes a prefix of the same ranking (5 % inside 10 % inside 40 %).
The labeled count is round(f / 100 * N), at least 1.

Official training lists the defaults are generated from:
- sha: ShanghaiTech part A train_data, IMG_1 .. IMG_300; shb: part B, IMG_1 .. IMG_400;
- qnrf: UCF-QNRF Train, img_0001 .. img_1201;
- nwpu: ids 0001 .. 3609 minus the 500 validation ids of the official localization ground truth
  (`val_gt_loc.txt`, gjy3035/NWPU-Crowd-Sample-Code-for-Localization); test is 3610 .. 5109.
  Both lists are shipped in `splits/nwpu/` (train.txt, val.txt).
- jhu: the official train id list is not published apart from the dataset itself, so no default
  split is shipped: run `crowdseg splits jhu --root <jhu_crowd_v2.0>` on the downloaded data.

CLI: `crowdseg splits <dataset> --fractions 5 10 40 --seed S [--root DIR] [--out DIR]`, writing into
`splits/<dataset>` under the current directory unless `--out` says otherwise.
"""
from __future__ import annotations

import argparse
import hashlib
import math
from pathlib import Path
from typing import Iterable

from crowdseg.errors import DataError
from crowdseg.io import write_text_atomic
from datamodules.readers.common import natural_key

SPLITS_DIR = Path(__file__).resolve().parent / "splits"
DEFAULT_FRACTIONS = (5.0, 10.0, 40.0)
NWPU_TEST_IDS = range(3610, 5110)


def fraction_tag(fraction: float, digits: int | None = None) -> str:
    """A label percentage as file and run names write it: 5.0 -> "5", 2.5 -> "2.5"; rounded to
    `digits` significant digits when given (run names take 3: 100 / 9 % is "11.1")."""
    value = float(f"{fraction:.{digits}g}") if digits else float(fraction)
    return str(int(value)) if value.is_integer() else str(value)


def split_file_names(fraction: float, seed: int) -> tuple[str, str]:
    tag = fraction_tag(fraction)
    return f"labeled_{tag}_seed{seed}.txt", f"unlabeled_{tag}_seed{seed}.txt"


def ranking(names: Iterable[str], seed: int) -> list[str]:
    """`names` in the split order of `seed` (a prefix of it is the labeled set)."""
    unique = sorted(set(names), key=natural_key)
    return sorted(unique, key=lambda n: hashlib.sha256(f"{seed}:{n}".encode()).hexdigest())


def labeled_count(fraction: float, total: int) -> int:
    if not 0 < fraction <= 100:
        raise DataError(f"label fraction must be in (0, 100] percent, got {fraction}")
    return min(total, max(1, math.floor(fraction / 100 * total + 0.5)))


def make_split(names: Iterable[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(labeled, unlabeled) name lists, each in natural order."""
    order = ranking(names, seed)
    n = labeled_count(fraction, len(order))
    return sorted(order[:n], key=natural_key), sorted(order[n:], key=natural_key)


# ----------------------------------------------------------------------------------------------
# official training lists

def official_train_names(dataset: str, splits_dir: Path = SPLITS_DIR) -> list[str]:
    """The official training image names of `dataset` as the readers name them."""
    if dataset == "sha":
        return [f"IMG_{i}.jpg" for i in range(1, 301)]
    if dataset == "shb":
        return [f"IMG_{i}.jpg" for i in range(1, 401)]
    if dataset == "qnrf":
        return [f"img_{i:04d}.jpg" for i in range(1, 1202)]
    if dataset == "nwpu":
        return read_name_list(splits_dir / "nwpu" / "train.txt")
    raise DataError(f"no official training list is known for {dataset!r}; pass --root with the dataset "
                    f"(the names of its training images are used)")


def nwpu_official_lists(val_gt_file: str | Path) -> tuple[list[str], list[str]]:
    """(train, val) names of NWPU-Crowd from the official validation localization file."""
    path = Path(val_gt_file)
    val_ids = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        tokens = line.split()
        if tokens:
            if not tokens[0].isdigit():
                raise DataError(f"{path}:{lineno}: expected an image id, got {tokens[0]!r}")
            val_ids.append(int(tokens[0]))
    if len(val_ids) != 500 or len(set(val_ids)) != 500:
        raise DataError(f"{path}: expected the 500 distinct NWPU-Crowd validation ids, found {len(set(val_ids))}")
    val = set(val_ids)
    train = [f"{i:04d}.jpg" for i in range(1, NWPU_TEST_IDS.start) if i not in val]
    return train, [f"{i:04d}.jpg" for i in sorted(val)]


def train_names_from_root(dataset: str, root: str | Path) -> list[str]:
    """Names of the training images found under `root` by the dataset's reader."""
    from datamodules.readers import READERS

    if dataset not in READERS:
        raise DataError(f"unknown dataset {dataset!r}; known: {', '.join(sorted(READERS))}")
    split = "all" if dataset in ("ucf_cc_50", "cclabeler", "cis", "coco") else "train"
    records, _ = READERS[dataset](root, split)
    if not records:
        raise DataError(f"{root}: no training images found for {dataset!r}")
    return [r.name for r in records]


# ----------------------------------------------------------------------------------------------
# reading split files and published protocol lists

def read_name_lines(path: str | Path) -> list[tuple[str, int]]:
    """(name, line number) of the names listed one per line in `path` (blank lines and `#` comments
    ignored, paths reduced to file names), as published lists are written: a blank first line or no
    final newline is fine; a name listed twice fails, naming both lines."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: split file not found") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read the split file ({err.strerror})") from None
    found, seen = [], {}
    for lineno, line in enumerate(lines, start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        if len(text.split()) != 1:
            raise DataError(f"{path}:{lineno}: expected one image file name per line, got {line.strip()!r}")
        name = text.replace("\\", "/").rsplit("/", 1)[-1]
        if name in seen:
            raise DataError(f"{path}:{lineno}: {name} is listed twice (first on line {seen[name]})")
        seen[name] = lineno
        found.append((name, lineno))
    return found


def read_name_list(path: str | Path) -> list[str]:
    """The names of `read_name_lines(path)`."""
    return [name for name, _ in read_name_lines(path)]


def carve(names: Iterable[str], fraction: float, total: int, seed: int) -> list[str]:
    """round(`fraction` % of `total`) names (at least 1) drawn from `names` for a val set, by a
    sha256 ranking of its own ("val:<seed>:<name>"), so it does not move with the label split seed."""
    names = sorted(set(names), key=natural_key)
    n = min(len(names), max(1, math.floor(fraction / 100 * total + 0.5)))
    order = sorted(names, key=lambda name: hashlib.sha256(f"val:{seed}:{name}".encode()).hexdigest())
    return sorted(order[:n], key=natural_key)


# ----------------------------------------------------------------------------------------------
# writing

def write_splits(out_dir: str | Path, names: Iterable[str], fractions: Iterable[float], seed: int) -> list[Path]:
    """Write labeled/unlabeled files for every fraction; returns the paths written."""
    names = list(names)
    if not names:
        raise DataError("cannot split an empty list of training images")
    written = []
    for f in fractions:
        labeled, unlabeled = make_split(names, f, seed)
        lab_name, unl_name = split_file_names(f, seed)
        for file, part in ((lab_name, labeled), (unl_name, unlabeled)):
            path = Path(out_dir) / file
            write_text_atomic(path, "".join(f"{n}\n" for n in part))
            written.append(path)
    return written


def main(argv: list[str]) -> int:
    """`crowdseg splits <dataset> --fractions 5 10 40 --seed S [--root DIR] [--out DIR]`; a bad input
    raises `CrowdsegError`, which `crowdseg.cli` reports."""
    parser = argparse.ArgumentParser(prog="crowdseg splits", description="Write label-fraction split files.")
    parser.add_argument("dataset", help="dataset name (sha, shb, qnrf, nwpu, jhu, ...)")
    parser.add_argument("--fractions", type=float, nargs="+", default=list(DEFAULT_FRACTIONS),
                        help="labeled percentages (default: 5 10 40)")
    parser.add_argument("--seed", type=int, nargs="+", default=[0], help="split seed(s) (default: 0)")
    parser.add_argument("--root", default=None, help="dataset root: split its training images instead of the official list")
    parser.add_argument("--out", default=None,
                        help="output folder (default: splits/<dataset> under the current directory)")
    args = parser.parse_args(argv)
    names = train_names_from_root(args.dataset, args.root) if args.root else official_train_names(args.dataset)
    out = Path(args.out) if args.out else Path("splits") / args.dataset
    for seed in args.seed:
        write_splits(out, names, args.fractions, seed)
        for f in args.fractions:
            n = labeled_count(f, len(names))
            print(f"{args.dataset} {fraction_tag(f)}% seed {seed}: {n} labeled / {len(names) - n} unlabeled "
                  f"-> {out / split_file_names(f, seed)[0]}")
    return 0
