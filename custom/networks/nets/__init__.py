from custom.networks.nets.swin_unetr_att_se import SwinUNETRAttSE

__all__ = ["SwinUNETRAttSE"]
