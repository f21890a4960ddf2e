"""``custom.networks.fast_inference``: the grouped shifted-window masks equal MONAI's dense mask, and an
accelerated network keeps its parameters and computes what the MONAI network computes (to float32
rounding with gradients off, bit for bit with gradients on)."""

from __future__ import annotations

import copy

import pytest
import torch
from monai.networks.nets import SwinUNETR, UNet
from monai.networks.nets.swin_unetr import compute_mask

from custom.networks import SwinUNETRAttSE
from custom.networks.fast_inference import FastBasicLayer, FastPointwiseConv3d, FastUpsampleConvTranspose3d, FastWindowAttention, accelerate, window_groups


@pytest.mark.parametrize("dims,shift", [((35, 35, 35), (3, 3, 3)), ((70, 63, 42), (3, 3, 3)), ((14, 7, 21), (3, 0, 3)),
                                        ((7, 7, 7), (0, 0, 0))])
def test_window_groups_reproduce_monai_mask(dims, shift):
    dense = compute_mask(list(dims), (7, 7, 7), shift, torch.device("cpu"))
    groups = window_groups(dims, (7, 7, 7), shift, "cpu")
    assert groups.num_windows == dense.shape[0]
    order = torch.arange(groups.num_windows) if groups.order is None else groups.order
    assert torch.equal(torch.sort(order).values, torch.arange(groups.num_windows))
    if groups.inverse is not None:
        assert torch.equal(order[groups.inverse], torch.arange(groups.num_windows))
    assert groups.groups[0][0] == 0 and groups.groups[-1][1] == groups.num_windows
    for (start, stop, mask), nxt in zip(groups.groups, [*groups.groups[1:], None]):
        assert nxt is None or nxt[0] == stop
        idx = order[start:stop]
        if mask is None:
            assert not dense[idx].any()
        else:
            assert torch.equal(dense[idx], mask.expand_as(dense[idx]))


@pytest.mark.parametrize("make", [
    lambda: SwinUNETRAttSE(feature_size=12, depths=(1, 1, 1, 1), dropout_prob=0.1),
    lambda: SwinUNETR(in_channels=4, out_channels=3, feature_size=12, depths=(1, 1, 1, 1), use_flash_attention=True),
])
def test_accelerate_keeps_parameters_and_outputs(make):
    torch.manual_seed(0)
    ref = make().eval()
    fast = accelerate(copy.deepcopy(ref))
    kinds = {type(m) for m in fast.modules()}
    assert {FastBasicLayer, FastWindowAttention, FastPointwiseConv3d, FastUpsampleConvTranspose3d} <= kinds
    assert list(fast.state_dict()) == list(ref.state_dict())
    fast.load_state_dict(ref.state_dict())  # a checkpoint loads after the swap
    x = torch.randn(2, 4, 64, 64, 64)  # batch 2: windows of two patches in one attention call
    with torch.no_grad():
        a, b = ref(x), fast(x)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x[:1]), a[:1], rtol=1e-4, atol=1e-5)
    # with gradients on (training) the swapped modules run MONAI's own code: bit-identical
    y_ref, y_fast = ref(x[:1]), fast(x[:1])
    assert torch.equal(y_ref, y_fast)
    y_fast.sum().backward()
    assert all(p.grad is not None for p in fast.parameters() if p.requires_grad)


def test_accelerate_leaves_other_networks_exact():
    torch.manual_seed(0)
    unet = UNet(3, 4, 3, channels=(8, 16, 32), strides=(2, 2), num_res_units=2).eval()
    fast = accelerate(copy.deepcopy(unet))
    x = torch.randn(1, 4, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), unet(x), rtol=1e-4, atol=1e-5)
    no_flash = accelerate(SwinUNETR(in_channels=4, out_channels=3, feature_size=12, depths=(1, 1, 1, 1), use_flash_attention=False))
    assert not any(isinstance(m, (FastWindowAttention, FastBasicLayer)) for m in no_flash.modules())
