"""The SAM environment of RPS: NNEC-clipped prompt masks, rewards and instance maps with the tiny SAM."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from crowdseg.rl.candidates import sample_candidates
from crowdseg.rl.reward import match_points_to_instances
from crowdseg.rl.sam_env import EnvOptions, SamEnvironment
from crowdseg.sam import BatchedSamPredictor, build_sam
from datamodules.synthetic import SyntheticCrowd, SyntheticSpec

SIZE = 96


@pytest.fixture(scope="module")
def sam():
    return build_sam("tiny", seed=0)


@pytest.fixture(scope="module")
def sample():
    return SyntheticCrowd(1, "train", SyntheticSpec(height=SIZE, width=SIZE, min_people=6, max_people=12, seed=3))[0]


def environment(sam, chunk: int = 64, **options) -> SamEnvironment:
    return SamEnvironment(BatchedSamPredictor(sam, chunk), EnvOptions(tile=False, **options))


def candidates_of(scene, k: int = 4, seed: int = 0) -> torch.Tensor:
    points = torch.from_numpy(scene.points).float()
    radii = torch.from_numpy(scene.radii).float()
    return sample_candidates(points, radii, k, 0.5, scene.image_hw, torch.Generator().manual_seed(seed))


def test_prompt_masks_stay_in_the_disc_of_their_prompt_and_cover_every_prompt_once(sam, sample):
    env = environment(sam, chunk=7)   # several chunks
    scene = env.prepare(sample["image"], sample["points"])
    candidates = candidates_of(scene).reshape(-1, 2)
    owner = torch.arange(len(scene.points)).repeat_interleave(4)
    seen = []
    foreground = 0
    for chunk in env.prompt_masks(scene, candidates, owner):
        seen += chunk.prompts.tolist()
        b, p, _ = chunk.mask.shape
        rows = chunk.offsets[:, 1, None, None] + torch.arange(p)[None, :, None]
        cols = chunk.offsets[:, 0, None, None] + torch.arange(p)[None, None, :]
        # the flat pixel index and the grid placement agree wherever the mask is on
        assert torch.equal(chunk.flat[chunk.mask], (rows * SIZE + cols).expand(b, p, p)[chunk.mask])
        xy = candidates[chunk.prompts]
        d2 = (cols - xy[:, 0, None, None]) ** 2 + (rows - xy[:, 1, None, None]) ** 2
        r = torch.from_numpy(scene.radii).float()[owner[chunk.prompts]]
        assert bool((d2[chunk.mask] <= (r[:, None, None] ** 2).expand(b, p, p)[chunk.mask] + 1e-4).all())
        assert bool(((rows >= 0) & (rows < SIZE) & (cols >= 0) & (cols < SIZE)).expand(b, p, p)[chunk.mask].all())
        foreground += int(chunk.mask.sum())
    assert sorted(seen) == list(range(len(candidates)))
    assert foreground > 0


def _dense_reward(predictor, embedding, sample, scene, xy: torch.Tensor, point: int, matched: int) -> float:
    """The same reward the slow way: SAM's full low-res logits upsampled to the image like SAM's
    own post-processing (low-res -> input size -> crop -> image size), clipped to the disc."""
    scale = predictor.input_size / SIZE
    negatives = scene.neighbours[point]
    coords = [xy.tolist()] + [scene.points[j].tolist() for j in negatives if j >= 0]
    labels = [1] + [0] * (len(coords) - 1)
    coords = (torch.tensor(coords, dtype=torch.float32) + 0.5) * scale - 0.5
    logits, iou = predictor.decode(embedding, coords[None], torch.tensor([labels]), torch.zeros(1, 2, dtype=torch.long),
                                   predictor.embed_size)
    best = logits[0, int(iou[0].argmax())]
    full = F.interpolate(best[None, None], size=(predictor.input_size,) * 2, mode="bilinear", align_corners=False)
    full = F.interpolate(full, size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0, 0]
    rows, cols = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    disc = (cols - xy[0]) ** 2 + (rows - xy[1]) ** 2 <= scene.radii[point] ** 2
    mask = (full > 0) & disc
    target = sample["instance_map"] == matched + 1
    union = (mask | target).sum().item()
    return (mask & target).sum().item() / union if union else 0.0


def test_rewards_match_a_dense_full_resolution_computation(sam, sample):
    env = environment(sam, num_negatives=2)
    scene = env.prepare(sample["image"], sample["points"])
    candidates = candidates_of(scene, k=3)
    radii = torch.from_numpy(scene.radii).float()
    matched = match_points_to_instances(sample["points"], sample["points"], radii, sample["instance_map"])
    assert matched.tolist() == list(range(len(matched)))
    rewards = env.rewards(scene, candidates, matched, sample["instance_map"])
    assert rewards.shape == candidates.shape[:2] and not rewards.requires_grad
    assert bool(((rewards >= 0) & (rewards <= 1)).all()) and rewards.max() > 0.05
    predictor = BatchedSamPredictor(sam, 1)
    scale = predictor.input_size / SIZE
    embedding = predictor.encode(F.interpolate(sample["image"][None], scale_factor=scale, mode="bilinear",
                                               align_corners=False, antialias=True)[0])
    dense = torch.tensor([[_dense_reward(predictor, embedding, sample, scene, candidates[n, k], n, int(matched[n]))
                           for k in range(3)] for n in range(len(matched))])
    # the windowed sampling and SAM's two-step upsampling differ only on boundary pixels
    assert torch.allclose(rewards, dense, atol=0.06), (rewards - dense).abs().max()
    assert (rewards - dense).abs().mean() < 0.015


def test_batched_rewards_equal_one_prompt_at_a_time_and_unmatched_points_get_the_fixed_reward(sam, sample):
    scene_env = environment(sam, chunk=256)
    scene = scene_env.prepare(sample["image"], sample["points"])
    candidates = candidates_of(scene, k=4, seed=1)
    matched = torch.arange(len(scene.points))
    matched[0] = -1
    batched = scene_env.rewards(scene, candidates, matched, sample["instance_map"], unmatched_reward=0.25)
    single_env = environment(sam, chunk=1)
    single = single_env.rewards(single_env.prepare(sample["image"], sample["points"]), candidates, matched,
                                sample["instance_map"], unmatched_reward=0.25)
    assert torch.allclose(batched, single, atol=1e-2)
    assert batched[0].tolist() == [0.25] * 4


def test_instance_map_of_chosen_points_is_exclusive_and_stays_in_their_discs(sam, sample):
    env = environment(sam, overlap="logit")
    scene = env.prepare(sample["image"], sample["points"])
    chosen = candidates_of(scene, k=2, seed=2)[:, 1]
    id_map, report = env.instance_map(scene, chosen)
    n = len(scene.points)
    assert id_map.shape == (SIZE, SIZE) and id_map.max() <= n
    rows = np.clip(np.round(chosen[:, 1].numpy()).astype(int), 0, SIZE - 1)
    cols = np.clip(np.round(chosen[:, 0].numpy()).astype(int), 0, SIZE - 1)
    assert (id_map[rows, cols] == np.arange(1, n + 1)).sum() == n - report["shared_pixel_points"]
    ys, xs = np.nonzero(id_map)
    k = id_map[ys, xs].astype(int) - 1
    d2 = (xs - chosen[k, 0].numpy()) ** 2 + (ys - chosen[k, 1].numpy()) ** 2
    assert np.all(d2 <= scene.radii[k] ** 2 + 1e-6)
    # the points themselves are the default prompt
    default_map, _ = env.instance_map(scene)
    same_map, _ = env.instance_map(scene, torch.from_numpy(scene.points).float())
    assert np.array_equal(default_map, same_map)


def test_empty_scene_and_bad_owner(sam, sample):
    env = environment(sam)
    scene = env.prepare(sample["image"], torch.zeros(0, 2))
    assert env.rewards(scene, torch.zeros(0, 4, 2), torch.zeros(0, dtype=torch.long),
                       sample["instance_map"]).shape == (0, 4)
    id_map, _ = env.instance_map(scene)
    assert id_map.max() == 0
    full = env.prepare(sample["image"], sample["points"])
    with pytest.raises(ValueError, match="owner"):
        list(env.prompt_masks(full, torch.zeros(1, 2), torch.tensor([len(full.points)])))
    with pytest.raises(ValueError, match="selection"):
        EnvOptions(selection="best")
