"""BoxInst LightningModule and method module: proposal sampling, a fast_dev_run on the
synthetic crowd through the real experiment config, the fine-tune (init_ckpt) and its resume."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from crowdseg.config.load import load_config
from crowdseg.errors import ConfigError
from crowdseg.lit.boxinst import filled_boxes, instance_map, select_proposals

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments" / "boxinst"

# a tiny model on a few small images: every test here runs in seconds on CPU
TINY = ["boxinst.model.backbone=resnet10t", "boxinst.model.fpn_channels=32", "boxinst.model.head_convs=1", "boxinst.model.mask_branch_channels=16",
        "boxinst.model.mask_branch_convs=1", "data.synthetic.num_train=4", "data.synthetic.num_val=2",
        "data.synthetic.num_test=2", "data.synthetic.height=64", "data.synthetic.width=64",
        "data.synthetic.min_people=4", "data.synthetic.max_people=8", "data.batch_size=2", "data.num_workers=0",
        "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "logger.num_pictures=1"]


def _trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    kwargs.setdefault("logger", False)
    return L.Trainer(accelerator="cpu", enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=str(tmp_path), num_sanity_val_steps=0, **kwargs)


# ------------------------------------------------------------------------------------ pure pieces

def test_select_proposals_splits_topk_over_the_gts_of_each_image():
    scores = torch.tensor([0.9, 0.5, 0.7, 0.4, 0.8, 0.3, 0.2])
    image = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    gt = torch.tensor([0, 0, 0, 1, 0, 0, 0])
    # image 0: 2 GTs -> 2 per GT: GT 0 keeps 0.9 and 0.7, GT 1 its only one; image 1: 1 GT -> 4: all three
    assert select_proposals(scores, image, gt, 2, 4).tolist() == [0, 2, 3, 4, 5, 6]
    # at least one per GT even when topk < number of GTs
    assert select_proposals(scores, image, gt, 2, 1).tolist() == [0, 3, 4]
    assert select_proposals(scores, image, gt, 2, 0).tolist() == list(range(7))


def test_filled_boxes_and_instance_map():
    masks = filled_boxes(torch.tensor([[1.0, 0.0, 2.0, 1.5], [0.0, 1.0, 3.0, 3.0]]), (4, 4))
    assert masks[0].nonzero().tolist() == [[0, 1], [0, 2], [1, 1], [1, 2]]
    assert masks[1].sum() == 12
    ids = instance_map(masks, torch.tensor([0.9, 0.5]), threshold=0.3)
    assert ids[1, 1] == 1 and ids[2, 1] == 2 and ids[0, 0] == 0      # the higher score wins the overlap
    assert instance_map(masks, torch.tensor([0.9, 0.1]), 0.3).max() == 1


# -------------------------------------------------------------------------------- config / build

def test_experiment_configs_load_and_check():
    for path in sorted(EXPERIMENTS.glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.method == "boxinst"
    with pytest.raises(ConfigError, match="boxinst.loss.overlap_normalization"):
        load_config(EXPERIMENTS / "synthetic.yaml", ["boxinst.loss.overlap_normalization=mean"])
    with pytest.raises(ConfigError, match="boxinst.model.fpn_channels"):
        load_config(EXPERIMENTS / "synthetic.yaml", ["boxinst.model.fpn_channels=48"])


def test_fast_dev_run_on_the_synthetic_crowd(tmp_path):
    from crowdseg.methods.boxinst import build

    cfg = load_config(EXPERIMENTS / "synthetic_overlap.yaml", TINY + ["boxinst.init_ckpt=null"])
    job = build(cfg, tmp_path)
    trainer = _trainer(tmp_path, fast_dev_run=True)
    trainer.fit(job.module, datamodule=job.datamodule)
    metrics = trainer.callback_metrics
    for key in ("train/loss", "train/projection", "train/pairwise", "train/overlap", "val/mask_ap", "val/box_ap",
                "val/overlap", "val/gtbox_mask_iou", "val/gtboxfill_mask_iou", "val/gtbox_mask_ap"):
        assert key in metrics, key
    assert torch.isfinite(metrics["train/loss"])
    # training used the whole-person boxes: the batch key exists in the synthetic training samples
    assert "full_boxes" in job.datamodule.datasets["train"][0]


def test_box_baseline_ap_fills_the_boxes_of_the_same_detections():
    """Predictions = the GT masks themselves with their tight boxes: the masks' AP is 1, the filled
    boxes' AP (the baseline logged beside it) is below 1 because the people are not rectangles."""
    from torchvision.ops import masks_to_boxes

    from crowdseg.methods.boxinst import build

    job = build(load_config(EXPERIMENTS / "synthetic.yaml", TINY), None)
    job.datamodule.setup("fit")
    batch = next(iter(job.datamodule.val_dataloader()))
    module = job.module

    def exact(batch, outputs=None):
        out = []
        for ids, (h, w) in zip(batch["instance_map"], batch["image_size"].tolist()):
            ids = ids[:h, :w]
            masks = torch.stack([ids == k for k in ids.unique() if k > 0])
            out.append({"masks": masks, "scores": torch.ones(len(masks)), "boxes": masks_to_boxes(masks)})
        return out

    module.predict_instances = exact
    module._eval_step("val", batch, 0)
    masks, boxes = module.mask_ap["val"].compute(), module.boxfill_ap["val"].compute()
    assert masks["mask_ap"] == pytest.approx(1.0)
    assert set(boxes) == {f"boxfill_{key}" for key in masks}
    assert 0.0 < boxes["boxfill_mask_ap"] < 0.9


def test_finetune_starts_from_the_checkpoint_and_resumes_from_its_own(tmp_path):
    from crowdseg.methods.boxinst import build

    base_cfg = load_config(EXPERIMENTS / "synthetic.yaml", TINY)
    base = build(base_cfg, tmp_path / "base")
    trainer = _trainer(tmp_path / "base", max_steps=1, limit_val_batches=0)
    trainer.fit(base.module, datamodule=base.datamodule)
    base_ckpt = tmp_path / "base.ckpt"
    trainer.save_checkpoint(base_ckpt)

    cfg = load_config(EXPERIMENTS / "synthetic_overlap.yaml", TINY + [f"boxinst.init_ckpt={base_ckpt}"])
    job = build(cfg, tmp_path / "ft")
    for name, value in base.module.model.state_dict().items():
        assert torch.equal(job.module.model.state_dict()[name], value), name
    trainer = _trainer(tmp_path / "ft", max_steps=2, limit_val_batches=0)
    trainer.fit(job.module, datamodule=job.datamodule)
    last = tmp_path / "ft.ckpt"
    trainer.save_checkpoint(last)
    trained = {k: v.clone() for k, v in job.module.model.state_dict().items()}

    # a resumed fine-tune rebuilds the job (init_ckpt loaded again), then Lightning restores its own
    # checkpoint: the weights, optimizer and step continue from the fine-tune, not from the base
    resumed = build(cfg, tmp_path / "ft")
    trainer = _trainer(tmp_path / "ft", max_steps=3, limit_val_batches=0)
    seen = {}

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen.setdefault("step", trainer.global_step)
            seen.setdefault("weights", {k: v.clone() for k, v in module.model.state_dict().items()})

    trainer.callbacks.append(Probe())
    trainer.fit(resumed.module, datamodule=resumed.datamodule, ckpt_path=str(last))
    assert seen["step"] == 2 and trainer.global_step == 3
    for name, value in trained.items():
        assert torch.equal(seen["weights"][name], value), name


def test_init_ckpt_errors(tmp_path):
    from crowdseg.methods.boxinst import build

    with pytest.raises(ConfigError, match="boxinst.init_ckpt"):
        build(load_config(EXPERIMENTS / "synthetic_overlap.yaml", TINY + [f"boxinst.init_ckpt={tmp_path / 'no.ckpt'}"]),
              tmp_path)
    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {"other.weight": torch.zeros(1)}}, bad)
    with pytest.raises(ConfigError, match="no `model"):
        build(load_config(EXPERIMENTS / "synthetic_overlap.yaml", TINY + [f"boxinst.init_ckpt={bad}"]), tmp_path)
