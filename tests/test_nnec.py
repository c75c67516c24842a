"""NNEC radii and nearest neighbours on hand-made layouts (values computed by hand)."""
from __future__ import annotations

import numpy as np
import pytest

from crowdseg.dpmo.nnec import nearest_neighbour_distances, nearest_neighbours, nnec_radii

# p0 -- p1 are 5 apart (3-4-5 triangle); p2 is 8.0623 (= sqrt(65)) from p1 and 10 from p0.
LAYOUT = np.array([[0.0, 0.0], [3.0, 4.0], [10.0, 0.0]])


def test_radius_is_the_nearest_neighbour_distance():
    radii = nnec_radii(LAYOUT, (100, 100), radius_factor=1.0, r_min=0.0, r_max=100.0)
    np.testing.assert_allclose(radii, [5.0, 5.0, np.sqrt(65.0)])


def test_radius_factor_and_clamps():
    half = nnec_radii(LAYOUT, (100, 100), radius_factor=0.5, r_min=3.0, r_max=100.0)
    np.testing.assert_allclose(half, [3.0, 3.0, np.sqrt(65.0) / 2])   # 2.5 is clamped up to r_min
    capped = nnec_radii(LAYOUT, (100, 100), radius_factor=1.0, r_min=3.0, r_max=6.0)
    np.testing.assert_allclose(capped, [5.0, 5.0, 6.0])
    # default r_max = min(H, W) / 2: an image 8 pixels high caps everything at 4
    np.testing.assert_allclose(nnec_radii(LAYOUT, (8, 100)), [4.0, 4.0, 4.0])


def test_half_factor_gives_disjoint_circles():
    rng = np.random.default_rng(0)
    pts = rng.uniform(0, 200, (300, 2))
    radii = nnec_radii(pts, (200, 200), radius_factor=0.5, r_min=0.0)
    d = np.linalg.norm(pts[:, None] - pts[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    assert np.all(radii[:, None] + radii[None] <= d + 1e-9)
    full = nnec_radii(pts, (200, 200), radius_factor=1.0, r_min=0.0)
    # with factor 1 no other point lies strictly inside a circle, and its nearest one is on it
    assert np.all(d >= full[:, None] - 1e-9)
    np.testing.assert_allclose(d.min(1), full)


def test_lone_point_rule():
    one = np.array([[10.0, 20.0]])
    assert nnec_radii(one, (40, 80)).tolist() == [10.0]                       # min(H, W) / 4
    assert nnec_radii(one, (40, 80), radius_factor=0.5).tolist() == [10.0]    # not scaled by the factor
    assert nnec_radii(one, (40, 80), lone_radius=7.0).tolist() == [7.0]
    assert nnec_radii(one, (40, 80), lone_radius=50.0).tolist() == [20.0]    # still clamped to r_max
    assert nnec_radii(np.zeros((0, 2)), (40, 80)).shape == (0,)


def test_duplicate_points_get_r_min():
    pts = np.array([[5.0, 5.0], [5.0, 5.0], [20.0, 5.0]])
    np.testing.assert_allclose(nnec_radii(pts, (100, 100), r_min=3.0), [3.0, 3.0, 15.0])


def test_invalid_clamp_raises():
    with pytest.raises(ValueError):
        nnec_radii(LAYOUT, (100, 100), r_min=5.0, r_max=2.0)


def test_nearest_neighbour_distances():
    np.testing.assert_allclose(nearest_neighbour_distances(LAYOUT), [5.0, 5.0, np.sqrt(65.0)])
    assert np.isinf(nearest_neighbour_distances(np.array([[1.0, 1.0]]))).all()


def test_nearest_neighbours_order_and_padding():
    nb = nearest_neighbours(LAYOUT, 3)
    assert nb.tolist() == [[1, 2, -1], [0, 2, -1], [1, 0, -1]]   # only 2 others exist: padded with -1
    assert nearest_neighbours(LAYOUT, 1).tolist() == [[1], [0], [1]]
    assert nearest_neighbours(np.array([[0.0, 0.0]]), 2).tolist() == [[-1, -1]]


def test_nearest_neighbours_never_list_the_point_itself():
    pts = np.array([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [9.0, 0.0]])   # three duplicates
    nb = nearest_neighbours(pts, 2)
    for i, row in enumerate(nb):
        assert i not in row.tolist()
    assert set(nb[0].tolist()) == {1, 2}
    assert nb[3].tolist()[0] in (0, 1, 2)
