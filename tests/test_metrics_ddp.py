"""Every metric synchronised over 2 CPU processes (gloo) equals the single-process value."""
import json
import socket
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from crowdseg.metrics.torch_metrics import CountingMetrics, InstanceIoU, LocalizationMetrics, MaskAP

NUM_IMAGES = 5
RANK_IMAGES = {0: [0, 1, 2], 1: [3, 4]}  # uneven on purpose


def make_data():
    """Deterministic per-image inputs for every metric (identical in every process)."""
    rng = np.random.default_rng(123)
    images = []
    for k in range(NUM_IMAGES):
        n = int(rng.integers(5, 40))
        gt = rng.uniform(0, 64, size=(n, 2))
        keep = rng.random(n) < 0.8
        pred = np.concatenate([gt[keep] + rng.normal(0, 3, size=(keep.sum(), 2)),
                               rng.uniform(0, 64, size=(int(rng.integers(0, 6)), 2))])
        half = rng.uniform(1, 8, size=(n, 1))
        boxes = np.concatenate([gt - half, gt + half], axis=1) if k % 2 else None
        gt_map = np.zeros((32, 32), dtype=np.int64)
        pred_map = np.zeros((32, 32), dtype=np.int64)
        for i in range(1, 9):
            y, x = rng.integers(0, 26, size=2)
            h, w = rng.integers(3, 7, size=2)
            gt_map[y:y + h, x:x + w] = i
            dy, dx = rng.integers(-1, 2, size=2)
            pred_map[max(y + dy, 0):y + dy + h, max(x + dx, 0):x + dx + w] = i
        images.append({"gt": gt, "pred": pred, "boxes": boxes, "gt_map": gt_map, "pred_map": pred_map,
                       "scores": rng.uniform(0.1, 1, size=8)})
    return images


def run_metrics(images, empty_rank_ap: bool = False):
    """Update all metrics image by image; return their computed values as floats."""
    counting, loc, iou, ap, ap_one_rank = CountingMetrics(), LocalizationMetrics(), InstanceIoU(), MaskAP(), MaskAP()
    for img in images:
        counting.update(torch.tensor([len(img["pred"])]), torch.tensor([len(img["gt"])]))
        loc.update([torch.from_numpy(img["pred"])], [torch.from_numpy(img["gt"])], boxes=[img["boxes"]])
        iou.update([torch.from_numpy(img["pred_map"])], [torch.from_numpy(img["gt_map"])])
        ap.update([{"instance_map": img["pred_map"], "scores": img["scores"]}], [{"instance_map": img["gt_map"]}])
        if not empty_rank_ap:
            ap_one_rank.update([{"instance_map": img["pred_map"], "scores": img["scores"]}],
                               [{"instance_map": img["gt_map"]}])
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "compute before update" on the rank without MaskAP data
        for prefix, metric in (("count", counting), ("loc", loc), ("iou", iou), ("ap", ap), ("ap_one_rank", ap_one_rank)):
            out.update({f"{prefix}/{k}": float(v) for k, v in metric.compute().items()})
    return out


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        images = [make_data()[i] for i in RANK_IMAGES[rank]]
        # MaskAP "ap_one_rank": rank 1 never updates it, rank 0 holds every image
        values = run_metrics(images, empty_rank_ap=rank == 1)
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(values, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_all_metrics_sync_over_two_cpu_processes(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    single = run_metrics(make_data())
    # "ap_one_rank": only rank 0 (images 0..2) updated it; rank 1's empty state must gather cleanly
    only_rank0 = run_metrics(make_data()[:3])
    expected = {k: (only_rank0 if k.startswith("ap_one_rank/") else single)[k] for k in single}
    for rank in (0, 1):
        synced = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert synced.keys() == expected.keys()
        for key, value in synced.items():
            assert value == pytest.approx(expected[key], rel=1e-12, abs=1e-12), (rank, key)
    # the values are not trivial: partial matches, several instances
    assert 0 < single["loc/sigma_l_f1"] < 1 and 0 < single["iou/mean_iou_c"] < 1 and 0 < single["ap/mask_ap"] < 1
