"""Swin-UNETR decoder block with an optional attention-gated skip and squeeze-and-excitation output.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from monai.networks.blocks import ChannelSELayer, UnetrUpBlock

from custom.networks.blocks.spatial_attention_gate import SpatialAttentionGate


def squeeze_excitation_layer(spatial_dims: int, channels: int, reduction: int) -> ChannelSELayer:
    """MONAI ``ChannelSELayer`` on ``channels`` channels; the reduction ratio is capped at ``channels`` so the
    squeezed width ``channels // reduction`` is at least 1."""
    if reduction < 1:
        raise ValueError(f"squeeze-and-excitation reduction ratio must be >= 1, got {reduction}.")
    return ChannelSELayer(spatial_dims=spatial_dims, in_channels=channels, r=min(reduction, channels))


class AttentionSEUpBlock(nn.Module):
    """Swin-UNETR decoder block (MONAI ``UnetrUpBlock``) with an optional attention gate and SE output.

    ``forward(inp, skip)``: ``inp`` ``(B, C_in, h, w, d)`` is upsampled by ``transp_conv`` to
    ``g`` ``(B, C, 2h, 2w, 2d)``; the skip ``(B, C, 2h, 2w, 2d)`` is multiplied by ``attention_gate(skip, g)``;
    ``conv_block`` fuses ``cat(g, skip)``; ``se`` recalibrates the ``(B, C, 2h, 2w, 2d)`` output.
    ``transp_conv`` and ``conv_block`` are taken over from the ``UnetrUpBlock`` being replaced, so their
    state-dict keys are unchanged; without gate and SE the block computes exactly what ``UnetrUpBlock`` does.
    """

    def __init__(
        self,
        up_block: UnetrUpBlock,
        spatial_dims: int,
        channels: int,
        spatial_attention: bool = True,
        squeeze_excitation: bool = True,
        se_reduction: int = 4,
        norm_name: tuple | str = "instance",
    ) -> None:
        """
        Args:
            up_block: the ``UnetrUpBlock`` whose ``transp_conv`` and ``conv_block`` are reused.
            spatial_dims: number of spatial dimensions.
            channels: output channels of ``up_block`` (= channels of the skip and of the upsampled features).
            spatial_attention: add an attention gate on the skip connection.
            squeeze_excitation: add channel squeeze-and-excitation on the block output.
            se_reduction: SE reduction ratio.
            norm_name: normalisation used in the attention gate.
        """
        super().__init__()
        self.transp_conv = up_block.transp_conv
        self.conv_block = up_block.conv_block
        self.attention_gate: SpatialAttentionGate | None = (
            SpatialAttentionGate(spatial_dims, channels, channels, norm_name=norm_name) if spatial_attention else None
        )
        self.se: nn.Module = (
            squeeze_excitation_layer(spatial_dims, channels, se_reduction) if squeeze_excitation else nn.Identity()
        )

    def forward(self, inp: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        upsampled = self.transp_conv(inp)
        if self.attention_gate is not None:
            skip = self.attention_gate(skip, upsampled)
        out = self.conv_block(torch.cat((upsampled, skip), dim=1))
        return self.se(out)
