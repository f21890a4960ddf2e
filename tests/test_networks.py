"""Tests for custom.networks.SwinUNETRAttSE on tiny configurations (CPU, a few seconds in total)."""

from __future__ import annotations

import pytest
import torch
from monai.networks.blocks import ChannelSELayer
from monai.networks.nets import SwinUNETR

from custom.networks import AttentionSEUpBlock, SpatialAttentionGate, SwinUNETRAttSE

torch.set_num_threads(min(2, torch.get_num_threads()))

# Tiny hyper-parameters shared by our network and the MONAI reference.
TINY = dict(
    in_channels=4,
    out_channels=3,
    feature_size=12,
    depths=(1, 1, 1, 1),
    num_heads=(1, 2, 2, 4),
    use_flash_attention=True,
)
# Smallest valid volume: multiples of 32, and >1 bottleneck voxel for instance norm.
SMALL_SHAPE = (64, 32, 32)
FLAGS_OFF = dict(spatial_attention=False, squeeze_excitation=False)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def n_params_of(net: torch.nn.Module, module_type: type) -> int:
    return sum(n_params(m) for m in net.modules() if isinstance(m, module_type))


def is_new_module_key(key: str) -> bool:
    """State-dict keys of modules that MONAI's SwinUNETR does not have."""
    return key.startswith("encoder_se.") or ".attention_gate." in key or (key.startswith("decoder") and ".se." in key)


@pytest.fixture(scope="module")
def default_net() -> SwinUNETRAttSE:
    torch.manual_seed(0)
    return SwinUNETRAttSE(**TINY).eval()


@pytest.mark.parametrize("spatial", [(64, 32, 32), (32, 64, 32), (32, 64, 96)])
@pytest.mark.parametrize("batch", [1, 2])
def test_output_shape(default_net, spatial, batch):
    torch.manual_seed(0)
    x = torch.randn(batch, 4, *spatial)
    with torch.no_grad():
        y = default_net(x)
    assert y.shape == (batch, 3, *spatial)
    assert torch.isfinite(y).all()


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    # se_reduction=1: with feature_size=12 and the default ratio 4 an SE layer has only 3 hidden ReLU units, which
    # can all be inactive for a given input (zero gradient into that layer's first linear). At feature_size=48
    # the narrowest SE has 12 hidden units, which se_reduction=1 reproduces here.
    net = SwinUNETRAttSE(**TINY, dropout_prob=0.1, se_reduction=1).train()
    loss = net(torch.randn(1, 4, *SMALL_SHAPE)).square().mean()
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    new_params = [(n, p) for n, p in net.named_parameters() if is_new_module_key(n)]
    assert new_params
    for name, p in new_params:
        assert p.grad.abs().sum() > 0, f"zero gradient for new parameter {name}"


def test_parameter_counts():
    torch.manual_seed(0)
    reference = n_params(SwinUNETR(**TINY))
    plain = SwinUNETRAttSE(**TINY, **FLAGS_OFF)
    attention = SwinUNETRAttSE(**TINY, spatial_attention=True, squeeze_excitation=False)
    se = SwinUNETRAttSE(**TINY, spatial_attention=False, squeeze_excitation=True)
    both = SwinUNETRAttSE(**TINY)

    assert n_params(plain) == reference
    gate_extra = n_params_of(attention, SpatialAttentionGate)
    se_extra = n_params_of(se, ChannelSELayer)
    assert gate_extra > 0 and se_extra > 0
    assert n_params(attention) == reference + gate_extra
    assert n_params(se) == reference + se_extra
    assert n_params(both) == reference + gate_extra + se_extra

    # one gate per skip connection, SE after 5 encoder blocks and 5 decoder blocks
    assert sum(isinstance(m, SpatialAttentionGate) for m in both.modules()) == 5
    assert sum(isinstance(m, ChannelSELayer) for m in both.modules()) == 10
    # gate size by hand: two bias-free 1x1x1 projections C -> C//2, psi C//2 -> 1 with bias, parameter-free norm
    c = 8 * TINY["feature_size"]
    assert n_params(both.decoder5.attention_gate) == 2 * c * (c // 2) + c // 2 + 1


def test_se_reduction_is_capped_so_squeezed_width_is_positive():
    net = SwinUNETRAttSE(**TINY, se_reduction=1000)
    se_layers = [m for m in net.modules() if isinstance(m, ChannelSELayer)]
    assert se_layers and all(m.fc[0].out_features >= 1 for m in se_layers)


def test_constructor_passes_swinunetr_arguments_through():
    net = SwinUNETRAttSE(**{**TINY, "use_flash_attention": False}, use_v2=True, drop_rate=0.1)
    assert net.swinViT.use_v2
    attentions = [m for m in net.swinViT.modules() if hasattr(m, "use_flash_attention")]
    assert attentions and not any(m.use_flash_attention for m in attentions)
    default_attention = SwinUNETRAttSE(feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4))
    assert default_attention.swinViT.layers1[0].blocks[0].attn.use_flash_attention, "should default to True"


def test_flags_off_is_monai_swinunetr():
    torch.manual_seed(0)
    reference = SwinUNETR(**TINY).eval()
    net = SwinUNETRAttSE(**TINY, **FLAGS_OFF).eval()
    assert set(net.state_dict()) == set(reference.state_dict())
    net.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 4, *SMALL_SHAPE)
    with torch.no_grad():
        assert torch.allclose(net(x), reference(x), rtol=0, atol=1e-6)


def test_flags_on_loads_monai_state_dict_non_strictly():
    torch.manual_seed(0)
    reference = SwinUNETR(**TINY)
    net = SwinUNETRAttSE(**TINY, dropout_prob=0.2)
    result = net.load_state_dict(reference.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys, "gate/SE keys should be missing from a MONAI checkpoint"
    assert all(is_new_module_key(k) for k in result.missing_keys), result.missing_keys
    assert set(result.missing_keys) == {k for k in net.state_dict() if is_new_module_key(k)}
    loaded = net.state_dict()
    for key, value in reference.state_dict().items():
        assert torch.equal(loaded[key], value), key
    assert any(k.startswith("swinViT.") for k in reference.state_dict())


def test_mc_dropout():
    torch.manual_seed(0)
    net = SwinUNETRAttSE(**TINY, dropout_prob=0.5).eval()
    x = torch.randn(1, 4, *SMALL_SHAPE)
    with torch.no_grad():
        assert torch.equal(net(x), net(x))
        net.enable_mc_dropout()
        assert net.output_dropout.training
        assert not net.training and not net.encoder1.training, "only dropout modules may be in train mode"
        assert not torch.allclose(net(x), net(x))
        net.eval()
        assert torch.equal(net(x), net(x))


def test_zero_dropout_is_identity():
    assert isinstance(SwinUNETRAttSE(**TINY).output_dropout, torch.nn.Identity)
    assert isinstance(SwinUNETRAttSE(**TINY, dropout_prob=0.3).output_dropout, torch.nn.Dropout3d)


@pytest.mark.parametrize(
    "shape, message",
    [
        ((1, 3, *SMALL_SHAPE), r"expects 4 input channels, got 3 \(input shape \(1, 3, 64, 32, 32\)\)"),
        ((1, 4, 64, 48, 32), r"W=48 .*must be multiples of 32"),
        ((1, 4, 33, 32, 40), r"H=33, D=40 .*must be multiples of 32"),
        ((4, *SMALL_SHAPE), r"expects a 5D input \(B, C, H, W, D\), got a 4D tensor"),
        ((1, 4, 32, 32, 32), r"single-voxel bottleneck"),
    ],
)
def test_invalid_input_raises(default_net, shape, message):
    with pytest.raises(ValueError, match=message):
        default_net(torch.zeros(shape))


@pytest.mark.parametrize("kwargs", [dict(dropout_prob=1.0), dict(dropout_prob=-0.1), dict(se_reduction=0)])
def test_invalid_constructor_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        SwinUNETRAttSE(**TINY, **kwargs)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_new_blocks_are_scriptable(default_net):
    """The added blocks script; the full network does not because MONAI's Swin transformer does not (see report)."""
    x = torch.randn(1, 8 * TINY["feature_size"], 4, 2, 2)
    skip = torch.randn(1, 4 * TINY["feature_size"], 8, 4, 4)
    block = default_net.decoder4
    assert isinstance(block, AttentionSEUpBlock)
    scripted = torch.jit.script(block)
    with torch.no_grad():
        assert torch.allclose(scripted(x, skip), block(x, skip), atol=1e-6)


@pytest.mark.filterwarnings("ignore")
def test_traced_network_matches_eager(default_net):
    x = torch.randn(1, 4, *SMALL_SHAPE)
    with torch.no_grad():
        traced = torch.jit.trace(default_net, x)
        assert torch.allclose(traced(x), default_net(x), atol=1e-5)
        x2 = torch.randn(2, 4, *SMALL_SHAPE)  # a traced Swin is fixed to its spatial shape, not its batch size
        assert torch.allclose(traced(x2), default_net(x2), atol=1e-5)
