"""NWPU-protocol localization: sparse maximum matching, hand-computed cases, real NWPU files, eval-loc."""
import functools
import itertools
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.optimize import linear_sum_assignment
from scipy.sparse.csgraph import maximum_bipartite_matching
from scipy.spatial import distance_matrix

from crowdseg.metrics import eval_loc
from crowdseg.metrics.localization import (LocalizationCounts, levels_from_boxes, localization_counts,
                                           localization_summary, radii_from_boxes)
from crowdseg.metrics.matching import match_points
from crowdseg.metrics.nwpu import read_gt_file, read_pred_file

NWPU = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "nwpu_crowd_val_localization"
GT_FILE = NWPU / "val_gt_loc.txt"
PRED_FILES = ["Raz_loc_val_0.5.txt", "TinyFaces_loc_0.8_0.3.txt", "VGG+GPR_val_k15.txt",
              "fasterRCNN_val_0.8_0.3.txt"]


@functools.lru_cache(maxsize=None)
def file_report(name):
    return eval_loc.evaluate_localization_files(GT_FILE, NWPU / name)


def tp_of(pred, gt, radii):
    return int((match_points(pred, gt, radii) >= 0).sum())


# ---------------------------------------------------------------- hand-computed cases

def test_empty_predictions_are_all_false_negatives():
    gt = np.array([[0.0, 0.0], [10.0, 0.0], [20.0, 5.0]])
    c = localization_counts(np.zeros((0, 2)), gt, np.full((3, 2), 4.0), levels=[0, 1, 1])
    assert c.tp.tolist() == [0, 0] and c.fp.tolist() == [0, 0] and c.fn.tolist() == [3, 3]
    assert c.fn_level[0].tolist() == [1, 2, 0, 0, 0, 0]
    s = localization_summary(c)["sigma_l"]
    assert (s["precision"], s["recall"], s["f1"]) == (0.0, 0.0, 0.0)


def test_empty_ground_truth_makes_every_prediction_a_false_positive():
    c = localization_counts(np.array([[1.0, 1.0], [5.0, 5.0]]), np.zeros((0, 2)), np.zeros((0, 2)))
    assert c.tp.tolist() == [0, 0] and c.fp.tolist() == [2, 2] and c.fn.tolist() == [0, 0]
    c = localization_counts(np.zeros((0, 2)), np.zeros((0, 2)), np.zeros((0, 2)))
    assert c.tp.sum() == c.fp.sum() == c.fn.sum() == 0


def test_distance_equal_to_the_radius_matches():
    gt = np.array([[0.0, 0.0]])
    assert tp_of(np.array([[3.0, 4.0]]), gt, [5.0]) == 1          # exactly 5 px: a tie counts
    assert tp_of(np.array([[3.0, 4.0 + 1e-9]]), gt, [5.0]) == 0   # just outside
    assert tp_of(np.array([[0.0, 0.0]]), gt, [0.0]) == 1           # zero radius, same point


def test_prediction_within_two_radii_gives_one_match():
    gt = np.array([[0.0, 0.0], [10.0, 0.0]])
    c = localization_counts(np.array([[5.0, 0.0]]), gt, np.array([[6.0, 6.0], [6.0, 6.0]]))
    assert c.tp.tolist() == [1, 1] and c.fp.tolist() == [0, 0] and c.fn.tolist() == [1, 1]


def test_matching_is_maximum_not_greedy():
    # p0 is nearest to A, but only p0 can reach B: the maximum matching pairs p1-A and p0-B.
    gt = np.array([[0.0, 0.0], [6.0, 0.0]])
    pred = np.array([[2.0, 0.0], [-3.0, 0.0]])
    match = match_points(pred, gt, [5.0, 5.0])
    assert match.tolist() == [1, 0]


def test_radius_belongs_to_the_head():
    gt = np.array([[0.0, 0.0], [10.0, 0.0]])
    pred = np.array([[5.0, 0.0]])
    assert match_points(pred, gt, [2.0, 10.0]).tolist() == [-1, 0]


def test_sigma_s_and_sigma_l_score_separately_with_levels():
    gt = np.array([[0.0, 0.0], [100.0, 0.0]])
    radii = np.array([[2.0, 8.0], [2.0, 8.0]])
    pred = np.array([[1.0, 0.0], [105.0, 0.0]])  # 1 px from head 0, 5 px from head 1
    c = localization_counts(pred, gt, radii, levels=[2, 4])
    assert c.tp.tolist() == [1, 2] and c.fp.tolist() == [1, 0] and c.fn.tolist() == [1, 0]
    assert c.tp_level.tolist() == [[0, 0, 1, 0, 0, 0], [0, 0, 1, 0, 1, 0]]
    assert c.fn_level.tolist() == [[0, 0, 0, 0, 1, 0], [0] * 6]
    s = localization_summary(c)
    assert s["sigma_s"]["precision"] == 0.5 and s["sigma_s"]["recall"] == 0.5 and s["sigma_s"]["f1"] == 0.5
    assert s["sigma_l"]["f1"] == 1.0
    # per-level recall as the official code: TP_k / (TP_k + FN_k), 0 for empty levels, plain mean of 6
    assert s["sigma_s"]["recall_per_level"] == [0, 0, 1.0, 0, 0.0, 0]
    assert s["sigma_s"]["recall_level_mean"] == pytest.approx(1 / 6)
    assert s["sigma_l"]["recall_level_mean"] == pytest.approx(2 / 6)


def test_radii_and_levels_from_boxes():
    boxes = np.array([[0, 0, 6, 8], [10, 10, 13, 13], [0, 0, 400, 300]], dtype=float)
    np.testing.assert_allclose(radii_from_boxes(boxes), [[3.0, 5.0], [1.5, np.hypot(3, 3) / 2], [150.0, 250.0]])
    # areas 48, 9, 120000 -> levels 1, 0, 5; bounds are half-open [10, 100) etc.
    assert levels_from_boxes(boxes).tolist() == [1, 0, 5]
    assert levels_from_boxes(np.array([[0, 0, 10, 1], [0, 0, 10, 10]], dtype=float)).tolist() == [1, 2]


def test_counts_add_up():
    a = LocalizationCounts.zeros()
    a.tp[:] = [1, 2]
    b = a + a
    assert b.tp.tolist() == [2, 4] and a.tp.tolist() == [1, 2]


# ---------------------------------------------------------------- agreement with brute force

def brute_force_max_matching(allowed: np.ndarray) -> int:
    """Largest matching by trying every injection of the smaller side (tiny inputs only)."""
    g, p = allowed.shape
    if g == 0 or p == 0:
        return 0
    if g > p:
        allowed, g, p = allowed.T, p, g
    best = 0
    for k in range(g, 0, -1):
        for rows in itertools.combinations(range(g), k):
            for cols in itertools.permutations(range(p), k):
                if all(allowed[r, c] for r, c in zip(rows, cols)):
                    return k
    return best


def assert_valid_matching(match, pred, gt, radii):
    used = match[match >= 0]
    assert len(set(used.tolist())) == used.size  # one-to-one
    for j in np.flatnonzero(match >= 0):
        assert np.linalg.norm(pred[match[j]] - gt[j]) <= radii[j]


@pytest.mark.parametrize("seed", range(150))
def test_sparse_matching_equals_exhaustive_search_on_tiny_sets(seed):
    rng = np.random.default_rng(seed)
    g, p = rng.integers(0, 6, size=2)
    gt = rng.integers(0, 12, size=(g, 2)).astype(float)   # integer grid: many exact ties
    pred = rng.integers(0, 12, size=(p, 2)).astype(float)
    radii = rng.integers(0, 6, size=g).astype(float)
    match = match_points(pred, gt, radii)
    assert_valid_matching(match, pred, gt, radii)
    allowed = distance_matrix(gt, pred) <= radii[:, None] if g and p else np.zeros((g, p), bool)
    assert int((match >= 0).sum()) == brute_force_max_matching(allowed)


@pytest.mark.parametrize("seed", range(40))
def test_sparse_matching_equals_dense_assignment_on_random_crowds(seed):
    rng = np.random.default_rng(1000 + seed)
    g, p = rng.integers(50, 400, size=2)
    gt = rng.uniform(0, 200, size=(g, 2))
    pred = gt[rng.integers(0, g, size=p)] + rng.normal(0, 4, size=(p, 2))  # clustered, many conflicts
    radii = rng.uniform(1, 12, size=g)
    match = match_points(pred, gt, radii)
    assert_valid_matching(match, pred, gt, radii)
    allowed = distance_matrix(gt, pred) <= radii[:, None]
    rows, cols = linear_sum_assignment(allowed, maximize=True)
    assert int((match >= 0).sum()) == int(allowed[rows, cols].sum())


def reference_kuhn(allowed: np.ndarray) -> np.ndarray:
    """The official NWPU tie-breaking on a dense (P, G) boolean matrix: recursive DFS per prediction,
    heads tried in index order, visited list cleared for each prediction. Returns (G,) matched pred or -1."""
    num_pred, num_gt = allowed.shape
    match = [-1] * num_gt
    neighbours = [np.flatnonzero(row).tolist() for row in allowed]

    def dfs(u, visited):
        for v in neighbours[u]:
            if visited[v]:
                continue
            visited[v] = True
            if match[v] == -1 or dfs(match[v], visited):
                match[v] = u
                return True
        return False

    for u in range(num_pred):
        dfs(u, [False] * num_gt)
    return np.array(match, dtype=np.int64)


@pytest.mark.parametrize("seed", range(60))
def test_official_order_matching_equals_the_reference_dfs(seed):
    rng = np.random.default_rng(500 + seed)
    g, p = rng.integers(0, 60, size=2)
    gt = rng.integers(0, 40, size=(g, 2)).astype(float)
    pred = rng.integers(0, 40, size=(p, 2)).astype(float)
    radii = rng.integers(0, 9, size=g).astype(float)
    official = match_points(pred, gt, radii, method="official")
    allowed = distance_matrix(pred, gt) <= radii[None, :] if g and p else np.zeros((p, g), bool)
    assert official.tolist() == reference_kuhn(allowed).tolist()
    assert (official >= 0).sum() == (match_points(pred, gt, radii) >= 0).sum()


def test_unknown_matching_method_is_rejected():
    with pytest.raises(ValueError, match="unknown matching method 'greedy'"):
        match_points(np.zeros((1, 2)), np.zeros((1, 2)), [1.0], method="greedy")


# ---------------------------------------------------------------- real NWPU files

@pytest.fixture(scope="module")
def nwpu_gt():
    return read_gt_file(GT_FILE)


def test_nwpu_ground_truth_parses(nwpu_gt):
    assert len(nwpu_gt) == 500
    assert sum(h.count for h in nwpu_gt.values()) == 196238
    assert all((h.radii[:, 0] <= h.radii[:, 1]).all() for h in nwpu_gt.values())
    assert set(np.concatenate([h.levels for h in nwpu_gt.values()]).tolist()) <= set(range(6))
    first = nwpu_gt[3110]
    assert first.count == 240
    assert first.points[0].tolist() == [851, 1304] and first.radii[0].tolist() == [15, 23]
    assert first.levels[0] == 3


def test_sparse_equals_dense_on_real_nwpu_images(nwpu_gt):
    pred = read_pred_file(NWPU / "TinyFaces_loc_0.8_0.3.txt")
    ids = [i for i in nwpu_gt if 0 < nwpu_gt[i].count <= 400 and pred[i].shape[0] > 0][:25]
    assert len(ids) == 25
    for i in ids:
        heads = nwpu_gt[i]
        for t in range(2):
            allowed = distance_matrix(pred[i], heads.points) <= heads.radii[None, :, t]
            dense = maximum_bipartite_matching(sp.csr_matrix(allowed), perm_type="column")
            sparse = match_points(pred[i], heads.points, heads.radii[:, t])
            assert int((sparse >= 0).sum()) == int((dense >= 0).sum())
            # the official tie-breaking picks the very same heads as the official dense DFS
            official = match_points(pred[i], heads.points, heads.radii[:, t], method="official")
            assert official.tolist() == reference_kuhn(allowed).tolist()


@pytest.mark.parametrize("name", PRED_FILES)
def test_nwpu_prediction_files_give_consistent_numbers(nwpu_gt, name):
    report = file_report(name)
    pred = read_pred_file(NWPU / name)
    assert report["images"] == 500 and report["images_without_prediction"] == 0
    assert report["pred_points"] == sum(p.shape[0] for p in pred.values())
    for key in ("sigma_s", "sigma_l"):
        r = report[key]
        assert r["tp"] + r["fn"] == 196238
        assert r["tp"] + r["fp"] == report["pred_points"]
        assert r["precision"] == pytest.approx(r["tp"] / (r["tp"] + r["fp"]))
        assert 0 <= r["f1"] <= 1
    assert report["sigma_s"]["tp"] <= report["sigma_l"]["tp"]  # sigma_s <= sigma_l for every head
    diffs = np.array([pred[i].shape[0] - h.count for i, h in nwpu_gt.items()], dtype=float)
    assert report["mae"] == pytest.approx(np.abs(diffs).mean())
    assert report["rmse"] == pytest.approx(np.sqrt((diffs ** 2).mean())) == report["mse"]


def test_raz_loc_matches_the_published_validation_numbers():
    # NWPU-Crowd localization README, validation set: RAZ_loc F1 62.5, Pre 69.2, Rec 56.9 (sigma_l)
    s = file_report("Raz_loc_val_0.5.txt")["sigma_l"]
    # we get 62.49 / 69.29 / 56.90: the README truncates to one decimal
    assert 100 * s["f1"] == pytest.approx(62.5, abs=0.1)
    assert 100 * s["precision"] == pytest.approx(69.2, abs=0.1)
    assert 100 * s["recall"] == pytest.approx(56.9, abs=0.1)


def test_localization_metric_class_equals_file_evaluation(nwpu_gt):
    from crowdseg.metrics.torch_metrics import LocalizationMetrics

    pred = read_pred_file(NWPU / "VGG+GPR_val_k15.txt")
    ids = list(nwpu_gt)[:60]
    metric = LocalizationMetrics(fixed_radii=None)
    for lo in range(0, 60, 16):
        batch = ids[lo:lo + 16]
        metric.update([pred[i] for i in batch], [nwpu_gt[i].points for i in batch],
                      radii=[nwpu_gt[i].radii for i in batch], levels=[nwpu_gt[i].levels for i in batch])
    got = {k: float(v) for k, v in metric.compute().items()}
    want = LocalizationCounts.zeros()
    for i in ids:
        want = want + localization_counts(pred[i], nwpu_gt[i].points, nwpu_gt[i].radii, nwpu_gt[i].levels)
    assert got["sigma_l_tp"] == want.tp[1] and got["sigma_s_fn"] == want.fn[0]
    assert got["sigma_l_f1"] == pytest.approx(localization_summary(want)["sigma_l"]["f1"])
    assert got["sigma_s_recall_level3"] == pytest.approx(localization_summary(want)["sigma_s"]["recall_per_level"][3])


def test_localization_metric_boxes_and_fixed_radii():
    from crowdseg.metrics.torch_metrics import LocalizationMetrics

    gt = np.array([[0.0, 0.0], [50.0, 50.0]])
    pred = np.array([[6.0, 0.0], [50.0, 53.0]])  # 6 px and 3 px away
    fixed = LocalizationMetrics()  # 4 and 8 px
    fixed.update([pred], [gt])
    out = fixed.compute()
    assert float(out["sigma_s_tp"]) == 1 and float(out["sigma_l_tp"]) == 2
    assert float(out["sigma_s_recall_level_mean"]) == 0.0  # no boxes: levels unknown
    boxed = LocalizationMetrics()
    # boxes 20 x 20 (sigma 10 / 14.1, area 400: level 2) and 2 x 2 (sigma 1 / 1.41, area 4: level 0)
    boxes = np.array([[-10, -10, 10, 10], [49, 49, 51, 51]], dtype=float)
    boxed.update([pred], [gt], boxes=[boxes])
    out = boxed.compute()
    assert float(out["sigma_s_tp"]) == 1 and float(out["sigma_l_tp"]) == 1
    assert float(out["sigma_s_recall_level2"]) == 1.0 and float(out["sigma_s_recall_level0"]) == 0.0
