"""The datasets and DataModules of a run, from its config (the wiring layer over `datamodules`).

Which images play which role is decided on names, before anything is decoded (`plan_split`):
1. the reader's training split, narrowed by `data.train_list`;
2. the val set: `data.val_fraction` percent of those images carved out with `data.val_seed` (or the
   training images named in `data.val_list`), else the reader's own `data.val_split`;
3. the labeled images among the rest: `data.labeled_list` (a published protocol list) or
   `data.label_fraction` percent drawn with `data.split_seed` (nested: 5 % in 10 % in 40 %); the
   others are the unlabeled pool. Val images are in neither pool.
A fully supervised method trains on the labeled images only; a semi-supervised one adds the rest.
"""
from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset

from crowdseg.errors import DataError
from datamodules.crowd import CrowdDataModule
from datamodules.dataset import build_dataset as _build_dataset
from datamodules.dataset import list_names
from datamodules.readers.common import natural_key
from datamodules.splits import carve, make_split, read_name_lines
from datamodules.transforms import TrainTransform


@dataclass(frozen=True)
class LabelSplit:
    """Names of the training images by role (see the module docstring)."""
    labeled: tuple[str, ...]
    unlabeled: tuple[str, ...]
    val: Optional[tuple[str, ...]]  # carved from the training split; None: the val split is separate
    source: str                     # how the labeled images were chosen, for people
    labeled_sha256: str             # of the labeled list file, or of `labeled_text()`

    @property
    def fraction(self) -> float:
        return 100.0 * len(self.labeled) / max(len(self.labeled) + len(self.unlabeled), 1)

    def labeled_text(self) -> str:
        return "".join(f"{n}\n" for n in self.labeled)

    def used_by(self, datamodule: Any) -> "LabelSplit":
        """This split narrowed to the images the built datasets really hold: an image left out when its
        dataset was built (`data.on_bad_annotation=skip`, e.g. a truncated file) is in no count or list.
        The unlabeled pool is narrowed only where a dataset of it was built (semi-supervised methods)."""
        def kept(names: Optional[tuple[str, ...]], dataset: Any) -> Optional[tuple[str, ...]]:
            held = getattr(dataset, "names", None)
            if names is None or held is None:
                return names
            held = set(held)
            return tuple(n for n in names if n in held)

        datasets = getattr(datamodule, "datasets", {})
        used = replace(self, labeled=kept(self.labeled, datasets.get("train")),
                       unlabeled=kept(self.unlabeled, getattr(datamodule, "unlabeled", None)),
                       val=kept(self.val, datasets.get("val")))
        if used.labeled != self.labeled and not self.source.startswith("list "):  # a list file keeps its own hash
            used = replace(used, labeled_sha256=hashlib.sha256(used.labeled_text().encode()).hexdigest())
        return used


def train_transform(cfg: DictConfig) -> TrainTransform:
    data = cfg.data
    return TrainTransform(crop_size=data.crop_size, scale_range=tuple(data.scale_range), hflip=data.hflip,
                          photometric=data.photometric, seed=cfg.seed)


def dataset_options(cfg: DictConfig, split: str) -> dict[str, Any]:
    """Keyword arguments of `datamodules.dataset.build_dataset` for `split`."""
    data = cfg.data
    if data.name == "synthetic":
        syn = data.synthetic
        sizes = {"train": syn.num_train, "val": syn.num_val, "test": syn.num_test}
        return {"num_images": sizes.get(split, syn.num_test), "height": syn.height, "width": syn.width,
                "min_people": syn.min_people, "max_people": syn.max_people, "seed": syn.seed}
    return {"on_bad_annotation": data.on_bad_annotation, "on_duplicate_points": data.on_duplicate_points,
            "max_size": data.max_size, "cache_dir": data.cache_dir, "num_workers": data.num_workers,
            "masks_dir": masks_dir_of(cfg, split), **OmegaConf.to_container(data.reader_options, resolve=True),
            **({"sources": OmegaConf.to_container(data.sources, resolve=True)} if data.name == "union" else {})}


def masks_dir_of(cfg: DictConfig, split: str) -> str | None:
    """`data.masks_dir` for `split`: a "{split}" in the path is replaced by the split's name, so train
    and test images with the same file stem (ShanghaiTech's IMG_k) never share a mask folder."""
    return cfg.data.masks_dir.replace("{split}", split) if cfg.data.masks_dir else None


def build_dataset(cfg: DictConfig, split: str, train: bool = False, names=None, transform=None,
                  with_masks: bool = True) -> Dataset:
    """The dataset of `split` ("train", "val", "test" or a dataset-specific split name), whole images,
    optionally only the images in `names`; `train=True` adds the training augmentations, `transform`
    another one (e.g. the two views of unlabeled images); `with_masks=False` attaches no instance maps
    (unlabeled images need none)."""
    options = dataset_options(cfg, split)
    if not with_masks:
        options.pop("masks_dir", None)
    return _build_dataset(cfg.data.name, cfg.data.root, split, names=names,
                          transform=transform if transform is not None else train_transform(cfg) if train else None,
                          **options)


def _listed(cfg: DictConfig, key: str, available: list[str], split: str) -> list[str]:
    """The names of the list file `data.<key>`, each one an image of `available`."""
    path = Path(cfg.data[key])
    known = set(available)
    names = []
    for name, lineno in read_name_lines(path):
        if name not in known:
            raise DataError(f"{path}:{lineno}: {name} (data.{key}) is not an image of the {cfg.data.name!r} "
                            f"{split} split" + (f" at {cfg.data.root}" if cfg.data.root else ""))
        names.append(name)
    if not names:
        raise DataError(f"{path}: data.{key} lists no image")
    return names


def split_names(cfg: DictConfig, split: str, list_key: Optional[str] = None) -> list[str]:
    """Names of a reader split, narrowed by the list file `data.<list_key>` when it is set."""
    data = cfg.data
    names = list_names(data.name, data.root, split, **dataset_options(cfg, split))
    if list_key and data[list_key]:
        wanted = set(_listed(cfg, list_key, names, split))
        names = [n for n in names if n in wanted]
    return names


def plan_split(cfg: DictConfig) -> LabelSplit:
    """Decide, on names only, which training images are val, labeled and unlabeled."""
    data = cfg.data
    if data.name != "synthetic" and data.root is not None and not Path(data.root).exists():
        raise DataError(f"key 'data.root': {data.root}: dataset root of {data.name!r} not found")
    everything = split_names(cfg, data.train_split)
    names = split_names(cfg, data.train_split, "train_list") if data.train_list else everything
    protected: set[str] = set()
    if data.labeled_list:
        protected = set(_listed(cfg, "labeled_list", names, data.train_split))
    val: Optional[list[str]] = None
    if data.val_list and data.val_split == data.train_split:
        val = _listed(cfg, "val_list", everything, data.train_split)
    elif data.val_fraction > 0:
        # a published labeled list stays whole: the val images come from the other images
        val = carve([n for n in names if n not in protected], data.val_fraction, len(names), data.val_seed)
    if val is not None:
        clash = protected & set(val)
        if clash:
            raise DataError(f"{data.labeled_list}: {sorted(clash, key=natural_key)[0]} is also a val image "
                            f"(data.val_list); an image is val or training, not both")
    pool = [n for n in names if val is None or n not in set(val)]
    if not pool:
        raise DataError(f"the {data.name!r} {data.train_split} split has no training image left after the val carve")
    if data.labeled_list:
        path = Path(data.labeled_list)
        labeled = sorted(protected, key=natural_key)
        source = f"list {path}"
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
    else:
        labeled, _ = make_split(pool, data.label_fraction, data.split_seed) if data.label_fraction < 100 else (pool, [])
        labeled = sorted(labeled, key=natural_key)
        source = (f"{data.label_fraction:g} % of {len(pool)} training images, split seed {data.split_seed}"
                  if data.label_fraction < 100 else f"all {len(pool)} training images")
        sha = hashlib.sha256("".join(f"{n}\n" for n in labeled).encode()).hexdigest()
    chosen = set(labeled)
    unlabeled = [n for n in pool if n not in chosen]
    return LabelSplit(tuple(labeled), tuple(unlabeled), tuple(sorted(val, key=natural_key)) if val is not None else None,
                      source, sha)


def with_label_record(cfg: DictConfig, split: LabelSplit, val_images: int) -> DictConfig:
    """A copy of `cfg` whose `labels` section records what the run really uses."""
    record = {"labeled_images": len(split.labeled), "unlabeled_images": len(split.unlabeled),
              "val_images": val_images, "fraction": round(split.fraction, 4), "source": split.source,
              "labeled_sha256": split.labeled_sha256}
    if cfg.data.name == "union":
        record["sources"] = source_counts(split)
    return OmegaConf.merge(cfg, {"labels": record})


def source_counts(split: LabelSplit) -> dict[str, dict[str, int]]:
    """Images of each source of a union (names `<tag>/<name>`) by role: {tag: {"labeled", "unlabeled", "val"}}."""
    counts: dict[str, dict[str, int]] = {}
    for role, names in (("labeled", split.labeled), ("unlabeled", split.unlabeled), ("val", split.val or ())):
        for name in names:
            tag = name.split("/", 1)[0]
            counts.setdefault(tag, {"labeled": 0, "unlabeled": 0, "val": 0})[role] += 1
    return counts


def write_split_files(run_dir: Path, split: LabelSplit) -> list[Path]:
    """`<run_dir>/splits/{labeled,unlabeled,val}.txt`: the run's images by role, one name per line."""
    from crowdseg.io import write_text_atomic

    parts = {"labeled": split.labeled, "unlabeled": split.unlabeled, "val": split.val}
    written = []
    for role, names in parts.items():
        if names is not None:
            path = run_dir / "splits" / f"{role}.txt"
            write_text_atomic(path, "".join(f"{n}\n" for n in names))
            written.append(path)
    return written


def build_eval_datasets(cfg: DictConfig, split: LabelSplit) -> dict[str, Any]:
    """The val dataset and a factory of the test dataset (whole images) of a run: the test split is
    read only when a command uses it, so training needs no test split on disk."""
    data = cfg.data
    if split.val is not None:
        val = build_dataset(cfg, data.train_split, names=split.val)
    else:
        val = build_dataset(cfg, data.val_split, names=split_names(cfg, data.val_split, "val_list") if data.val_list else None)
    return {"val": val, "test": functools.partial(build_test_dataset, cfg)}


def build_test_dataset(cfg: DictConfig) -> Dataset:
    """The test split with its ground truth as published: exact duplicate points are kept whatever
    `data.on_duplicate_points` says (the official evaluation counts them; training drops them)."""
    cfg = with_published_points(cfg)
    names = split_names(cfg, cfg.data.test_split, "test_list") if cfg.data.test_list else None
    return build_dataset(cfg, cfg.data.test_split, names=names)


def with_published_points(cfg: DictConfig) -> DictConfig:
    """A copy of `cfg` that keeps exact duplicate points (`data.on_duplicate_points=keep`), for the test split."""
    return OmegaConf.merge(cfg, {"data": {"on_duplicate_points": "keep"}})


def build_datamodule(cfg: DictConfig, split: Optional[LabelSplit] = None) -> CrowdDataModule:
    """The fully supervised DataModule: trains on the labeled images only (the supervised baseline
    at label fractions below 100 %). `split`: the run's label split (planned here when not given)."""
    data = cfg.data
    split = split or plan_split(cfg)
    evals = build_eval_datasets(cfg, split)
    datamodule = CrowdDataModule(
        train=build_dataset(cfg, data.train_split, train=True, names=split.labeled),
        val=evals["val"], test=evals["test"], predict=evals["test"],
        batch_size=data.batch_size, eval_batch_size=data.eval_batch_size, num_workers=data.num_workers)
    return datamodule


__all__ = ["LabelSplit", "plan_split", "build_datamodule", "build_dataset", "build_eval_datasets",
           "with_label_record", "write_split_files", "split_names", "train_transform", "dataset_options"]
