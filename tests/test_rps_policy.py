"""RPS candidates and policy: sampling around points, feature sampling, the scorer and its helpers."""
import pytest
import torch

from crowdseg.rl.candidates import sample_candidates
from crowdseg.rl.policy import (CandidateScorer, frozen_copy, greedy, group_log_probs, log_prob, sample,
                                sample_features)


# ------------------------------------------------------------------------------ candidates
def test_candidates_keep_the_point_at_index_zero_and_stay_in_the_image():
    points = torch.tensor([[1.0, 1.0], [30.0, 20.0], [63.0, 47.0]])
    radii = torch.tensor([40.0, 5.0, 40.0])
    generator = torch.Generator().manual_seed(0)
    candidates = sample_candidates(points, radii, num_candidates=64, sigma=0.5, image_size=(48, 64),
                                   generator=generator)
    assert candidates.shape == (3, 64, 2)
    assert torch.equal(candidates[:, 0], points)
    assert (candidates[..., 0] >= 0).all() and (candidates[..., 0] <= 63).all()
    assert (candidates[..., 1] >= 0).all() and (candidates[..., 1] <= 47).all()
    # points by the border with a large radius do get clamped candidates (the clamp is exercised)
    assert (candidates[0, 1:] == 0).any() and (candidates[2, 1:, 0] == 63).any()


def test_candidates_are_seeded_and_spread_with_sigma_times_radius():
    points = torch.tensor([[500.0, 500.0], [400.0, 600.0]])
    radii = torch.tensor([10.0, 40.0])
    a = sample_candidates(points, radii, 2001, 0.5, (1000, 1000), torch.Generator().manual_seed(3))
    b = sample_candidates(points, radii, 2001, 0.5, (1000, 1000), torch.Generator().manual_seed(3))
    c = sample_candidates(points, radii, 2001, 0.5, (1000, 1000), torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    spread = (a[:, 1:] - points[:, None]).std(dim=1)          # (2, 2): per point, per axis
    assert torch.allclose(spread, torch.tensor([[5.0, 5.0], [20.0, 20.0]]), rtol=0.1)


def test_candidates_edge_cases():
    none = sample_candidates(torch.zeros(0, 2), torch.zeros(0), 8, 0.5, (10, 10))
    assert none.shape == (0, 8, 2)
    same = sample_candidates(torch.tensor([[2.0, 3.0]]), torch.zeros(1), 5, 0.5, (10, 10))
    assert torch.equal(same, torch.tensor([[2.0, 3.0]]).expand(1, 5, 2).reshape(1, 5, 2))
    outside = sample_candidates(torch.tensor([[-4.0, 12.0]]), torch.ones(1), 1, 0.5, (10, 10))
    assert outside.tolist() == [[[0.0, 9.0]]]
    with pytest.raises(ValueError):
        sample_candidates(torch.zeros(2, 2), torch.zeros(3), 4, 0.5, (10, 10))


# ------------------------------------------------------------------------------ features
def coordinate_features(h: int, w: int) -> torch.Tensor:
    """(1, 2, h, w): channel 0 = column index, channel 1 = row index."""
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                indexing="ij")
    return torch.stack([cols, rows])[None]


def test_sample_features_at_cell_centres_and_between_them():
    stride = 8
    features = coordinate_features(4, 5)
    # cell (row 2, col 3) is centred at pixel (3*8 + 3.5, 2*8 + 3.5); halfway to the next column too
    positions = torch.tensor([[[27.5, 19.5], [31.5, 19.5], [3.5, 3.5]]])
    sampled = sample_features(features, positions, stride)
    assert sampled.shape == (1, 3, 2)
    assert torch.allclose(sampled[0], torch.tensor([[3.0, 2.0], [3.5, 2.0], [0.0, 0.0]]))


def test_sample_features_routes_rows_to_their_image():
    features = torch.cat([coordinate_features(4, 4), 10 + coordinate_features(4, 4)])   # (2, 2, 4, 4)
    positions = torch.tensor([[[1.5, 1.5]], [[5.5, 1.5]], [[1.5, 5.5]]])              # stride 4
    sampled = sample_features(features, positions, 4, batch_index=torch.tensor([1, 0, 1]))
    assert torch.allclose(sampled[:, 0], torch.tensor([[10.0, 10.0], [1.0, 0.0], [10.0, 11.0]]))


# ------------------------------------------------------------------------------ scorer
def make_inputs(n: int = 5, k: int = 6, channels: int = 16, batch: int = 2):
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(batch, channels, 8, 8, generator=generator)
    points = torch.rand(n, 2, generator=generator) * 60
    radii = torch.rand(n, generator=generator) * 10 + 2
    candidates = sample_candidates(points, radii, k, 0.5, (64, 64), generator)
    batch_index = torch.arange(n) % batch
    return features, candidates, points, radii, batch_index


def test_scorer_shapes_uniform_start_and_normalised_groups():
    features, candidates, points, radii, batch_index = make_inputs()
    scorer = CandidateScorer(in_channels=16, stride=8, hidden_channels=32)
    logits = scorer(features, candidates, points, radii, batch_index)
    assert logits.shape == (5, 6)
    assert torch.allclose(group_log_probs(logits).exp(), torch.full((5, 6), 1 / 6))   # zero-init output
    assert greedy(logits).tolist() == [0] * 5                # ties go to the unrefined point
    torch.manual_seed(0)
    random_scorer = CandidateScorer(in_channels=16, stride=8, hidden_channels=32, zero_init_output=False)
    logits = random_scorer(features, candidates, points, radii, batch_index)
    assert torch.allclose(group_log_probs(logits).exp().sum(dim=1), torch.ones(5))
    assert logits.std() > 0


def test_scorer_gradient_reaches_parameters_and_features():
    features, candidates, points, radii, batch_index = make_inputs()
    features.requires_grad_(True)
    torch.manual_seed(0)
    scorer = CandidateScorer(in_channels=16, stride=8, hidden_channels=32, zero_init_output=False)
    logits = scorer(features, candidates, points, radii, batch_index)
    log_prob(logits, torch.zeros(5, 3, dtype=torch.long)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in scorer.parameters())
    assert features.grad.abs().sum() > 0


def test_log_prob_sample_and_greedy():
    logits = torch.tensor([[0.0, 1.0, 2.0], [5.0, -5.0, 0.0]])
    actions = torch.tensor([[2, 0], [0, 0]])
    expected = torch.log_softmax(logits, dim=1).gather(1, actions)
    assert torch.allclose(log_prob(logits, actions), expected)
    assert greedy(logits).tolist() == [2, 0]
    draws = sample(logits, 4000, torch.Generator().manual_seed(1))
    assert draws.shape == (2, 4000) and draws.dtype == torch.long
    frequencies = torch.stack([torch.bincount(row, minlength=3) for row in draws]).float() / 4000
    assert torch.allclose(frequencies, torch.softmax(logits, dim=1), atol=0.03)
    again = sample(logits, 4000, torch.Generator().manual_seed(1))
    assert torch.equal(draws, again)
    assert sample(torch.zeros(0, 3), 4).shape == (0, 4)


def test_frozen_copy_is_independent_frozen_and_in_eval_mode():
    features, candidates, points, radii, batch_index = make_inputs()
    torch.manual_seed(0)
    scorer = CandidateScorer(in_channels=16, stride=8, hidden_channels=32, zero_init_output=False)
    reference = frozen_copy(scorer)
    assert not reference.training and scorer.training
    assert all(not p.requires_grad for p in reference.parameters())
    assert all(p.requires_grad for p in scorer.parameters())
    before = reference(features, candidates, points, radii, batch_index)
    assert torch.equal(before, scorer(features, candidates, points, radii, batch_index))
    with torch.no_grad():
        for p in scorer.parameters():
            p.add_(1.0)
    assert torch.equal(before, reference(features, candidates, points, radii, batch_index))
