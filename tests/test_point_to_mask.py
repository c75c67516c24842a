"""One point-to-mask path: `crowdseg masks` and the RPS environment give the same masks; one point-to-pixel rule."""
import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from crowdseg.dpmo.writer import MaskGenerator, MaskWriter
from crowdseg.geometry import pixels_inside, point_pixels, points_inside
from crowdseg.rl.sam_env import EnvOptions, SamEnvironment
from crowdseg.sam import BatchedSamPredictor, build_sam
from datamodules.readers.idmaps import mask_stem, read_id_map
from datamodules.synthetic import SyntheticCrowd, SyntheticSpec
from datamodules.types import collate_samples


@pytest.mark.parametrize("variant", ["dpmo", "edp_sam"])
def test_crowdseg_masks_and_the_rps_environment_make_the_same_masks(tmp_path, variant):
    """The masks `crowdseg masks` writes (its Lightning predict module and writer) and the RPS
    environment's instance map of the same points are identical, on tiled images."""
    sam = build_sam("tiny", seed=0)
    dataset = SyntheticCrowd(2, "train", SyntheticSpec(height=96, width=128, min_people=8, max_people=30, seed=5))
    # one options object serves as the `dpmo` section and as the environment's options
    options = EnvOptions(selection="iou_inside", variant=variant, target_nn_px=48.0)
    writer = MaskWriter(tmp_path)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, callbacks=[writer],
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.predict(MaskGenerator(sam, options, 16, tmp_path), DataLoader(dataset, collate_fn=collate_samples),
                    return_predictions=False)
    assert writer.written == 2
    env = SamEnvironment(BatchedSamPredictor(sam, 16), options)
    for i in range(len(dataset)):
        sample = dataset[i]
        written = read_id_map(tmp_path / f"{mask_stem(sample['meta']['name'])}.png")
        scene = env.prepare(sample["image"], sample["points"])
        assert len(scene.tiles) > 1
        id_map, report = env.instance_map(scene)
        np.testing.assert_array_equal(written, id_map)
        assert (id_map > 0).sum() > 2 * len(scene.points) and report["missing_instances"] == 0


def test_point_pixels_one_rule_for_arrays_and_tensors():
    xy = np.array([[0.5, 1.5], [2.4999, -0.6], [9.5, 4.51], [-0.5, 10.5]])
    rows, cols = point_pixels(xy)
    # halves round to even, as numpy and torch round
    assert rows.dtype == np.int64 and rows.tolist() == [2, -1, 5, 10] and cols.tolist() == [0, 2, 10, 0]
    t_rows, t_cols = point_pixels(torch.from_numpy(xy).float().requires_grad_())
    assert t_rows.dtype == torch.long and t_rows.tolist() == rows.tolist() and t_cols.tolist() == cols.tolist()
    c_rows, c_cols = point_pixels(xy, 10, 10)
    assert c_rows.tolist() == [2, 0, 5, 9] and c_cols.tolist() == [0, 2, 9, 0]
    assert pixels_inside(rows, cols, 10, 10).tolist() == [True, False, False, False]
    assert points_inside(torch.from_numpy(xy), 11, 11).tolist() == [True, False, True, True]
    with pytest.raises(ValueError, match="both"):
        point_pixels(xy, 10)
