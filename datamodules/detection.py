"""`DetectionDataModule`: CrowdHuman boxes for training, CIS instance masks for evaluation.

CIS images are CrowdHuman *train* images (METHODS.md A3), so they are excluded from the training
set by file name (`crowdseg.methods.boxinst.build_datamodule`, `boxinst.eval_data`) and the
DataModule refuses an overlap.
"""
from __future__ import annotations

from typing import Optional

from torch.utils.data import Dataset

from crowdseg.errors import DataError
from datamodules.crowd import CrowdDataModule
from datamodules.semi import dataset_names


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

