import numpy as np
import torch

from datamodules.synthetic import SyntheticCrowd, SyntheticSpec, render_crowd
from datamodules.types import collate_samples, point_pixels


def test_same_seed_same_image_and_different_index_differs():
    spec = SyntheticSpec(height=96, width=128, seed=3)
    a, b = render_crowd(spec, "train", 5), render_crowd(spec, "train", 5)
    assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["points"], b["points"])
    c = render_crowd(spec, "train", 6)
    assert not np.array_equal(a["image"], c["image"])
    d = render_crowd(SyntheticSpec(height=96, width=128, seed=4), "train", 5)
    assert not np.array_equal(a["image"], d["image"])
    e = render_crowd(spec, "val", 5)
    assert not np.array_equal(a["image"], e["image"])


def test_labels_are_consistent():
    ds = SyntheticCrowd(12, "train", SyntheticSpec(height=128, width=160, min_people=3, max_people=300))
    counts = []
    for i in range(len(ds)):
        s = ds[i]
        img, pts, ids = s["image"], s["points"], s["instance_map"]
        h, w = ids.shape
        assert img.shape == (3, h, w) and img.dtype == torch.float32 and 0 <= img.min() and img.max() <= 1
        n = len(pts)
        counts.append(n)
        # instance ids are exactly 1..N, one per point
        assert set(torch.unique(ids).tolist()) - {0} == set(range(1, n + 1))
        # every point lies inside its own mask
        rows, cols = point_pixels(pts, h, w)
        assert torch.equal(ids[rows, cols], torch.arange(1, n + 1))
        # boxes contain their masks' pixels, heads are inside the image
        for k in range(n):
            ys, xs = torch.nonzero(ids == k + 1, as_tuple=True)
            x0, y0, x1, y1 = s["boxes"][k].tolist()
            assert x0 <= xs.min() and xs.max() <= x1 and y0 <= ys.min() and ys.max() <= y1
        assert ((pts >= 0) & (pts <= torch.tensor([w - 1, h - 1]))).all()
    assert min(counts) < 20 and max(counts) > 60  # sparse and dense scenes


def test_collate_pads_and_keeps_lists():
    ds = SyntheticCrowd(2, "train", SyntheticSpec(height=64, width=80))
    small = SyntheticCrowd(1, "val", SyntheticSpec(height=48, width=40))[0]
    batch = collate_samples([ds[0], small])
    assert batch["image"].shape == (2, 3, 64, 80)
    assert batch["image_size"].tolist() == [[64, 80], [48, 40]]
    assert batch["image"][1, :, 48:, :].abs().sum() == 0
    assert len(batch["points"]) == 2 and batch["points"][1].shape[1] == 2
    assert batch["instance_map"][1].shape == (48, 40)


def test_collate_keeps_per_point_keys_as_lists_even_with_equal_counts():
    a = {"image": torch.zeros(3, 4, 4), "points": torch.zeros(2, 2), "head_boxes": torch.zeros(2, 4),
         "cutout": torch.zeros(4, 4, dtype=torch.bool), "meta": {}}
    batch = collate_samples([a, dict(a)])
    assert isinstance(batch["head_boxes"], list) and len(batch["head_boxes"]) == 2
    assert batch["cutout"].shape == (2, 4, 4)
