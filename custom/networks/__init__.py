"""Networks: Swin-UNETR with attention-gated skips and squeeze-and-excitation, its blocks, and CPU inference speed-ups.

* :mod:`custom.networks.nets.swin_unetr_att_se`: ``SwinUNETRAttSE``;
* :mod:`custom.networks.blocks`: ``SpatialAttentionGate``, ``AttentionSEUpBlock``;
* :mod:`custom.networks.fast_inference`: ``accelerate`` (same weights, faster CPU inference), ``WholeVolumeInferer``.
"""

from custom.networks.blocks import AttentionSEUpBlock, SpatialAttentionGate, squeeze_excitation_layer
from custom.networks.nets import SwinUNETRAttSE

__all__ = ["AttentionSEUpBlock", "SpatialAttentionGate", "SwinUNETRAttSE", "squeeze_excitation_layer"]
