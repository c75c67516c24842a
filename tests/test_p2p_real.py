"""The point predictor on real crowds: prior initialisation, focal classification, a real image."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from crowdseg.losses.p2p import P2PLoss, focal_classification, p2p_loss
from crowdseg.models.backbone import create_backbone
from crowdseg.models.p2p import PointPredictor, init_class_prior, select_points


def _small(**kwargs) -> PointPredictor:
    return PointPredictor(create_backbone("resnet10t", reductions=(8, 16)), fpn_channels=32, head_channels=32, **kwargs)


@pytest.mark.parametrize("prior", [0.01, 0.2])
def test_initial_person_probability_is_the_prior(prior):
    torch.manual_seed(0)
    model = _small(cls_prior=prior)
    with torch.no_grad():
        prob = model(torch.rand(2, 3, 64, 96))["logits"].softmax(-1)[..., 1]
    assert prob.mean().item() == pytest.approx(prior, rel=0.02)
    assert (prob - prior).abs().max().item() < 0.1 * prior


def test_prior_bias_layout_and_default_init_unchanged():
    layer = torch.nn.Conv2d(8, 4 * 2, 3, padding=1)
    init_class_prior(layer, 0.01)
    assert layer.bias.view(4, 2)[:, 0].tolist() == [0.0] * 4
    assert layer.bias.view(4, 2)[:, 1].tolist() == pytest.approx([math.log(0.01 / 0.99)] * 4)
    with pytest.raises(ValueError):
        init_class_prior(layer, 1.0)
    # without cls_prior the classification output keeps PyTorch's initialisation (P2PNet)
    torch.manual_seed(0)
    a = _small()
    torch.manual_seed(0)
    b = _small(cls_prior=None)
    assert torch.equal(a.classification[-1].bias, b.classification[-1].bias)


def test_focal_classification_by_hand():
    logits = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    target = torch.tensor([1, 0, 1])
    got = focal_classification(logits, target, eos_coef=0.5, gamma=2.0, num_positive=2)
    p_pos0, p_bg, p_pos2 = 0.5, 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(-1))
    want = ((1 - p_pos0) ** 2 * -math.log(p_pos0) + 0.5 * (1 - p_bg) ** 2 * -math.log(p_bg)
            + (1 - p_pos2) ** 2 * -math.log(p_pos2)) / 2
    assert got.item() == pytest.approx(want)
    # gamma 0, eos 1: plain cross-entropy summed over proposals / positives
    ce = torch.nn.functional.cross_entropy(logits, target, reduction="sum") / 2
    assert focal_classification(logits, target, 1.0, 0.0, 2).item() == pytest.approx(ce.item())


def test_p2p_loss_focal_option():
    logits = torch.zeros(1, 3, 2)
    points = torch.zeros(1, 3, 2)
    gt = [torch.zeros(1, 2)]
    matches = [(torch.tensor([0]), torch.tensor([0]))]
    out = p2p_loss(logits, points, gt, matches, eos_coef=1.0, point_loss_coef=0.0, cls_loss="focal", focal_gamma=0.0)
    assert out["cls"].item() == pytest.approx(3 * math.log(2))
    with pytest.raises(ValueError):
        P2PLoss(cls_loss="hinge")


def _synthetic_loader(split: str, n: int):
    from datamodules.dataset import build_dataset
    from datamodules.transforms import EvalTransform
    from datamodules.types import collate_samples

    ds = build_dataset("synthetic", None, split, transform=EvalTransform(32), num_images=n, height=64, width=64,
                       max_people=20)
    return torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_samples)


def test_ema_weights_are_evaluated_and_checkpointed(tmp_path):
    """Lightning's EMAWeightAveraging with the point predictor's module: validation runs on the
    averaged weights, and the checkpoint's state_dict holds them (the live ones aside)."""
    import lightning as L
    from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint

    from crowdseg.config.schema import OptimConfig
    from crowdseg.lit.p2p import PointPredictorModule

    class Recording(PointPredictorModule):
        seen: list = []

        def validation_step(self, batch, batch_idx):
            if not self.trainer.sanity_checking:
                self.seen.append(self.model.classification[-1].bias.detach().clone())
            return super().validation_step(batch, batch_idx)

    torch.manual_seed(0)
    optim = OptimConfig(lr=1e-2, backbone_lr=1e-2, weight_decay=0.0, step_size=100, gamma=0.1)
    module = Recording(_small(cls_prior=0.01), P2PLoss(), optim, total_steps=4)
    ema = EMAWeightAveraging(decay=0.5)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_progress_bar=False,
                        num_sanity_val_steps=0, callbacks=[ema, checkpoint], enable_model_summary=False)
    trainer.fit(module, _synthetic_loader("train", 8), _synthetic_loader("val", 2))
    averaged = ema._average_model.module.model.classification[-1].bias.detach()
    assert len(Recording.seen) >= 1 and torch.equal(Recording.seen[-1], averaged)
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert torch.equal(state["state_dict"]["model.classification.4.bias"], averaged)
    live = state["current_model_state"]["model.classification.4.bias"]
    assert not torch.equal(live, averaged)  # decay 0.5 over 4 steps: the live weights differ


def test_point_predictor_fires_on_a_real_image(shared_data):
    """A few dozen steps on a 128 px crop of a real ShanghaiTech A image (14 heads): the prior-
    initialised predictor must end with a non-zero count (P(person) > 0.5 somewhere)."""
    from datamodules.dataset import build_dataset
    from datamodules.loading import to_sample
    from datamodules.transforms import scale_crop

    ds = build_dataset("sha", str(shared_data / "shanghaitech_A_samples"), "all", max_size=512,
                       names=["IMG_4.jpg"], progress=False)
    sample = to_sample(scale_crop(ds.load_raw(0), 1.0, 160, 128, 128, 128))
    image, gt = sample["image"][None], [sample["points"]]
    assert len(gt[0]) == 14
    torch.manual_seed(0)
    model = _small(cls_prior=0.01)
    criterion = P2PLoss()
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    with torch.no_grad():
        assert len(select_points(**_outputs(model, image))[0][0]) == 0  # starts silent (prior 0.01)
    for _ in range(40):
        loss = criterion(model(image), gt)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        (points, scores), = select_points(**_outputs(model, image))
    assert 0 < len(points) <= 3 * len(gt[0])


def _outputs(model, image):
    model.eval()
    out = model(image)
    model.train()
    return {"points": out["points"], "logits": out["logits"]}


def test_match_on_anchors_uses_the_fixed_anchor_points():
    # two proposals: anchor 0 at (0, 0) predicts (20, 0); anchor 1 at (20, 0) predicts (0, 0)
    outputs = {"anchors": torch.tensor([[0.0, 0.0], [20.0, 0.0]]),
               "points": torch.tensor([[[20.0, 0.0], [0.0, 0.0]]], requires_grad=True),
               "logits": torch.zeros(1, 2, 2, requires_grad=True)}
    gt = [torch.tensor([[1.0, 0.0]])]
    predicted = P2PLoss(point_loss_coef=1.0)(outputs, gt)
    anchors = P2PLoss(point_loss_coef=1.0, match_on="anchors")(outputs, gt)
    # P2PNet matches the prediction nearest the GT (anchor 1's); on anchors, anchor 0 is matched
    assert predicted["point"].item() == pytest.approx(1.0)
    assert anchors["point"].item() == pytest.approx(19.0 ** 2)
    with pytest.raises(ValueError):
        P2PLoss(match_on="boxes")


def test_merge_points_by_hand():
    from crowdseg.models.p2p import merge_points

    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [11.0, 0.0], [30.0, 0.0]])
    scores = torch.tensor([0.3, 0.3, 0.9, 0.8, 0.4])
    kept, merged = merge_points(points, scores, radius=2.0)
    # duplicates at 10/11 count once (clipped to 1), the split head at 0/1 is found, 0.4 alone is not
    assert kept.tolist() == [[10.0, 0.0], [0.0, 0.0]] and merged.tolist() == pytest.approx([1.0, 0.6])
    logits = torch.log(torch.stack([1 - scores, scores], -1))[None]
    (plain, _), = select_points(points[None], logits, 0.5)
    (with_merge, _), = select_points(points[None], logits, 0.5, merge_radius=2.0)
    assert len(plain) == 2 and with_merge.tolist() == kept.tolist()


def test_merge_points_matches_brute_force():
    from torchvision.ops import nms

    from crowdseg.models.p2p import merge_points

    gen = torch.Generator().manual_seed(1)
    for radius in (1.0, 3.0, 5.0):
        points, scores = torch.rand(400, 2, generator=gen) * 60 - 5, torch.rand(400, generator=gen) * 0.6
        centres = nms(torch.cat([points - radius / 2, points + radius / 2], 1), scores, 0.0)
        near = ((points[:, None] - points[centres][None]).abs() < radius).all(-1)
        owner = near.to(torch.uint8).argmax(1)  # the highest-scoring centre near each prediction
        merged = torch.zeros(len(centres)).index_add_(0, owner, scores).clamp(max=1.0)
        kept, got = merge_points(points, scores, radius)
        assert torch.equal(kept, points[centres][merged > 0.5]) and torch.allclose(got, merged[merged > 0.5])


def test_config_keys_reach_the_point_predictor_and_ema(tiny_overrides):
    """`model.cls_prior`, `loss.*` and `optim.ema_decay` of a config end up in the built run: the
    checkpoint of an EMA run holds the averaged weights plus the live ones for resuming."""
    from crowdseg.config import load_config
    from crowdseg.methods.p2p import build_point_loss, build_point_predictor
    from crowdseg.train import train

    experiment = Path(__file__).resolve().parents[1] / "experiments" / "p2p" / "synthetic.yaml"
    keys = ["model.cls_prior=0.02", "loss.cls_loss=focal", "loss.match_on=anchors", "loss.merge_radius=4"]
    cfg = load_config(experiment, tiny_overrides + keys + ["optim.ema_decay=0.5", "trainer.limit_val_batches=1"])
    model, criterion = build_point_predictor(cfg.model), build_point_loss(cfg.loss)
    with torch.no_grad():
        prob = model(torch.rand(1, 3, 32, 32))["logits"].softmax(-1)[..., 1]
    assert torch.allclose(prob, torch.full_like(prob, 0.02), atol=0.01)
    assert (criterion.cls_loss, criterion.match_on) == ("focal", "anchors")
    result = train(cfg)
    state = torch.load(result["checkpoint"], map_location="cpu", weights_only=False)
    assert "current_model_state" in state and "averaging_state" in state
    assert any(not torch.equal(v, state["current_model_state"][k]) for k, v in state["state_dict"].items()
               if v.is_floating_point())
