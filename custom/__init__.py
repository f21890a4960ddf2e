"""Brain-tumour segmentation with an attention/SE Swin-UNETR: network, BraTS data layer,
transforms and utilities referenced by the MONAI Bundle in ``bundle/`` and the MONAI Label app."""
