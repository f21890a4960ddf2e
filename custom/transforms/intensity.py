"""``ZeroBackground(d)``: a constant non-zero background (z-scored images) set to 0.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

from custom.data import (
    MODALITIES,
    case_id_from_path,
)

logger = logging.getLogger(__name__)


class ZeroBackground(Transform):
    """Set a constant non-zero background to 0, channel by channel: image ``(C, H, W, D)`` -> same shape.

    Skull-stripped MRI z-scored before release (e.g. BraTS 2015 as redistributed with DeepMedic,
    ``*_subtrMeanDivStd.nii.gz``) has the brain z-scored and everything outside it set to one value,
    the image minimum (e.g. -3.16); the pipeline assumes a zero background (``CropForegroundd``
    selects x > 0, ``NormalizeIntensityd(nonzero=True)`` normalises the non-zero voxels). For each
    channel: if its 8 corner voxels all equal one value v, v is the channel's minimum and v != 0,
    the voxels equal to v become 0; other voxels, and every channel whose background is already 0
    (standard int16 BraTS data), are unchanged. Runs right after loading, before any resampling
    (which would blend the constant into the brain border). Returns the channels changed in
    ``last_changed`` ``{channel: v}``.
    """

    def __init__(self) -> None:
        self.last_changed: dict[int, float] = {}

    def __call__(self, img):
        self.last_changed = {}
        if img.ndim != 4:
            raise ValueError(f"expected a (C, H, W, D) image, got shape {tuple(img.shape)}")
        t = img if isinstance(img, torch.Tensor) else torch.as_tensor(np.asarray(img))
        out = None
        for c in range(t.shape[0]):
            x = t[c]
            corners = torch.as_tensor(x[[0, -1]][:, [0, -1]][:, :, [0, -1]]).reshape(-1)
            v = corners[0]
            if not bool((corners == v).all()) or float(v) == 0 or bool((x < v).any()):
                continue
            if out is None:
                out = t.clone()
            out[c] = torch.where(x == v, torch.zeros_like(x), x)
            self.last_changed[c] = float(v)
        if out is None:
            return img
        return out if isinstance(img, torch.Tensor) else out.numpy()


class ZeroBackgroundd(MapTransform):
    """Dictionary version of :class:`ZeroBackground`; logs each case whose background it changed."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.converter = ZeroBackground()

    def __call__(self, data: Mapping[Hashable, torch.Tensor | np.ndarray]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.converter(d[key])
            if self.converter.last_changed:
                name = d[key].meta.get("filename_or_obj") if isinstance(d[key], MetaTensor) else None
                case = d.get("case_id") or (case_id_from_path(name) if name else key)
                changed = ", ".join(f"channel {c} ({MODALITIES[c] if d[key].shape[0] == len(MODALITIES) else c}): {v:.4g}"
                                    for c, v in self.converter.last_changed.items())
                logger.info(f"case {case}: constant background set to 0 ({changed})")
        return d
