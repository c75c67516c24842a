"""`DetectionDataModule`: CrowdHuman boxes for training, CIS instance masks for evaluation.

CIS images are CrowdHuman *train* images (METHODS.md A3), so they are excluded from the training
set by file name (`build_detection_datamodule`) and the DataModule refuses an overlap.
"""
from __future__ import annotations

from typing import Optional

from torch.utils.data import Dataset

from crowdseg.errors import DataError
from datamodules.crowd import CrowdDataModule
from datamodules.dataset import build_dataset
from datamodules.semi import dataset_names
from datamodules.transforms import EvalTransform, TrainTransform


class DetectionDataModule(CrowdDataModule):
    """Box-supervised training set and mask-annotated evaluation sets with disjoint images."""

    def __init__(self, train: Dataset, val: Dataset, test: Optional[Dataset] = None, batch_size: int = 8,
                 eval_batch_size: int = 1, num_workers: int = 0):
        super().__init__(train=train, val=val, test=test if test is not None else val, predict=None,
                         batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers)
        train_names = dataset_names(train)
        for split, ds in (("val", val), ("test", test)):
            names = dataset_names(ds) if ds is not None else None
            if train_names is not None and names is not None:
                shared = set(train_names) & set(names)
                if shared:
                    raise DataError(f"{len(shared)} {split} image(s) are also in the training set, e.g. "
                                    f"{sorted(shared)[0]}; exclude them from training")


def build_detection_datamodule(crowdhuman_root: str, cis_root: str, image_dir: Optional[str] = None,
                               box_type: str = "full", max_size: Optional[int] = 1333,
                               scale_range: tuple[float, float] = (0.8, 1.2), crop_size: Optional[int] = None,
                               batch_size: int = 8, eval_batch_size: int = 1, num_workers: int = 0,
                               on_bad_annotation: str = "fail", cache_dir: Optional[str] = None) -> DetectionDataModule:
    """CrowdHuman `train` (minus the CIS images) for training, CIS for val and test.

    image_dir: the CrowdHuman `Images` folder (default `<crowdhuman_root>/Images`), which also
    holds the CIS images.
    """
    cis = build_dataset("cis", cis_root, "all", transform=EvalTransform(), image_dir=image_dir or f"{crowdhuman_root}/Images",
                        max_size=max_size, on_bad_annotation=on_bad_annotation, cache_dir=cache_dir, num_workers=num_workers)
    train = build_dataset("crowdhuman", crowdhuman_root, "train", box_type=box_type, image_dir=image_dir,
                          exclude_names=cis.names, max_size=max_size, on_bad_annotation=on_bad_annotation,
                          cache_dir=cache_dir, num_workers=num_workers,
                          transform=TrainTransform(crop_size, scale_range, hflip=0.5))
    return DetectionDataModule(train, cis, cis, batch_size, eval_batch_size, num_workers)
