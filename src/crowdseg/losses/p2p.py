"""P2PNet one-to-one matching and loss (METHODS.md C2), with the regression term applied.

Pure functions on tensors; `P2PLoss` only binds the coefficients.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from crowdseg.choices import CLS_LOSSES, MATCH_ON


def unweighted_threshold(eos_coef: float) -> float:
    """The score threshold that keeps exactly the points whose person probability p exceeds 1/2 under the
    weighted cross-entropy (background weight w = eos_coef, person 1): 1 / (1 + w).

    The expected loss -[p log q + w (1 - p) log(1 - q)] is minimised at q = p / (p + w (1 - p)), an odds
    ratio q / (1 - q) = (1 / w) p / (1 - p); q = 1 / (1 + w) exactly where p = 1/2. P2PNet's 0.5 with w = 0.5
    keeps points with p > 1/3, so a calibrating classifier over-counts (docs/p2p_real_data.md)."""
    if not eos_coef > 0:
        raise ValueError(f"eos_coef must be > 0, got {eos_coef}")
    return 1.0 / (1.0 + eos_coef)


@torch.no_grad()
def hungarian_match(pred_points: torch.Tensor, pred_person_prob: torch.Tensor, gt_points: torch.Tensor,
                    cost_point: float = 0.05, cost_class: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One-to-one assignment minimising cost_point * ||p_hat - p|| - cost_class * P(person).

    pred_points (M, 2), pred_person_prob (M,), gt_points (N, 2) -> (pred_idx (K,), gt_idx (K,)) long,
    K = min(M, N), sorted by gt index.
    """
    if len(gt_points) == 0 or len(pred_points) == 0:
        empty = torch.zeros(0, dtype=torch.long, device=pred_points.device)
        return empty, empty
    cost = cost_point * torch.cdist(pred_points.float(), gt_points.float()) - cost_class * pred_person_prob[:, None]
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    order = cols.argsort()
    device = pred_points.device
    return (torch.as_tensor(rows[order], dtype=torch.long, device=device),
            torch.as_tensor(cols[order], dtype=torch.long, device=device))




def focal_classification(logits: torch.Tensor, target: torch.Tensor, eos_coef: float, gamma: float,
                         num_positive: int) -> torch.Tensor:
    """Softmax focal loss (Lin et al. 2017) over proposals, normalised by the number of positives.

    logits (K, 2), target (K,) long in {0, 1}. Per proposal w_t (1 - p_t)^gamma (-log p_t) with
    w = eos_coef for background, 1 for person; the sum is divided by max(num_positive, 1) (RetinaNet),
    so the many easy background anchors of a sparse crowd neither dominate nor dilute the loss.
    """
    log_p = F.log_softmax(logits, -1).gather(1, target[:, None])[:, 0]
    weight = torch.where(target == 1, 1.0, eos_coef).to(log_p)
    loss = weight * (1.0 - log_p.exp()).pow(gamma) * (-log_p)
    return loss.sum() / max(num_positive, 1)


def p2p_loss(logits: torch.Tensor, points: torch.Tensor, gt_points: list[torch.Tensor],
             matches: list[tuple[torch.Tensor, torch.Tensor]], eos_coef: float = 0.5,
             point_loss_coef: float = 2e-4, cls_loss: str = "ce", focal_gamma: float = 2.0
             ) -> dict[str, torch.Tensor]:
    """Classification + point regression loss of a batch.

    logits (B, M, 2), points (B, M, 2), gt_points [ (N_b, 2) ], matches [(pred_idx, gt_idx)].
    - ``cls``: with cls_loss "ce" (P2PNet) the cross-entropy over all proposals, class weights
      (eos_coef, 1), weighted mean; with "focal" `focal_classification` (same class weights);
    - ``point``: sum over matched pairs of squared distance / number of GT points in the batch;
    - ``loss`` = cls + point_loss_coef * point.
    """
    if cls_loss not in CLS_LOSSES:
        raise ValueError(f"cls_loss must be one of {CLS_LOSSES}, got {cls_loss!r}")
    b, m, _ = logits.shape
    target = torch.zeros(b, m, dtype=torch.long, device=logits.device)
    for i, (pred_idx, _) in enumerate(matches):
        target[i, pred_idx] = 1
    if cls_loss == "focal":
        num_positive = sum(len(p) for p, _ in matches)
        cls = focal_classification(logits.reshape(-1, 2), target.reshape(-1), eos_coef, focal_gamma, num_positive)
    else:
        weight = torch.tensor([eos_coef, 1.0], device=logits.device, dtype=logits.dtype)
        cls = F.cross_entropy(logits.reshape(-1, 2), target.reshape(-1), weight=weight)
    num_gt = max(sum(len(g) for g in gt_points), 1)
    sq = [((points[i, p] - gt_points[i][g].to(points)) ** 2).sum() for i, (p, g) in enumerate(matches)]
    point = torch.stack(sq).sum() / num_gt if sq else points.sum() * 0
    return {"loss": cls + point_loss_coef * point, "cls": cls, "point": point}


class P2PLoss(nn.Module):
    """Match each image's predictions to its GT points, then `p2p_loss`.

    The defaults are P2PNet's (METHODS.md C2, with the regression term applied); `cls_loss="focal"`
    with `focal_gamma` replaces the weighted cross-entropy (see `p2p_loss`).

    match_on: the point whose distance to a GT point enters the matching cost: "predicted" (P2PNet:
    anchor + regression) or "anchors" (the fixed anchor point; the regression still moves the matched
    prediction onto its GT point). Matching on predicted points feeds the regression back into the
    classification targets: once the regression has learned to move every anchor near a head onto
    it, which of those near-identical predictions is matched is decided by small score and distance
    differences, and the person score is split between them. Matching on anchors keeps the
    classification target a fixed function of the image (the anchor nearest each head).
    """

    def __init__(self, cost_class: float = 1.0, cost_point: float = 0.05, eos_coef: float = 0.5,
                 point_loss_coef: float = 2e-4, cls_loss: str = "ce", focal_gamma: float = 2.0,
                 match_on: str = "predicted"):
        super().__init__()
        if cls_loss not in CLS_LOSSES:
            raise ValueError(f"cls_loss must be one of {CLS_LOSSES}, got {cls_loss!r}")
        if match_on not in MATCH_ON:
            raise ValueError(f"match_on must be one of {MATCH_ON}, got {match_on!r}")
        self.cost_class, self.cost_point = cost_class, cost_point
        self.eos_coef, self.point_loss_coef = eos_coef, point_loss_coef
        self.cls_loss, self.focal_gamma, self.match_on = cls_loss, focal_gamma, match_on

    def forward(self, outputs: dict[str, torch.Tensor], gt_points: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        prob = outputs["logits"].detach().softmax(-1)[..., 1]
        where = outputs["anchors"][None].expand_as(outputs["points"]) if self.match_on == "anchors" else outputs["points"]
        matches = [hungarian_match(where[i].detach(), prob[i], gt_points[i].to(prob.device),
                                   self.cost_point, self.cost_class) for i in range(len(gt_points))]
        return p2p_loss(outputs["logits"], outputs["points"], gt_points, matches, self.eos_coef, self.point_loss_coef,
                        self.cls_loss, self.focal_gamma)
