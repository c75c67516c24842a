"""Online pseudo instance masks (crowdseg/xmask/pseudo_masks.py) on constructed embeddings."""
import math

import torch

from crowdseg.xmask.discs import logit, nn_radii
from crowdseg.xmask.pseudo_masks import (PseudoMaskSettings, candidate_points, confident_instances,
                                         pseudo_instance_map, pseudo_instances)


def _blobs(H=40, W=40):
    """Three people as three embedding clusters (unit vectors along axes 0, 1, 2) on background (axis 3)."""
    emb = torch.zeros(4, H, W)
    emb[3] = 1.0
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    centres = torch.tensor([[8.0, 10.0], [20.0, 12.0], [30.0, 30.0]])
    truth = torch.zeros(H, W, dtype=torch.long)
    for k, (cx, cy) in enumerate(centres):
        blob = (xs - cx) ** 2 + (ys - cy) ** 2 <= 4.5 ** 2
        emb[:, blob] = 0.0
        emb[k, blob] = 1.0
        truth[blob] = k + 1
    return emb, centres, truth


def _check_guarantees(m, points, radii, kept=None):
    H, W = m.shape
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    kept = range(len(points)) if kept is None else kept
    for k in range(len(points)):
        mine = m == k + 1
        if k not in kept:
            assert not mine.any()
            continue
        cx, cy = points[k]
        # inside its circle
        assert (((xs[mine] - cx) ** 2 + (ys[mine] - cy) ** 2) <= radii[k] ** 2 + 1e-6).all()
        # keeps its point
        assert m[int(round(cy.item())), int(round(cx.item()))] == k + 1
    # ids are only those of points (disjointness holds by construction of an id map)
    assert set(torch.unique(m).tolist()) <= set(range(len(points) + 1))


def test_energy_gate_recovers_the_constructed_instances():
    emb, points, truth = _blobs()
    settings = PseudoMaskSettings(energy_threshold=0.8, lambda_geo=0.6, kernel_size=1)
    m = pseudo_instance_map(emb, points, settings=settings)
    radii = nn_radii(points, (40, 40))
    _check_guarantees(m, points, radii)
    # with a clean embedding, each instance is its blob cut by its disc (geometry term < 0.8 there)
    for k in range(3):
        assert ((m == k + 1) <= (truth == k + 1)).all()  # never leaks onto background or another person
        assert (m == k + 1).sum() >= 0.8 * (truth == k + 1).sum()


def test_overlapping_discs_go_to_the_lowest_energy_and_stay_disjoint():
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(8, 30, 30), dim=0)
    points = torch.rand(25, 2) * 29
    settings = PseudoMaskSettings(energy_threshold=5.0, lambda_geo=0.1)  # accept almost every disc pixel
    m = pseudo_instance_map(emb, points, settings=settings)
    _check_guarantees(m, points, nn_radii(points, (30, 30)))


def test_density_gate_whole_disc_for_unsure_points_and_skip_below_p_low():
    emb, points, truth = _blobs()
    z = torch.tensor([logit(0.3), logit(0.95), logit(0.05)])  # whole disc / energy gate / skipped
    settings = PseudoMaskSettings(kernel_size=1)
    m = pseudo_instance_map(emb, points, z, settings, density_gate=True)
    radii = nn_radii(points, (40, 40))
    _check_guarantees(m, points, radii, kept=[0, 1])
    ys, xs = torch.meshgrid(torch.arange(40), torch.arange(40), indexing="ij")
    disc0 = (xs - 8.0) ** 2 + (ys - 10.0) ** 2 <= radii[0] ** 2
    # point 0 covers background of its disc too (no energy gate), except pixels person 1 wins
    assert (m == 1).sum() > (truth == 1).sum()
    assert ((m == 1) | (m == 2))[disc0].all()


def test_candidates_and_confident_instances():
    logits = torch.full((4, 4), -5.0)
    logits[1, 2] = 3.0   # confident
    logits[3, 0] = 0.0   # candidate only (p = 0.5)
    points, values, confident = candidate_points(logits, stride=4)
    assert points.tolist() == [[9.5, 5.5], [1.5, 13.5]]
    assert confident.tolist() == [True, False]
    m = torch.zeros(16, 16, dtype=torch.long)
    m[4:8, 8:12] = 1
    m[12:, :4] = 2
    assert confident_instances(points, confident, m, 2).tolist() == [True, False]


def test_pseudo_instances_from_teacher_outputs_drop_padding():
    logits = torch.full((1, 8, 8), -5.0)
    logits[0, 1, 1] = 4.0
    logits[0, 7, 7] = 4.0  # centre (29.5, 29.5): outside a 24 x 24 image
    emb = torch.nn.functional.normalize(torch.randn(16, 8, 8), dim=0)
    out = pseudo_instances(logits, emb, (24, 24))
    assert out.points.shape == (1, 2) and out.instance_map.shape == (24, 24)
    assert out.instance_map[6, 6] == 1


def test_vectorised_matches_a_per_point_reference():
    """Same result as a straightforward per-point loop with the same rules (lowest energy wins)."""
    torch.manual_seed(1)
    H, W = 24, 28
    emb = torch.nn.functional.normalize(torch.randn(6, H, W), dim=0)
    points = torch.rand(12, 2) * torch.tensor([W - 1.0, H - 1.0])
    s = PseudoMaskSettings(energy_threshold=1.2, lambda_geo=0.5, kernel_size=1)
    got = pseudo_instance_map(emb, points, settings=s)
    radii = nn_radii(points, (H, W))
    ys, xs = torch.meshgrid(torch.arange(H).float(), torch.arange(W).float(), indexing="ij")
    best = torch.full((H, W), math.inf)
    ref = torch.zeros(H, W, dtype=torch.long)
    for k, (cx, cy) in enumerate(points):
        c = emb[:, int(round(cy.item())), int(round(cx.item()))]
        sq = (xs - cx) ** 2 + (ys - cy) ** 2
        energy = torch.sqrt(((emb - c[:, None, None]) ** 2).sum(0) + 1e-12) + s.lambda_geo * sq / (radii[k] + 1e-6) ** 2
        claim = (sq <= radii[k] ** 2) & (energy < s.energy_threshold) & (energy <= best)
        best = torch.where(claim, energy, best)
        ref[claim] = k + 1
    for k, (cx, cy) in enumerate(points):
        ref[int(round(cy.item())), int(round(cx.item()))] = k + 1
    assert (got == ref).float().mean() > 0.995  # exact up to float ties
