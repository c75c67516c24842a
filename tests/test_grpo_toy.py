"""The RPS pieces together on a toy task: GRPO teaches the scorer to pick better candidates.

Every predicted point sits 3 px to the right of its person; a candidate's "SAM mask" is a disc
of radius 3 around it, and the reward is that disc's IoU with the person's disc. The scorer sees
the candidate's offset from the point, so it can learn to prefer candidates to the left.
"""
import torch

from crowdseg.rl.candidates import sample_candidates
from crowdseg.rl.grpo import group_advantages, grpo_loss
from crowdseg.rl.policy import CandidateScorer, frozen_copy, greedy, log_prob, sample
from crowdseg.rl.reward import candidate_rewards, match_points_to_instances

SIZE = 48
RADIUS = 3.0


def discs(centres: torch.Tensor) -> torch.Tensor:
    """(..., 2) xy -> (..., SIZE, SIZE) bool discs of radius RADIUS around the rounded centres."""
    ys, xs = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    c = centres.round()
    return ((xs - c[..., 0, None, None]) ** 2 + (ys - c[..., 1, None, None]) ** 2) <= RADIUS ** 2


def make_scene(generator: torch.Generator):
    gt = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="xy"), -1).reshape(-1, 2)
    gt_points = (gt * 11 + 7).float()                                       # 16 people, 11 px apart
    instance_map = torch.zeros(SIZE, SIZE, dtype=torch.long)
    for k, mask in enumerate(discs(gt_points)):
        instance_map[mask] = k + 1
    points = gt_points + torch.tensor([3.0, 0.0])                           # the predictor's bias
    return gt_points, instance_map, points


def test_grpo_raises_the_reward_of_the_selected_candidates():
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    gt_points, instance_map, points = make_scene(generator)
    radii = torch.full((16,), 8.0)
    matched = match_points_to_instances(points, gt_points, radii, instance_map)
    assert matched.tolist() == list(range(16))
    features = torch.zeros(1, 4, SIZE // 8, SIZE // 8)                       # uninformative features
    scorer = CandidateScorer(in_channels=4, stride=8, hidden_channels=16)
    reference = frozen_copy(scorer)
    optimizer = torch.optim.Adam(scorer.parameters(), lr=3e-2)

    def rollout():
        candidates = sample_candidates(points, radii, 8, 0.4, (SIZE, SIZE), generator)
        rewards = candidate_rewards(discs(candidates), matched, instance_map)
        return candidates, rewards

    def selected_reward(candidates, rewards):
        with torch.no_grad():
            logits = scorer(features, candidates, points, radii)
        return rewards.gather(1, greedy(logits)[:, None]).mean().item()

    held_out = [rollout() for _ in range(4)]
    original = sum(r[:, 0].mean().item() for _, r in held_out) / 4
    before = sum(selected_reward(c, r) for c, r in held_out) / 4
    assert abs(before - original) < 1e-6         # uniform start: greedy picks the point itself

    for _ in range(60):
        candidates, rewards = rollout()
        logits = scorer(features, candidates, points, radii)
        actions = sample(logits, 8, generator)
        advantages, valid = group_advantages(rewards.gather(1, actions))
        logp = log_prob(logits, actions)
        with torch.no_grad():
            ref_logp = log_prob(reference(features, candidates, points, radii), actions)
        loss, diagnostics = grpo_loss(logp, logp.detach(), advantages, valid, ref_logp, beta=0.01)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss) and diagnostics["ratio"].item() == 1.0

    after = sum(selected_reward(c, r) for c, r in held_out) / 4
    print(f"reward of the original points {original:.3f}, of the selected candidates {after:.3f}")
    assert after > original + 0.15, (original, after)
