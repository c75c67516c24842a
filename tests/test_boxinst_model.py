"""BoxInst model pieces: aligned_bilinear, the dynamic mask head, the detector forward and post-process."""
from __future__ import annotations

import pytest
import torch

from crowdseg.models.boxinst import (MaskBranch, aligned_bilinear, build_boxinst, compute_locations,
                                     dynamic_mask_logits, dynamic_mask_logits_loop, dynamic_param_count,
                                     dynamic_param_shapes, pad_to, paste_masks, postprocess, relative_coords,
                                     split_dynamic_params)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_boxinst("resnet18", fpn_channels=32, mask_branch_channels=16, mask_branch_convs=1,
                         head_convs=1).eval()


# ------------------------------------------------------------------------------ aligned_bilinear

def test_aligned_bilinear_shapes_and_corner_values():
    x = torch.randn(2, 3, 5, 7)
    for factor in (1, 2, 4, 8):
        y = aligned_bilinear(x, factor)
        assert y.shape == (2, 3, 5 * factor, 7 * factor)
        assert torch.allclose(y[..., 0, 0], x[..., 0, 0])
        assert torch.allclose(y[..., -1, -1], x[..., -1, -1], atol=1e-6)
        assert torch.allclose(y[..., 0, -1], x[..., 0, -1], atol=1e-6)
        assert torch.allclose(y[..., -1, 0], x[..., -1, 0], atol=1e-6)
    with pytest.raises(ValueError):
        aligned_bilinear(x[0], 2)


def test_aligned_bilinear_hand_values():
    a, b, c, d = 1.0, 3.0, 5.0, 11.0
    y = aligned_bilinear(torch.tensor([[[[a, b], [c, d]]]]), 2)[0, 0]
    # pad -> [[a b b] [c d d] [c d d]], resize to 5x5 (align_corners), pad top/left by 1, crop 4x4
    assert y[0].tolist() == [a, a, (a + b) / 2, b]
    assert y[1].tolist() == y[0].tolist()
    assert y[2].tolist() == [(a + c) / 2, (a + c) / 2, (a + b + c + d) / 4, (b + d) / 2]
    assert y[3].tolist() == [c, c, (c + d) / 2, d]


# ---------------------------------------------------------------------------------- dynamic head

def test_dynamic_parameter_count_and_split():
    assert dynamic_param_count(16, 8, 3) == 233
    assert dynamic_param_count(8, 8, 3) == 169
    assert dynamic_param_shapes(16, 8, 3) == ([144, 64, 8], [8, 8, 1])
    params = torch.arange(2 * 233, dtype=torch.float32).reshape(2, 233)
    weights, biases = split_dynamic_params(params, 16, 8, 3)
    assert [tuple(w.shape) for w in weights] == [(16, 18, 1, 1), (16, 8, 1, 1), (2, 8, 1, 1)]
    assert [tuple(b.shape) for b in biases] == [(16,), (16,), (2,)]
    # all weights first, then all biases: instance 1's first weight is params[1, 0], its last bias params[1, 232]
    assert weights[0][8, 0, 0, 0] == params[1, 0]
    assert weights[2][1, -1, 0, 0] == params[1, 215]
    assert biases[0][0] == params[0, 216] and biases[2][1] == params[1, 232]
    with pytest.raises(ValueError):
        split_dynamic_params(params[:, :200])


def test_relative_coords_hand_values():
    rel = relative_coords(torch.tensor([[12.0, 4.0]]), 2, 3, 8, torch.tensor([64.0]))
    assert rel.shape == (1, 2, 2, 3)
    # pixel (0, 0) sits at (4, 4): ((12 - 4) / 64, 0); pixel (1, 2) at (20, 12): (-8 / 64, -8 / 64)
    assert rel[0, :, 0, 0].tolist() == [0.125, 0.0]
    assert rel[0, :, 1, 2].tolist() == [-0.125, -0.125]


def test_dynamic_head_hand_value_and_grouped_equals_loop():
    feats = torch.randn(2, 16, 5, 6)
    # zero weights and last bias 3: every logit is 3, whatever the input
    params = torch.zeros(1, 233)
    params[0, 232] = 3.0
    out = dynamic_mask_logits(feats, 8, params, torch.tensor([1]), torch.tensor([[20.0, 12.0]]), torch.tensor([64.0]))
    assert torch.allclose(out, torch.full((1, 5, 6), 3.0))
    # random parameters: one grouped convolution == one instance at a time
    torch.manual_seed(0)
    n = 7
    params = torch.randn(n, 233)
    image_index = torch.randint(0, 2, (n,))
    locations = torch.rand(n, 2) * 40
    soi = torch.tensor([64.0, 128.0, 256.0, 64.0, 64.0, 512.0, 1024.0])
    grouped = dynamic_mask_logits(feats, 8, params, image_index, locations, soi)
    loop = dynamic_mask_logits_loop(feats, 8, params, image_index, locations, soi)
    assert grouped.shape == (n, 5, 6)
    assert torch.allclose(grouped, loop, atol=1e-5)
    assert dynamic_mask_logits(feats, 8, params[:0], image_index[:0], locations[:0], soi[:0]).shape == (0, 5, 6)


def test_mask_branch_output_stride_8():
    branch = MaskBranch(32, channels=16, num_convs=1, out_channels=16)
    feats = [torch.randn(2, 32, 8, 12), torch.randn(2, 32, 4, 6), torch.randn(2, 32, 2, 3)]
    assert branch(feats).shape == (2, 16, 8, 12)


# ------------------------------------------------------------------------------------- detector

def test_compute_locations():
    loc = compute_locations(2, 3, 8)
    assert loc.tolist() == [[4, 4], [12, 4], [20, 4], [4, 12], [12, 12], [20, 12]]


def test_forward_shapes_and_mask_logits(tiny_model):
    images = pad_to(torch.rand(2, 3, 60, 90))
    assert images.shape[-2:] == (64, 96)
    with torch.no_grad():
        out = tiny_model(images)
    m = sum((64 // s) * (96 // s) for s in (8, 16, 32)) + 1 * 2 + 1 * 1  # P6 1x2, P7 1x1
    assert out["cls_logits"].shape == (2, m, 1)
    assert out["box_ltrb"].shape == (2, m, 4) and (out["box_ltrb"] >= 0).all()
    assert out["ctrness"].shape == (2, m)
    assert out["params"].shape == (2, m, 233)
    assert out["mask_feats"].shape == (2, 16, 8, 12)
    assert out["locations"].shape == (m, 2) and out["levels"].max() == 4
    logits = tiny_model.mask_logits(out, torch.tensor([0, 1, 1]), torch.tensor([0, 5, m - 1]))
    assert logits.shape == (3, 16, 24)
    with pytest.raises(ValueError):
        tiny_model(torch.rand(1, 3, 60, 90))


def test_postprocess_keeps_location_index_and_nms(tiny_model):
    locations = compute_locations(4, 4, 8)
    m = len(locations)
    cls = torch.full((1, m, 1), -10.0)
    cls[0, [5, 6, 10], 0] = torch.tensor([5.0, 4.0, 3.0])
    ltrb = torch.full((1, m, 4), 6.0)
    outputs = {"cls_logits": cls, "box_ltrb": ltrb, "ctrness": torch.full((1, m), 10.0), "locations": locations,
               "levels": torch.zeros(m, dtype=torch.long)}
    det = postprocess(outputs, torch.tensor([[32, 32]]), nms_threshold=0.6)[0]
    # 5 (12, 12) and 6 (20, 12) overlap with IoU 4*12 / (2*144 - 48) = 0.2 < 0.6: both kept; 10 too
    assert det["locations"].tolist() == [5, 6, 10]
    assert det["boxes"][0].tolist() == [6.0, 6.0, 18.0, 18.0]
    assert torch.allclose(det["scores"][0], torch.sqrt(torch.sigmoid(torch.tensor(5.0)) * torch.sigmoid(torch.tensor(10.0))))
    det = postprocess(outputs, torch.tensor([[32, 32]]), nms_threshold=0.1)[0]
    assert det["locations"].tolist() == [5, 10]  # 6 suppressed by 5
    det = postprocess(outputs, torch.tensor([[12, 32]]))[0]  # locations below row 12 are padding
    assert det["locations"].tolist() == []


def test_paste_masks_chunks_and_sizes():
    logits = torch.randn(5, 4, 6)
    full = paste_masks(logits, (14, 22), (28, 44), chunk=100)
    chunked = paste_masks(logits, (14, 22), (28, 44), chunk=2)
    assert full.shape == (5, 28, 44) and full.dtype == torch.bool
    assert torch.equal(full, chunked)
    same = paste_masks(logits, (16, 24), (16, 24))
    assert torch.equal(same, aligned_bilinear(logits[:, None].sigmoid(), 4)[:, 0] > 0.5)


def test_timm_backbone_by_name():
    model = build_boxinst("resnet10t", fpn_channels=32, mask_branch_channels=16, mask_branch_convs=1,
                          head_convs=1).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 64, 64))  # a 1x1 P7: GroupNorm keeps 2 channels per group
    assert out["mask_feats"].shape == (1, 16, 8, 8)


def test_dynamic_head_bmm_equals_grouped():
    from crowdseg.models.boxinst import dynamic_mask_logits_bmm

    torch.manual_seed(1)
    feats = torch.randn(2, 16, 4, 5)
    params = torch.randn(6, 233)
    args = (feats, 8, params, torch.tensor([0, 1, 1, 0, 1, 0]), torch.rand(6, 2) * 30, torch.full((6,), 64.0))
    assert torch.allclose(dynamic_mask_logits_bmm(*args), dynamic_mask_logits(*args), atol=1e-5)


def test_predict_masks_chunked_equals_all_at_once(tiny_model):
    from crowdseg.models.boxinst import predict_masks

    with torch.no_grad():
        out = tiny_model(torch.rand(1, 3, 64, 64))
        locations = torch.tensor([0, 3, 7, 20, 40])
        a = predict_masks(tiny_model, out, 0, locations, (60, 62), (120, 124), chunk=2)
        b = predict_masks(tiny_model, out, 0, locations, (60, 62), (120, 124), chunk=100)
    assert a.shape == (5, 120, 124) and torch.equal(a, b)
