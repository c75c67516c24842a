"""SAM backend: building, checkpoint errors, and the batched windowed predictor against SAM's own."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from crowdseg.errors import ConfigError
from crowdseg.sam import BatchedSamPredictor, build_sam, guess_model_type, resize_to_input


@pytest.fixture(scope="module")
def tiny():
    return build_sam("tiny")


def test_tiny_is_deterministic_and_leaves_the_global_rng_alone(tiny):
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    again = build_sam("tiny")
    after = torch.rand(3)
    assert torch.equal(before, after)                          # build_sam did not consume global randomness
    for (k, a), b in zip(tiny.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    other = build_sam("tiny", seed=1)
    assert not torch.equal(other.mask_decoder.iou_token.weight, tiny.mask_decoder.iou_token.weight)
    assert not tiny.training


def test_tiny_shapes(tiny):
    p = BatchedSamPredictor(tiny)
    assert (p.input_size, p.embed_size, p.patch, p.low_res_size) == (256, 16, 16, 64)
    emb = p.encode(torch.rand(3, 100, 256))
    assert emb.features.shape == (1, 64, 16, 16) and emb.input_hw == (100, 256)
    with pytest.raises(ValueError):
        p.encode(torch.rand(3, 300, 100))


def test_checkpoint_round_trip(tmp_path, tiny):
    path = tmp_path / "tiny.pth"
    torch.save(tiny.state_dict(), path)
    loaded = build_sam("tiny", str(path), seed=7)               # weights come from the file, not the seed
    assert torch.equal(loaded.mask_decoder.iou_token.weight, tiny.mask_decoder.iou_token.weight)
    torch.save({"model": tiny.state_dict()}, tmp_path / "wrapped.pth")
    wrapped = build_sam("tiny", str(tmp_path / "wrapped.pth"), seed=7)
    assert torch.equal(wrapped.mask_decoder.iou_token.weight, tiny.mask_decoder.iou_token.weight)


def test_missing_checkpoint_names_file_type_and_source(tmp_path):
    with pytest.raises(ConfigError) as err:
        build_sam("vit_b", str(tmp_path / "sam_vit_b.pth"))
    msg = str(err.value)
    assert "\n" not in msg and "sam_vit_b.pth" in msg and "file not found" in msg
    assert "vit_b" in msg and "segment-anything" in msg and "sam_vit_b_01ec64.pth" in msg


def test_garbage_checkpoint(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(ConfigError, match=r"bad\.pth: not a PyTorch state dict.*expected a tiny checkpoint"):
        build_sam("tiny", str(bad))
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ConfigError, match="holds a list, not a state dict"):
        build_sam("tiny", str(tmp_path / "list.pth"))


def test_wrong_model_type_is_named(tmp_path, tiny):
    path = tmp_path / "tiny.pth"
    torch.save(tiny.state_dict(), path)
    with pytest.raises(ConfigError) as err:
        build_sam("vit_b", str(path))
    msg = str(err.value)
    assert "\n" not in msg and "does not match model type vit_b" in msg
    assert "looks like a tiny checkpoint" in msg and "shape mismatches" in msg
    torch.save({"foo": torch.zeros(1)}, tmp_path / "foo.pth")
    with pytest.raises(ConfigError, match="missing keys.*unexpected keys, e.g. foo"):
        build_sam("tiny", str(tmp_path / "foo.pth"))


def test_guess_model_type():
    assert guess_model_type({"image_encoder.patch_embed.proj.weight": torch.zeros(1024, 3, 16, 16)}) == "vit_l"
    assert guess_model_type({"image_encoder.patch_embed.seq.0.c.weight": torch.zeros(1)}) == "vit_t"
    assert guess_model_type({"x": torch.zeros(1)}) is None


def test_unknown_model_type():
    with pytest.raises(ConfigError, match="'vit_x' is not one of"):
        build_sam("vit_x")


def test_mobile_sam_needs_the_extra_or_builds():
    if importlib.util.find_spec("mobile_sam") is None:
        with pytest.raises(ConfigError, match=r"needs MobileSAM.*mobilesam-mirror==1\.0\.0"):
            build_sam("vit_t")
    else:
        model = build_sam("vit_t")
        assert BatchedSamPredictor(model).input_size == 1024


def _sam_reference(model, image_uint8, coords, labels, boxes=None, mask_input=None, multimask=True):
    """SAM's own predictor on an image already at the model input size (no resize involved)."""
    from segment_anything import SamPredictor
    ref = SamPredictor(model)
    ref.set_image(image_uint8)
    _, iou, low = ref.predict_torch(coords, labels, boxes=boxes, mask_input=mask_input, multimask_output=multimask,
                                    return_logits=True)
    return low, iou


def test_windows_equal_sams_low_res_logits(tiny):
    """Our encode + windowed decode reproduce SamPredictor's low-res logits inside each window."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (256, 192, 3), dtype=np.uint8)      # longest side = input: no resize
    coords = torch.tensor([[[40.0, 50.0], [60.0, 52.0]], [[150.0, 100.0], [0.0, 0.0]], [[10.0, 240.0], [20.0, 230.0]]])
    labels = torch.tensor([[1, 0], [1, -1], [1, 0]])
    boxes = torch.tensor([[30.0, 40.0, 55.0, 60.0], [140.0, 90.0, 160.0, 112.0], [0.0, 225.0, 20.0, 255.0]])
    mask_input = torch.randn(3, 1, 64, 64)
    pred = BatchedSamPredictor(tiny)
    emb = pred.encode(torch.from_numpy(image).permute(2, 0, 1).float() / 255.0)
    origins = torch.tensor([[2, 1], [5, 8], [12, 0]])
    for kwargs in ({}, {"boxes": boxes}, {"mask_input": mask_input, "multimask": False}):
        low, iou = _sam_reference(tiny, image, coords, labels, **kwargs)
        win, iou2 = pred.decode(emb, coords, labels, origins, cells=4, **kwargs)
        assert win.shape == (3, low.shape[1], 16, 16)
        torch.testing.assert_close(iou2, iou, atol=1e-4, rtol=1e-4)
        for b, (r, c) in enumerate((origins * 4).tolist()):
            torch.testing.assert_close(win[b], low[b, :, r:r + 16, c:c + 16], atol=1e-4, rtol=1e-4)


def test_window_is_clamped_into_the_grid(tiny):
    pred = BatchedSamPredictor(tiny)
    emb = pred.encode(torch.rand(3, 256, 256))
    coords, labels = torch.tensor([[[100.0, 100.0]]]), torch.tensor([[1]])
    whole, _ = pred.decode(emb, coords, labels, torch.tensor([[0, 0]]), cells=16)
    edge, _ = pred.decode(emb, coords, labels, torch.tensor([[14, 15]]), cells=4)   # clamped to (12, 12)
    torch.testing.assert_close(edge[0], whole[0, :, 48:64, 48:64])
    assert pred.decode(emb, coords, labels, torch.tensor([[0, 0]]), cells=40)[0].shape[-1] == 64


def test_resize_to_input():
    image = torch.rand(3, 100, 50)
    out = resize_to_input(image, (200, 100))
    assert out.shape == (3, 200, 100)
    assert resize_to_input(image, (100, 50)) is image
    flat = torch.full((3, 40, 60), 0.25)
    torch.testing.assert_close(resize_to_input(flat, (20, 30)), torch.full((3, 20, 30), 0.25))
