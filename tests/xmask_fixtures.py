"""Tiny XMask pieces for the tests: a resnet18 student with narrow heads, 64 x 64 synthetic crowds."""
from __future__ import annotations

import torch

from crowdseg.config.schema import OptimConfig
from crowdseg.lit.xmask import XMaskModule
from crowdseg.models.backbone import create_backbone
from crowdseg.models.xmask import XMaskNet
from crowdseg.xmask.schedule import PhaseSchedule, default_phase_lrs
from datamodules.semi import SemiSupervisedDataModule
from datamodules.synthetic import SyntheticCrowd, SyntheticSpec
from datamodules.transforms import TrainTransform, TwoViewTransform

OPTIM = OptimConfig(lr=1e-3, backbone_lr=1e-4, weight_decay=1e-4, step_size=1000, gamma=0.9)
PHASE_LRS = default_phase_lrs(OPTIM.lr, OPTIM.backbone_lr, phase2_lr=1e-3, phase3_lr=1e-3)


def tiny_net(seed: int = 0) -> XMaskNet:
    torch.manual_seed(seed)
    return XMaskNet(create_backbone("resnet18", None, (8, 16)), fuse_channels=16, decoder_channels=16,
                    mask_channels=16, emb_dim=8)


def tiny_module(unit="step", phase1_end=1, phase2_end=2, semi_warmup=-1, ramp_rate=1.0, semi=True, seed=0,
                **kwargs) -> XMaskModule:
    # semi_warmup -1 with ramp 1: the unlabeled branch has weight 1 from the first step of each phase
    schedule = PhaseSchedule(unit=unit, phase1_end=phase1_end, phase2_end=phase2_end, semi_warmup=semi_warmup,
                             ramp_rate=ramp_rate)
    return XMaskModule(tiny_net(seed), schedule, OPTIM, PHASE_LRS, total_steps=-1, semi=semi, **kwargs)


def tiny_datamodule(num_train=6, labeled=2, size=64, batch=2, seed=0) -> SemiSupervisedDataModule:
    spec = SyntheticSpec(height=size, width=size, min_people=3, max_people=20, seed=seed)
    full = SyntheticCrowd(num_train, "train", spec)
    names = full.names
    lab = full.subset(names[:labeled], TrainTransform(crop_size=size, scale_range=(1.0, 1.0), seed=seed))
    unl = full.subset(names[labeled:], TwoViewTransform(crop_size=size, scale_range=(1.0, 1.0), seed=seed))
    val = SyntheticCrowd(2, "val", spec)
    return SemiSupervisedDataModule(lab, unl, val=val, test=val, labeled_batch_size=batch,
                                    unlabeled_batch_size=batch, eval_batch_size=2, num_workers=0, seed=seed)


def trainer_kwargs(**overrides):
    kw = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    kw.update(overrides)
    return kw
