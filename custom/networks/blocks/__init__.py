from custom.networks.blocks.attention_se_upblock import AttentionSEUpBlock, squeeze_excitation_layer
from custom.networks.blocks.spatial_attention_gate import SpatialAttentionGate

__all__ = ["AttentionSEUpBlock", "SpatialAttentionGate", "squeeze_excitation_layer"]
