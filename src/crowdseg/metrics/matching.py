"""One-to-one, maximum-size matching of predicted points to ground-truth heads within a radius.

A prediction p may match head j when ||p - g_j|| <= r_j (the head's own radius). Among all
one-to-one matchings the one with the most pairs is taken (the NWPU-Crowd protocol). Images
hold up to tens of thousands of heads, so no dense N x M matrix is built: a k-d tree over the
predictions yields the candidate edges of each head (a sparse bipartite graph) and scipy's
Hopcroft-Karp (`maximum_bipartite_matching`) matches on that graph. The size of a maximum
matching is unique, so TP/FP/FN equal those of the official dense implementation.

*Which* heads are matched is not unique, and per-level recall depends on it. `method="official"`
reproduces the official NWPU code's choice exactly: Kuhn's augmenting-path search, predictions in
file order, each trying heads in index order (here on the sparse graph, iteratively, with
visit stamps instead of clearing a visited list per prediction). It is fast on real predictions
but O(V * E) in the worst case; `"hopcroft-karp"` (the default) is O(E * sqrt(V)).
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


def official_order_matching(gt_index: np.ndarray, pred_index: np.ndarray, num_gt: int, num_pred: int) -> np.ndarray:
    """Maximum matching chosen exactly as the NWPU evaluation code chooses it (Kuhn's algorithm).

    For each prediction in index order, a depth-first search for an augmenting path tries the
    prediction's heads in increasing index. Same inputs and result as `maximum_matching`.
    """
    match = [-1] * num_gt
    if num_gt == 0 or num_pred == 0 or gt_index.size == 0:
        return np.asarray(match, dtype=np.int64)
    order = np.lexsort((gt_index, pred_index))
    adj = gt_index[order].tolist()
    start = np.concatenate([[0], np.cumsum(np.bincount(pred_index, minlength=num_pred))]).tolist()
    stamp = [-1] * num_gt
    for root in range(num_pred):
        if start[root] == start[root + 1]:
            continue
        # Iterative form of: dfs(u) = any(v unvisited and (match[v] free or dfs(match[v]))), then match[v] = u.
        stack_u, stack_pos, stack_v = [root], [start[root]], []
        while stack_u:
            u, pos = stack_u[-1], stack_pos[-1]
            end, descended = start[u + 1], False
            while pos < end:
                v = adj[pos]
                pos += 1
                if stamp[v] == root:
                    continue
                stamp[v] = root
                stack_pos[-1] = pos
                stack_v.append(v)
                if match[v] == -1:
                    for uu, vv in zip(stack_u, stack_v):
                        match[vv] = uu
                    stack_u = []
                    break
                stack_u.append(match[v])
                stack_pos.append(start[match[v]])
                descended = True
                break
            else:
                stack_u.pop()
                stack_pos.pop()
                if stack_v:
                    stack_v.pop()
                continue
            if not descended:
                break
    return np.asarray(match, dtype=np.int64)


MATCHING_METHODS = {"hopcroft-karp": maximum_matching, "official": official_order_matching}


def match_points(pred: Any, gt: Any, radii: Any, method: str = "hopcroft-karp") -> np.ndarray:
    """Match predictions to heads one-to-one, maximising the number of pairs.

    pred: (P, 2) xy; gt: (G, 2) xy; radii: (G,) radius of each head (a pair needs
    distance <= radius); method: "hopcroft-karp" or "official" (the NWPU code's tie-breaking).
    Returns (G,) int64: index of the prediction matched to each head, -1 for an unmatched head.
    """
    pred, gt = as_points(pred), as_points(gt)
    gt_index, pred_index, _ = candidate_edges(pred, gt, radii)
    return matching_function(method)(gt_index, pred_index, gt.shape[0], pred.shape[0])


def matching_function(method: str):
    """The matching function of a method name ("hopcroft-karp" or "official")."""
    try:
        return MATCHING_METHODS[method]
    except KeyError:
        raise ValueError(f"unknown matching method {method!r}; expected one of {sorted(MATCHING_METHODS)}") from None
