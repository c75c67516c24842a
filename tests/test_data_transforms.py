"""Transforms move image, points, boxes and instance masks together."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from data_fixtures import SHARED_DATA, disc_map
from datamodules.dataset import build_dataset
from datamodules.loading import resize_raw, to_sample
from datamodules.synthetic import SyntheticCrowd, SyntheticSpec
from datamodules.transforms import (EvalTransform, TrainTransform, TwoViewTransform, collate_two_views, keep_points,
                                    scale_crop)
from datamodules.types import point_pixels


def raw_sample(h=10, w=10, points=((0.0, 0.0), (3.0, 1.0), (8.0, 7.0)), radius=1):
    image = np.arange(h * w * 3, dtype=np.uint8).reshape(h, w, 3)
    pts = np.array(points, np.float32)
    return {"image": image, "points": pts, "boxes": np.concatenate([pts - 1, pts + 1], 1),
            "instance_map": disc_map(h, w, [tuple(p) for p in points], radius), "point_attrs": {"a": np.arange(len(pts))},
            "ignore_boxes": np.array([[0, 0, 2, 2], [8, 8, 9, 9]], np.float32), "meta": {"name": "x", "scale": 1.0}}


def ids_at_points(sample):
    h, w = sample["image"].shape[-2:]
    rows, cols = point_pixels(sample["points"], h, w)
    return sample["instance_map"][rows, cols]


def test_scale_crop_hand_computed():
    out = scale_crop(raw_sample(), scale=2.0, top=2, left=4, height=6, width=6)
    # point (3, 1) -> (2 * 3.5 - 0.5 - 4, 2 * 1.5 - 0.5 - 2) = (2.5, 0.5); (0, 0) and (8, 7) leave the crop
    np.testing.assert_allclose(out["points"], [[2.5, 0.5]])
    np.testing.assert_allclose(out["boxes"], [[0.5, 0, 4.5, 2.5]])  # (2,0)-(4,2) -> (0.5,-1.5)-(4.5,2.5), clipped
    assert out["point_attrs"]["a"].tolist() == [1]
    # the old id 2 is now id 1; pixels of the dropped instances are background
    assert set(np.unique(out["instance_map"])) <= {0, 1} and out["instance_map"][0, 2] == 1
    assert out["image"].shape == (6, 6, 3)
    # ignore region (0,0)-(2,2) -> (-3.5,-1.5)-(0.5,2.5) overlaps the window; (8,8)-(9,9) does not
    np.testing.assert_allclose(out["ignore_boxes"], [[0, 0, 0.5, 2.5]])
    assert out["meta"]["scale"] == 2.0


def test_scale_one_crop_is_an_exact_slice():
    raw = raw_sample(16, 20)
    out = scale_crop(raw, 1.0, top=3, left=5, height=8, width=9)
    assert np.array_equal(out["image"], raw["image"][3:11, 5:14])
    assert np.array_equal(out["instance_map"] > 0, raw["instance_map"][3:11, 5:14] > 0)
    kept = raw["points"][(raw["points"][:, 0] >= 4.5) & (raw["points"][:, 0] < 13.5)
                         & (raw["points"][:, 1] >= 2.5) & (raw["points"][:, 1] < 10.5)]
    np.testing.assert_allclose(out["points"], kept - [5, 3])


def test_keep_points_renumbers_ids():
    raw = raw_sample(points=((1.0, 1.0), (5.0, 5.0), (8.0, 2.0)))
    out = keep_points(raw, np.array([False, True, True]))
    assert out["instance_map"][5, 5] == 1 and out["instance_map"][2, 8] == 2 and out["instance_map"][1, 1] == 0
    assert len(out["boxes"]) == 2 and out["point_attrs"]["a"].tolist() == [1, 2]


def test_flip_moves_points_boxes_and_masks_consistently():
    t = TrainTransform(crop_size=None, scale_range=(1.0, 1.0), hflip=1.0, seed=0)
    raw = raw_sample(points=((1.0, 2.0), (6.0, 5.0)))
    out = t(raw)
    np.testing.assert_allclose(out["points"].numpy(), [[8, 2], [3, 5]])
    np.testing.assert_allclose(out["boxes"].numpy(), [[7, 1, 9, 3], [2, 4, 4, 6]])
    assert torch.equal(out["image"], to_sample({**raw, "image": raw["image"][:, ::-1]})["image"])
    assert ids_at_points(out).tolist() == [1, 2]


def test_one_pixel_instances_survive_downscaling():
    """Nearest-neighbour resampling alone would lose most 1-pixel instances at scale 0.5."""
    centres = [(float(x), float(y)) for y in range(1, 40, 3) for x in range(1, 40, 3)]
    raw = {"image": np.zeros((40, 40, 3), np.uint8), "points": np.array(centres, np.float32), "boxes": None,
           "instance_map": disc_map(40, 40, centres, 0), "point_attrs": {}, "meta": {"scale": 1.0}}
    assert (raw["instance_map"] > 0).sum() == len(centres)
    out = resize_raw(raw, max_size=20)
    assert ids_at_points(to_sample(out)).tolist() == list(range(1, len(centres) + 1))
    crop = scale_crop(raw, 0.6, 0, 0, 24, 24)
    assert ids_at_points(to_sample(crop)).tolist() == list(range(1, len(crop["points"]) + 1))


def test_resize_to_max_size_keeps_points_in_their_masks():
    centres = [(10.0, 10.0), (37.0, 21.0), (60.0, 44.0), (75.0, 8.0)]
    raw = {"image": np.zeros((50, 80, 3), np.uint8), "points": np.array(centres, np.float32), "boxes": None,
           "instance_map": disc_map(50, 80, centres, 5), "point_attrs": {}, "meta": {"scale": 1.0}}
    out = resize_raw(raw, max_size=40)
    assert out["image"].shape == (25, 40, 3) and out["meta"]["scale"] == 0.5
    np.testing.assert_allclose(out["points"][0], [(10.5) * 0.5 - 0.5, 10.5 * 0.5 - 0.5])
    assert ids_at_points(to_sample(out)).tolist() == [1, 2, 3, 4]


@pytest.mark.parametrize("photometric", ["none", "strong"])
def test_random_training_crops_keep_points_in_image_and_masks(photometric):
    ds = SyntheticCrowd(12, "train", SyntheticSpec(height=120, width=160, max_people=50))
    total = 0
    for i in range(3 * len(ds)):  # three random crops of every image
        torch.manual_seed(i)
        t = TrainTransform(crop_size=64, scale_range=(0.7, 1.3), photometric=photometric, cutout=True, seed=1)
        out = t(ds[i % len(ds)])
        h, w = out["image"].shape[-2:]
        assert h <= 64 and w <= 64 and 0 <= out["image"].min() and out["image"].max() <= 1
        pts = out["points"]
        assert ((pts >= -0.5) & (pts < torch.tensor([w - 0.5, h - 0.5]))).all()
        assert ids_at_points(out).tolist() == list(range(1, len(pts) + 1))
        assert out["instance_map"].max() <= len(pts)
        assert out["boxes"].shape == (len(pts), 4) and out["head_boxes"].shape == (len(pts), 4)
        total += len(pts)
    assert total > 20


def test_random_crops_of_real_shanghaitech_keep_points_inside():
    ds = build_dataset("sha", str(SHARED_DATA / "shanghaitech_A_samples"), "all", max_size=512,
                       transform=TrainTransform(crop_size=128, seed=4))
    for i in range(len(ds)):
        out = ds[i]
        assert out["image"].shape[-2:] == (128, 128)
        assert ((out["points"] >= -0.5) & (out["points"] < 127.5)).all()


def test_two_views_share_the_crop_and_differ_in_appearance():
    ds = SyntheticCrowd(4, "train", SyntheticSpec(height=96, width=96, max_people=30))
    for seed in range(30):  # tiny far-away heads: resampling must not lose a point's own pixel
        torch.manual_seed(seed)
        out = TwoViewTransform(crop_size=64, seed=2)(ds[seed % 4])
        assert ids_at_points(out).tolist() == list(range(1, len(out["points"]) + 1))
    t = TwoViewTransform(crop_size=64, seed=2)
    out = t(ds[0])
    assert out["image"].shape == out["image_strong"].shape == (3, 64, 64)
    assert out["cutout"].dtype == torch.bool and 0 < out["cutout"].sum() < 64 * 64
    assert (out["image_strong"][:, out["cutout"]] == 0).all()
    assert not torch.equal(out["image"], out["image_strong"])
    assert ids_at_points(out).tolist() == list(range(1, len(out["points"]) + 1))
    batch = collate_two_views([t(ds[i]) for i in range(4)])
    assert batch["image_strong"].shape == batch["image"].shape and batch["cutout"].shape == (4, 64, 64)


def test_eval_transform_pads_to_multiple_of_32():
    ds = SyntheticCrowd(1, "val", SyntheticSpec(height=70, width=100, max_people=10))
    sample = ds[0]
    out = EvalTransform()(sample)
    assert out["image"].shape == (3, 96, 128) and out["instance_map"].shape == (96, 128)
    assert out["meta"]["valid_size"] == (70, 100)
    assert torch.equal(out["image"][:, :70, :100], sample["image"]) and out["image"][:, 70:].abs().sum() == 0


def test_seeded_transform_repeats_and_workers_differ():
    ds = SyntheticCrowd(1, "train", SyntheticSpec(height=128, width=128, max_people=20))
    a = pickle.loads(pickle.dumps(TrainTransform(48, seed=7)))(ds[0])
    b = pickle.loads(pickle.dumps(TrainTransform(48, seed=7)))(ds[0])
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["points"], b["points"])

    class Same(torch.utils.data.Dataset):
        def __init__(self):
            self.t = TrainTransform(48, hflip=0.0)
            self.sample = ds[0]

        def __len__(self):
            return 2

        def __getitem__(self, i):
            return self.t(self.sample)["image"]

    torch.manual_seed(0)
    first, second = list(DataLoader(Same(), batch_size=1, num_workers=2))
    assert not torch.equal(first, second)  # each worker seeds its own generator
