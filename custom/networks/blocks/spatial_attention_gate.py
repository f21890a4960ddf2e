"""Additive attention gate on a skip connection (Oktay et al. 2018, Attention U-Net).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from monai.networks.layers import Conv, get_norm_layer


class SpatialAttentionGate(nn.Module):
    """Additive attention gate on a skip connection (Oktay et al. 2018, "Attention U-Net").

    Given skip features ``x`` ``(B, skip_channels, H, W, D)`` and a gating signal ``g``
    ``(B, gating_channels, H, W, D)`` at the same resolution (the decoder features after upsampling)::

        alpha = sigmoid(psi(relu(norm(W_x x) + norm(W_g g))))    # (B, 1, H, W, D), in (0, 1)
        output = x * alpha

    ``W_x``, ``W_g`` are bias-free 1x1x1 convolutions to ``inter_channels`` (a bias before a normalisation
    is cancelled by it) and ``psi`` is a 1x1x1 convolution to one channel. MONAI's
    ``monai.networks.nets.attentionunet.AttentionBlock`` is the same idea but hard-codes BatchNorm; here the
    normalisation is configurable and defaults to instance norm, because batches are 1-2 volumes per GPU
    (and training uses DDP, where BatchNorm statistics would be per-GPU and unreliable).
    """

    def __init__(
        self,
        spatial_dims: int,
        skip_channels: int,
        gating_channels: int,
        inter_channels: int | None = None,
        norm_name: tuple | str = "instance",
    ) -> None:
        """
        Args:
            spatial_dims: number of spatial dimensions (3 for volumes).
            skip_channels: channels of the skip features ``x``.
            gating_channels: channels of the gating signal ``g``.
            inter_channels: width of the intermediate projection; default ``max(skip_channels // 2, 1)``.
            norm_name: MONAI normalisation name/args applied after each projection, default ``"instance"``.
        """
        super().__init__()
        if inter_channels is None:
            inter_channels = max(skip_channels // 2, 1)
        conv_type = Conv[Conv.CONV, spatial_dims]
        self.skip_proj = nn.Sequential(
            conv_type(skip_channels, inter_channels, kernel_size=1, bias=False),
            get_norm_layer(name=norm_name, spatial_dims=spatial_dims, channels=inter_channels),
        )
        self.gating_proj = nn.Sequential(
            conv_type(gating_channels, inter_channels, kernel_size=1, bias=False),
            get_norm_layer(name=norm_name, spatial_dims=spatial_dims, channels=inter_channels),
        )
        self.relu = nn.ReLU()
        self.psi = conv_type(inter_channels, 1, kernel_size=1, bias=True)

    def attention_coefficients(self, skip: torch.Tensor, gating: torch.Tensor) -> torch.Tensor:
        """The attention map ``alpha`` ``(B, 1, H, W, D)`` with values in (0, 1)."""
        return torch.sigmoid(self.psi(self.relu(self.skip_proj(skip) + self.gating_proj(gating))))

    def forward(self, skip: torch.Tensor, gating: torch.Tensor) -> torch.Tensor:
        """Gated skip features ``skip * alpha``, same shape as ``skip``."""
        return skip * self.attention_coefficients(skip, gating)
