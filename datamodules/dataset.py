"""`CrowdDataset` (records -> contract samples) and `build_dataset(name, root, split, **options)`."""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable, Iterable

from torch.utils.data import Dataset

from crowdseg.errors import ConfigError, DataError
from datamodules.cache import PreprocessCache, cache_params
from datamodules.loading import RawSample, load_record, to_sample
from datamodules.readers import READERS
from datamodules.readers.common import Problem, Record
from datamodules.readers.idmaps import find_id_map, mask_stem
from datamodules.validation import apply_policy, validate

Transform = Callable[[RawSample], dict]


class CrowdDataset(Dataset):
    """Samples (datamodules/types.py) of validated records, decoded from the files or the cache.

    `transform` maps a raw sample (datamodules/loading.py) to a contract sample (e.g. the training
    crop of datamodules/transforms.py); without one the whole image is returned.
    """

    def __init__(self, records: list[Record], dataset: str, transform: Transform | None = None,
                 max_size: int | None = None, cache: PreprocessCache | None = None):
        self.records, self.dataset, self.transform = records, dataset, transform
        self.max_size, self.cache = max_size, cache

    def __len__(self) -> int:
        return len(self.records)

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.records]

    def point_counts(self) -> list[int]:
        """The annotated count of every whole image (no decoding, no augmentation)."""
        return [len(r.points) for r in self.records]

    def load_raw(self, index: int) -> RawSample:
        record = self.records[index]
        if self.cache is not None:
            return self.cache.load(record)
        return load_record(record, self.dataset, self.max_size)

    def __getitem__(self, index: int) -> dict:
        raw = self.load_raw(index)
        return self.transform(raw) if self.transform is not None else to_sample(raw)

    def subset(self, names: Iterable[str], transform: Transform | None | str = "same") -> "CrowdDataset":
        """The records named in `names` (in this dataset's order), optionally with another transform."""
        wanted = set(names)
        missing = wanted - set(self.names)
        if missing:
            raise DataError(f"{self.dataset}: {len(missing)} name(s) are not in this dataset, e.g. {sorted(missing)[0]!r}")
        return CrowdDataset([r for r in self.records if r.name in wanted], self.dataset,
                            self.transform if transform == "same" else transform, self.max_size, self.cache)


def list_names(name: str, root: str | None, split: str, **options: Any) -> list[str]:
    """The image names of a split as its reader lists them (nothing decoded or validated);
    `options` are those of `build_dataset` (only the reader's own are used)."""
    if name == "synthetic":
        return _synthetic(split, None, **options).names
    reader, reader_options = _reader(name, root, {k: v for k, v in options.items() if k not in BUILD_OPTIONS})
    records, _ = reader(root, split, **reader_options)
    return [r.name for r in records]


BUILD_OPTIONS = ("transform", "on_bad_annotation", "on_duplicate_points", "outside_tolerance", "verify_images",
                 "max_size", "cache_dir", "num_workers", "masks_dir", "names", "exclude_names", "progress")


def _reader(name: str, root: str | None, reader_options: dict[str, Any]):
    if name not in READERS:
        raise ConfigError(f"key 'data.name': unknown dataset {name!r}; known: synthetic, {', '.join(sorted(READERS))}")
    if root is None:
        raise ConfigError(f"key 'data.root': dataset {name!r} needs a root folder")
    if not Path(root).exists():
        raise DataError(f"{root}: dataset root of {name!r} not found")
    reader = READERS[name]
    accepted = set(inspect.signature(reader).parameters) - {"root", "split"}
    unknown = set(reader_options) - accepted
    if unknown:
        raise ConfigError(f"dataset {name!r}: unknown option(s) {sorted(unknown)}; the reader accepts {sorted(accepted)}")
    return reader, reader_options


def build_dataset(name: str, root: str | None, split: str, *, transform: Transform | None = None,
                  on_bad_annotation: str = "fail", on_duplicate_points: str = "drop", outside_tolerance: float = 1.0,
                  verify_images: bool = False,
                  max_size: int | None = None, cache_dir: str | None = None, num_workers: int = 0,
                  masks_dir: str | None = None, names: Iterable[str] | None = None,
                  exclude_names: Iterable[str] | None = None, progress: bool = True,
                  **reader_options: Any) -> Dataset:
    """The dataset `name` (a key of READERS, or "synthetic") read from `root`, split `split`.

    on_bad_annotation: fail | skip | drop, on_duplicate_points: drop | fail (datamodules/validation.py). max_size: resize so the long
    side is at most this. cache_dir: build / reuse the preprocessing cache there (with
    `num_workers` processes). masks_dir: instance-id maps named `<mask_stem(name)>.png|.npy`.
    names / exclude_names: keep only / leave out these image file names. reader_options go to
    the reader (e.g. `box_type` for CrowdHuman, `image_dir` for CIS and CrowdHuman).
    """
    if name == "synthetic":
        dataset = _synthetic(split, transform, **reader_options)
        return dataset if names is None else dataset.subset(names)
    reader, reader_options = _reader(name, root, reader_options)
    records, problems = reader(root, split, **reader_options)
    records = _select(records, names, exclude_names, name)
    if masks_dir is not None:
        problems += _attach_masks(records, Path(masks_dir))
    records = validate(records, problems, on_bad_annotation, outside_tolerance, verify_images, dataset=name,
                       on_duplicate_points=on_duplicate_points)
    cache = None
    if cache_dir is not None:
        options = {**reader_options, "on_bad_annotation": on_bad_annotation, "on_duplicate_points": on_duplicate_points,
                   "outside_tolerance": outside_tolerance,
                   "masks_dir": str(masks_dir) if masks_dir else None}
        cache = PreprocessCache(cache_dir, cache_params(name, root, split, max_size, options, records))
        failed = cache.build(records, num_workers=num_workers, progress=progress)
        if failed:
            bad = {p.record for p in failed}
            records = apply_policy(records, failed, "skip" if on_bad_annotation == "drop" else on_bad_annotation, name)
            records = [r for r in records if r.name not in bad]
    return CrowdDataset(records, name, transform, max_size, cache)


def _select(records: list[Record], names, exclude_names, dataset: str) -> list[Record]:
    if names is not None:
        wanted = set(names)
        missing = wanted - {r.name for r in records}
        if missing:
            raise DataError(f"{dataset}: {len(missing)} requested image(s) are not in the dataset "
                            f"(or were left out by the reader), e.g. {sorted(missing)[0]!r}")
        records = [r for r in records if r.name in wanted]
    if exclude_names is not None:
        excluded = set(exclude_names)
        records = [r for r in records if r.name not in excluded]
    return records


def _attach_masks(records: list[Record], masks_dir: Path) -> list[Problem]:
    if not masks_dir.is_dir():
        raise DataError(f"{masks_dir}: instance mask folder not found")
    problems = []
    for r in records:
        found = find_id_map(masks_dir, mask_stem(r.name))
        if found is None:
            problems.append(Problem(str(masks_dir / f"{mask_stem(r.name)}.png"),
                                    f"no instance map for image {r.name} (.png or .npy)", record=r.name))
        else:
            r.mask_path = found
    return problems


def _synthetic(split: str, transform, num_images: int = 16, **spec) -> Dataset:
    from datamodules.synthetic import SyntheticCrowd, SyntheticSpec

    try:
        return SyntheticCrowd(num_images, split, SyntheticSpec(**spec), transform=transform)
    except TypeError as exc:
        raise ConfigError(f"dataset 'synthetic': {exc}") from None
