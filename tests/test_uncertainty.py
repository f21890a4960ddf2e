"""Tests for SwinUNETRAttSE.decode / forward_mc and custom.uncertainty (tiny network on CPU, a few seconds)."""

from __future__ import annotations

import math

import pytest
import torch

from custom.networks import SwinUNETRAttSE
from custom.uncertainty import bernoulli_entropy, mc_uncertainty, mean_logit, split_samples

torch.set_num_threads(min(2, torch.get_num_threads()))

TINY = dict(in_channels=4, out_channels=3, feature_size=12, depths=(1, 1, 1, 1), num_heads=(3, 6, 12, 24))
SHAPE = (1, 4, 64, 32, 32)
C = TINY["out_channels"]


def tiny_net(**kwargs) -> SwinUNETRAttSE:
    torch.manual_seed(0)
    return SwinUNETRAttSE(**{**TINY, "dropout_prob": 0.5, **kwargs}).eval()


@pytest.fixture(scope="module")
def net() -> SwinUNETRAttSE:
    return tiny_net()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(*SHAPE, generator=torch.Generator().manual_seed(1))


def old_forward(net: SwinUNETRAttSE, x_in: torch.Tensor) -> torch.Tensor:
    """The forward computation as it was before the decode/forward split."""
    hidden_states_out = net.swinViT(x_in, net.normalize)
    enc0 = net.encoder_se["encoder1"](net.encoder1(x_in))
    enc1 = net.encoder_se["encoder2"](net.encoder2(hidden_states_out[0]))
    enc2 = net.encoder_se["encoder3"](net.encoder3(hidden_states_out[1]))
    enc3 = net.encoder_se["encoder4"](net.encoder4(hidden_states_out[2]))
    dec4 = net.encoder_se["encoder10"](net.encoder10(hidden_states_out[4]))
    dec3 = net.decoder5(dec4, hidden_states_out[3])
    dec2 = net.decoder4(dec3, enc3)
    dec1 = net.decoder3(dec2, enc2)
    dec0 = net.decoder2(dec1, enc1)
    out = net.decoder1(dec0, enc0)
    return net.out(net.output_dropout(out))


def count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def modes(net: torch.nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in net.named_modules()}


# --- decode / forward ---------------------------------------------------------------------------------------------


def test_forward_unchanged_by_decode_split(net, x):
    with torch.no_grad():
        y = net(x)
        features = net.decode(x)
        assert features.shape == (1, TINY["feature_size"], *SHAPE[2:])
        assert torch.equal(y, old_forward(net, x))
        assert torch.equal(y, net.out(features))  # eval mode: output_dropout is the identity


def test_decode_validates_input(net):
    with pytest.raises(ValueError, match="expects 4 input channels"):
        net.decode(torch.zeros(1, 3, 64, 32, 32))


# --- forward_mc, output-dropout path ------------------------------------------------------------------------------


def test_forward_mc_decodes_once_and_matches_full_mc_passes(x):
    """Same seed: forward_mc == `samples` enable_mc_dropout forward passes (same masks, sample-major order)."""
    net = tiny_net()
    before = modes(net)
    encoder_calls = count_calls(net.swinViT)
    with torch.no_grad():
        torch.manual_seed(7)
        mc = net.forward_mc(x, samples=4)
        assert encoder_calls[0] == 1, "decoder features must be computed once"
        assert modes(net) == before, "forward_mc must not change module modes"
        assert torch.equal(net(x), net(x)), "network must stay deterministic after forward_mc"
        net.enable_mc_dropout()
        torch.manual_seed(7)
        reference = torch.cat([net(x) for _ in range(4)], dim=1)
        net.eval()
    assert mc.shape == (1, 4 * C, *SHAPE[2:])
    assert torch.allclose(mc, reference, rtol=0, atol=1e-6)


def test_forward_mc_samples_differ_and_average_to_deterministic_logits(net, x):
    samples = 128
    torch.manual_seed(3)
    with torch.no_grad():
        deterministic = net(x)
        mc = split_samples(net.forward_mc(x, samples=samples), samples)
    assert mc.shape == (1, samples, C, *SHAPE[2:])
    assert not torch.allclose(mc[:, 0], mc[:, 1])
    # Dropout3d rescales kept channels by 1/(1-p) and out is affine, so E[sample] = deterministic logits; the
    # error of the mean of S independent samples shrinks like 1/sqrt(S) relative to one sample's error.
    single_error = (mc - deterministic.unsqueeze(1)).square().mean().sqrt()
    mean_error = (mc.mean(dim=1) - deterministic).square().mean().sqrt()
    ratio = (mean_error / single_error).item()
    assert single_error > 0.1 * deterministic.abs().mean()
    assert ratio < 2.5 / math.sqrt(samples), ratio


def test_forward_mc_works_in_train_mode(x):
    net = tiny_net().train()
    with torch.no_grad():
        mc = split_samples(net.forward_mc(x, samples=2), 2)
    assert not torch.allclose(mc[:, 0], mc[:, 1])
    assert net.training and net.output_dropout.training


# --- forward_mc, transformer-dropout fallback ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs", [dict(drop_rate=0.1), dict(drop_rate=0.1, dropout_prob=0.0), dict(attn_drop_rate=0.2, dropout_prob=0.0)]
)
def test_forward_mc_fallback_with_transformer_dropout(x, kwargs):
    net = tiny_net(**kwargs)
    net.encoder1.train()  # mixed modes, to check that they are restored
    before = modes(net)
    flash_before = [m.use_flash_attention for m in net.modules() if hasattr(m, "use_flash_attention")]
    encoder_calls = count_calls(net.swinViT)
    with torch.no_grad():
        mc = net.forward_mc(x, samples=3)
    assert encoder_calls[0] == 3, "transformer dropout needs full forward passes"
    assert mc.shape == (1, 3 * C, *SHAPE[2:])
    split = split_samples(mc, 3)
    assert not torch.allclose(split[:, 0], split[:, 1]), "samples must differ"
    assert modes(net) == before
    assert [m.use_flash_attention for m in net.modules() if hasattr(m, "use_flash_attention")] == flash_before


# --- forward_mc errors ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("samples", [1, 0, -2])
def test_forward_mc_needs_two_samples(net, x, samples):
    with pytest.raises(ValueError, match="samples >= 2"):
        net.forward_mc(x, samples=samples)


def test_forward_mc_needs_dropout(x):
    with pytest.raises(ValueError, match=r"MC dropout needs dropout_prob > 0"):
        tiny_net(dropout_prob=0.0).forward_mc(x, samples=4)


def test_forward_mc_validates_input(net):
    with pytest.raises(ValueError, match="single-voxel bottleneck"):
        net.forward_mc(torch.zeros(1, 4, 32, 32, 32), samples=2)


# --- custom.uncertainty -------------------------------------------------------------------------------------------


def test_split_samples_is_sample_major():
    logits = torch.arange(2 * 4 * C * 5, dtype=torch.float32).view(2, 4 * C, 5)
    split = split_samples(logits, 4)
    assert split.shape == (2, 4, C, 5)
    for s in range(4):
        assert torch.equal(split[:, s], logits[:, s * C : (s + 1) * C])
    with pytest.raises(ValueError):
        split_samples(logits, 5)


def test_bernoulli_entropy_values():
    p = torch.tensor([0.0, 0.5, 1.0, 0.1, 0.9])
    h01 = -(0.1 * math.log(0.1) + 0.9 * math.log(0.9))  # 0.325083
    expected = torch.tensor([0.0, math.log(2), 0.0, h01, h01])
    h = bernoulli_entropy(p)
    assert not torch.isnan(h).any()
    assert torch.allclose(h, expected, atol=1e-6)
    assert abs(h01 - 0.3250830) < 1e-6


def test_mutual_information_zero_when_samples_agree():
    torch.manual_seed(0)
    one = torch.randn(2, C, 4, 4, 4)
    out = mc_uncertainty(one.repeat(1, 5, 1, 1, 1), samples=5)
    assert out["mean_prob"].shape == (2, C, 4, 4, 4)
    for key in ("predictive_entropy", "expected_entropy", "mutual_information"):
        assert out[key].shape == (2, 1, 4, 4, 4)
    assert torch.allclose(out["mean_prob"], torch.sigmoid(one), atol=1e-6)
    assert torch.allclose(out["predictive_entropy"], bernoulli_entropy(torch.sigmoid(one)).sum(1, keepdim=True))
    assert out["mutual_information"].abs().max() < 1e-5


def test_mutual_information_positive_when_samples_disagree():
    # two samples with logits +3 and -3 in every region: mean probability 0.5
    logits = torch.cat([torch.full((1, C, 2, 2), 3.0), torch.full((1, C, 2, 2), -3.0)], dim=1)
    out = mc_uncertainty(logits, samples=2)
    p = 1 / (1 + math.exp(-3))
    h_sample = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    assert torch.allclose(out["mean_prob"], torch.full((1, C, 2, 2), 0.5))
    assert torch.allclose(out["predictive_entropy"], torch.full((1, 1, 2, 2), C * math.log(2)))
    assert torch.allclose(out["expected_entropy"], torch.full((1, 1, 2, 2), C * h_sample))
    assert torch.allclose(out["mutual_information"], torch.full((1, 1, 2, 2), C * (math.log(2) - h_sample)))
    assert (out["mutual_information"] > 0.5).all()


def test_mc_uncertainty_on_network_samples(net, x):
    torch.manual_seed(5)
    with torch.no_grad():
        out = mc_uncertainty(net.forward_mc(x, samples=4), samples=4)
    mi, pe = out["mutual_information"], out["predictive_entropy"]
    assert mi.shape == pe.shape == (1, 1, *SHAPE[2:])
    assert torch.isfinite(mi).all() and (mi >= 0).all() and (mi > 0).any()
    assert (pe <= C * math.log(2) + 1e-5).all() and (mi <= pe + 1e-6).all()


def test_mean_logit_round_trip():
    p = torch.tensor([0.0, 1e-8, 0.2, 0.5, 0.9, 1.0])
    logits = mean_logit(p)
    assert torch.isfinite(logits).all()
    assert torch.allclose(torch.sigmoid(logits), p.clamp(1e-6, 1 - 1e-6), atol=1e-7)
    assert torch.allclose(torch.sigmoid(mean_logit(p[2:5])), p[2:5], atol=1e-6)
    assert mean_logit(torch.tensor(0.5)).item() == 0.0
    with pytest.raises(ValueError):
        mean_logit(p, eps=0.0)
