"""benchmarks/train_loop.py compares like with like: its bare loop and `crowdseg fit`'s Lightning loop
compute the same loss on the same batch and take the same optimizer step (no timing here)."""
import copy
import importlib.util
from itertools import islice
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("train_loop_bench", ROOT / "benchmarks" / "train_loop.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bare_loop_and_lightning_loop_compute_the_same_losses(tmp_path, tiny_overrides):
    bench = load_benchmark()
    cfg = bench.load(bench.EXPERIMENT, [*tiny_overrides, "data.batch_size=2", "data.crop_size=48", "optim.ema_decay=null"], tmp_path / "runs")
    job, path = bench.build(cfg)
    bare = copy.deepcopy(job.module)                     # the same initial weights for both loops
    batches = list(islice(iter(job.datamodule.train_dataloader()), 2))
    assert len(batches) == 2 and batches[0]["image"].shape[0] == 2

    lightning_losses = bench.lightning_losses(cfg, path, job, batches, enable_progress_bar=False,
                                              enable_model_summary=False)
    bare.train()
    optimizer, _ = bench.bare_optimizer(bare)
    bare_losses = [bench.bare_step(bare, optimizer, batch, cfg.optim.grad_clip) for batch in batches]

    # step 1: the same loss on the same batch; step 2: also the same optimizer step (Adam + clipping)
    assert cfg.optim.grad_clip and len(lightning_losses) == 2
    assert lightning_losses == pytest.approx(bare_losses, rel=1e-5, abs=1e-6)
    for (name, a), b in zip(job.module.model.state_dict().items(), bare.model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name
