"""One-to-one, maximum-size matching of predicted points to ground-truth heads within a radius.

A prediction p may match head j when ||p - g_j|| <= r_j (the head's own radius). Among all
one-to-one matchings the one with the most pairs is taken (the NWPU-Crowd protocol). Images
hold up to tens of thousands of heads, so no dense N x M matrix is built: a k-d tree over the
predictions yields the candidate edges of each head (a sparse bipartite graph) and scipy's
Hopcroft-Karp (`maximum_bipartite_matching`) matches on that graph. The size of a maximum
matching is unique, so TP/FP/FN equal those of the official dense implementation.
"""
from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import maximum_bipartite_matching
from scipy.spatial import cKDTree

from crowdseg.metrics._arrays import as_numpy, as_points

# The k-d tree query uses a slightly larger radius; the exact test `distance <= radius` (the
# official one) is applied afterwards, so floating-point ties at the boundary are decided exactly.
_QUERY_SLACK = 1e-6


def candidate_edges(pred: Any, gt: Any, radii: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sparse candidate pairs (head j, prediction i) with their distances.

    pred: (P, 2) xy; gt: (G, 2) xy; radii: (G,) matching radius of each head.
    Returns (gt_index (E,), pred_index (E,), distance (E,)) for all pairs with
    distance <= radii[gt_index] (E edges, no dense matrix).
    """
    pred, gt = as_points(pred), as_points(gt)
    radii = as_numpy(radii, np.float64).reshape(-1)
    if radii.shape[0] != gt.shape[0]:
        raise ValueError(f"{radii.shape[0]} radii for {gt.shape[0]} ground-truth points")
    empty = np.zeros(0, dtype=np.int64)
    if pred.shape[0] == 0 or gt.shape[0] == 0:
        return empty, empty, np.zeros(0, dtype=np.float64)
    tree = cKDTree(pred)
    query_radii = np.maximum(radii, 0.0) * (1 + _QUERY_SLACK) + _QUERY_SLACK
    neighbours = tree.query_ball_point(gt, r=query_radii, return_sorted=False)
    lengths = np.fromiter((len(n) for n in neighbours), dtype=np.int64, count=len(neighbours))
    total = int(lengths.sum())
    gt_index = np.repeat(np.arange(gt.shape[0], dtype=np.int64), lengths)
    pred_index = np.fromiter(itertools.chain.from_iterable(neighbours), dtype=np.int64, count=total)
    diff = pred[pred_index] - gt[gt_index]
    distance = np.sqrt(diff[:, 0] * diff[:, 0] + diff[:, 1] * diff[:, 1])
    keep = distance <= radii[gt_index]
    return gt_index[keep], pred_index[keep], distance[keep]


def maximum_matching(gt_index: np.ndarray, pred_index: np.ndarray, num_gt: int, num_pred: int) -> np.ndarray:
    """Maximum-cardinality bipartite matching on a sparse edge list (Hopcroft-Karp).

    gt_index, pred_index: (E,) the allowed pairs. Returns (num_gt,) int64: the prediction matched
    to each head, or -1.
    """
    if num_gt == 0 or num_pred == 0 or gt_index.size == 0:
        return np.full(num_gt, -1, dtype=np.int64)
    graph = sp.csr_matrix((np.ones(gt_index.size, dtype=np.int8), (gt_index, pred_index)),
                          shape=(num_gt, num_pred))
    return maximum_bipartite_matching(graph, perm_type="column").astype(np.int64)


def match_points(pred: Any, gt: Any, radii: Any) -> np.ndarray:
    """Match predictions to heads one-to-one, maximising the number of pairs.

    pred: (P, 2) xy; gt: (G, 2) xy; radii: (G,) radius of each head (a pair needs
    distance <= radius). Returns (G,) int64: index of the prediction matched to each head, -1
    for an unmatched head.
    """
    pred, gt = as_points(pred), as_points(gt)
    gt_index, pred_index, _ = candidate_edges(pred, gt, radii)
    return maximum_matching(gt_index, pred_index, gt.shape[0], pred.shape[0])
