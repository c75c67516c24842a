"""RPS rewards and point-to-instance matching on constructed masks."""
import numpy as np
import pytest
import torch

from crowdseg.rl.reward import (candidate_rewards, distance_penalty, mask_iou_with_instances,
                                match_points_to_instances)


def square(top: int, left: int, size: int = 4, shape=(8, 8)) -> torch.Tensor:
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[top:top + size, left:left + size] = True
    return mask


def two_instance_map() -> torch.Tensor:
    """8x8: instance 1 = 4x4 square at rows 0-3, cols 0-3; instance 2 = rows 4-7, cols 4-7."""
    return square(0, 0).long() + 2 * square(4, 4).long()


def test_mask_iou_of_full_image_masks():
    instance_map = two_instance_map()
    masks = torch.stack([square(0, 0), square(0, 2), square(4, 0), square(4, 4), square(0, 0)])
    ids = torch.tensor([1, 1, 1, 2, 0])
    iou = mask_iou_with_instances(masks, ids, instance_map)
    # identical; shifted by 2 columns (8 shared px, 24 in the union); disjoint; identical; no target
    assert torch.allclose(iou, torch.tensor([1.0, 1 / 3, 0.0, 1.0, 0.0]))


def test_mask_iou_of_cropped_windows_including_outside_pixels():
    instance_map = two_instance_map()
    window = torch.ones(1, 4, 4, dtype=torch.bool)
    shifted = mask_iou_with_instances(window, torch.tensor([1]), instance_map, offsets=torch.tensor([[2, 0]]))
    assert shifted.item() == pytest.approx(1 / 3)
    # a window hanging over the bottom-right corner: only its 2x2 in-image pixels count
    corner = mask_iou_with_instances(window, torch.tensor([2]), instance_map, offsets=torch.tensor([[6, 6]]))
    assert corner.item() == pytest.approx(4 / 16)
    # a small window inside the instance: the instance's pixels outside the window are in the union
    inner = mask_iou_with_instances(torch.ones(1, 2, 2, dtype=torch.bool), torch.tensor([1]), instance_map,
                                    offsets=torch.tensor([[1, 1]]))
    assert inner.item() == pytest.approx(4 / 16)


def test_mask_iou_vectorised_matches_a_per_mask_reference_in_any_chunking():
    generator = torch.Generator().manual_seed(0)
    instance_map = torch.randint(0, 4, (20, 24), generator=generator)
    masks = torch.rand(60, 9, 7, generator=generator) > 0.5
    offsets = torch.stack([torch.randint(-5, 22, (60,), generator=generator),
                           torch.randint(-5, 18, (60,), generator=generator)], dim=1)
    ids = torch.randint(0, 4, (60,), generator=generator)
    expected = []
    gt = instance_map.numpy()
    for mask, (x0, y0), k in zip(masks.numpy(), offsets.tolist(), ids.tolist()):
        full = np.zeros((20 + 40, 24 + 40), dtype=bool)          # a canvas with a 20 px margin
        full[20 + y0:20 + y0 + 9, 20 + x0:20 + x0 + 7] = mask
        pred = full[20:40, 20:44]
        target = gt == k
        union = (pred | target).sum()
        expected.append(0.0 if k == 0 or union == 0 else (pred & target).sum() / union)
    for chunk in (1, 7, 1000):
        iou = mask_iou_with_instances(masks, ids, instance_map, offsets, chunk_size=chunk)
        assert np.allclose(iou.numpy(), np.array(expected), atol=1e-6)


def test_candidate_rewards_unmatched_and_distance_penalty():
    instance_map = two_instance_map()
    masks = torch.stack([
        torch.stack([square(0, 0), square(0, 2), square(4, 0)]),   # point 0, matched to GT 0 (id 1)
        torch.stack([square(4, 4), square(4, 4), square(0, 0)]),   # point 1, unmatched
    ])
    matched = torch.tensor([0, -1])
    rewards = candidate_rewards(masks, matched, instance_map)
    assert torch.allclose(rewards, torch.tensor([[1.0, 1 / 3, 0.0], [0.0, 0.0, 0.0]]))
    rewards = candidate_rewards(masks, matched, instance_map, unmatched_reward=0.25)
    assert torch.allclose(rewards[1], torch.full((3,), 0.25))
    candidates = torch.tensor([[[1.5, 1.5], [3.5, 1.5], [1.5, 9.5]], [[0.0, 0.0]] * 3])
    gt_points = torch.tensor([[1.5, 1.5], [5.5, 5.5]])
    radii = torch.tensor([4.0, 4.0])
    penalty = distance_penalty(candidates, matched, gt_points, radii)
    assert torch.allclose(penalty, torch.tensor([[0.0, 0.5, 1.0], [0.0, 0.0, 0.0]]))
    rewards = candidate_rewards(masks, matched, instance_map, distance_weight=0.2, candidates=candidates,
                                gt_points=gt_points, radii=radii)
    # 1 - 0; 1/3 - 0.1; max(0 - 0.2, 0) -- always within [0, 1]
    assert torch.allclose(rewards[0], torch.tensor([1.0, 1 / 3 - 0.1, 0.0]))
    with pytest.raises(ValueError):
        candidate_rewards(masks, matched, instance_map, distance_weight=0.2)


def test_matching_by_mask_then_hungarian_within_radius():
    instance_map = torch.zeros(16, 16, dtype=torch.long)
    instance_map[0:3, 0:3] = 1        # GT 0 at (1, 1)
    instance_map[5:8, 5:8] = 2        # GT 1 at (6, 6); GT 2 at (12, 12) has lost its mask
    gt_points = torch.tensor([[1.0, 1.0], [6.0, 6.0], [12.0, 12.0]])
    points = torch.tensor([
        [6.0, 6.0],     # inside GT 1's mask
        [5.0, 7.0],     # inside GT 1's mask too: both keep GT 1
        [13.0, 12.0],   # background, 1 px from GT 2
        [12.0, 14.0],   # background, 2 px from GT 2: loses the one-to-one assignment
        [10.0, 1.0],    # background, 9 px from GT 0: beyond its radius
        [9.0, 6.0],     # background, 3 px from GT 1, which is already claimed by a mask
    ])
    radii = torch.tensor([3.0, 3.0, 3.0, 3.0, 3.0, 3.5])
    matched = match_points_to_instances(points, gt_points, radii, instance_map)
    assert matched.tolist() == [1, 1, 2, -1, -1, -1]
    wide = match_points_to_instances(points, gt_points, torch.full((6,), 10.0), instance_map)
    assert wide.tolist() == [1, 1, 2, -1, 0, -1]


def test_matching_without_masks_and_empty_inputs():
    gt_points = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    points = torch.tensor([[1.0, 0.0], [9.0, 0.0], [4.0, 0.0]])
    matched = match_points_to_instances(points, gt_points, torch.tensor([2.0, 2.0, 5.0]))
    assert matched.tolist() == [0, 1, -1]
    # alone, the middle point reaches GT 0 (4 px) within its radius 5, but not GT 1 (6 px)
    matched = match_points_to_instances(points[2:], gt_points, torch.tensor([5.0]))
    assert matched.tolist() == [0]
    assert match_points_to_instances(torch.zeros(0, 2), gt_points, torch.zeros(0)).shape == (0,)
    assert match_points_to_instances(points, torch.zeros(0, 2), torch.ones(3)).tolist() == [-1, -1, -1]
