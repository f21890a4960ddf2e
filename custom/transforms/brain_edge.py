"""The brain's edge in skull-stripped input: ``TrimBrainEdge(d)`` and ``NormalizeBrainCore(d)``.

A skull-stripped image resampled once more (a tilted series brought onto a grid, a registration,
a re-acquisition) gains a rim of partial-volume voxels where the brain meets the zero background,
darker than any tissue and about a voxel thick. Z-scored over every non-zero voxel
(``NormalizeIntensityd(nonzero=True)``), that rim lowers the mean and raises the standard
deviation, which shifts every tissue's normalised intensity. ``TrimBrainEdge``
removes the outer ``margin_mm`` of the brain (before resampling to the model grid);
``NormalizeBrainCore`` takes each channel's mean and standard deviation from the voxels at least
``depth_mm`` inside the brain, so the rim that resampling to the model grid adds does not count.
The brain is every voxel that is non-zero in some channel, holes filled. With 0 mm both are what
the bundle did before (no trim; ``NormalizeIntensityd(nonzero=True, channel_wise=True)``).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, NormalizeIntensity, Transform
from scipy import ndimage as ndi


def voxel_size_mm(img) -> np.ndarray:
    """Voxel size (3,) in mm of a ``(C, H, W, D)`` image: from a MetaTensor's affine, else 1 mm."""
    if isinstance(img, MetaTensor):
        return np.sqrt((np.asarray(img.affine, float)[:3, :3] ** 2).sum(0))
    return np.ones(3)


def depth_in_brain_mm(img) -> np.ndarray:
    """Distance (mm, ``(H, W, D)`` float32) of every brain voxel of ``img`` ``(C, H, W, D)`` to the nearest voxel
    outside the brain in the image (0 outside; infinite where the brain fills the image): the brain is the
    voxels non-zero in some channel, holes filled. The image's border is no edge (resampling adds no rim there)."""
    a = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
    if a.ndim != 4:
        raise ValueError(f"expected a (C, H, W, D) image, got shape {tuple(a.shape)}")
    found = (a != 0).any(0)
    if found.all():
        return np.full(found.shape, np.inf, np.float32)
    depth = np.zeros(found.shape, np.float32)
    if not found.any():
        return depth
    # the brain's box and 2 voxels around it (background, where not the image's border): a third of the work
    box = tuple(slice(max(s.start - 2, 0), min(s.stop + 2, n)) for s, n in zip(ndi.find_objects(found.astype(np.uint8))[0], found.shape))
    brain = ndi.binary_fill_holes(found[box])
    depth[box] = np.inf if brain.all() else ndi.distance_transform_edt(brain, sampling=voxel_size_mm(img))
    return depth


class TrimBrainEdge(Transform):
    """Zero every channel of ``img`` ``(C, H, W, D)`` within ``margin_mm`` of the brain's edge (same shape)."""

    def __init__(self, margin_mm: float = 2.0) -> None:
        if margin_mm < 0:
            raise ValueError(f"margin_mm must be >= 0, got {margin_mm}")
        self.margin_mm = float(margin_mm)

    def __call__(self, img):
        if self.margin_mm == 0:
            return img
        keep = depth_in_brain_mm(img) > self.margin_mm
        t = img if isinstance(img, torch.Tensor) else torch.as_tensor(np.asarray(img))
        return t * torch.as_tensor(keep, device=t.device)[None].to(t.dtype)


class NormalizeBrainCore(Transform):
    """Channel-wise z-score of the non-zero voxels of ``img`` ``(C, H, W, D)`` (zeros stay 0), with each
    channel's mean and standard deviation taken over its non-zero voxels deeper than ``depth_mm`` in the
    brain (over all its non-zero voxels where none is that deep). Returns float32, same shape."""

    def __init__(self, depth_mm: float = 2.0) -> None:
        if depth_mm < 0:
            raise ValueError(f"depth_mm must be >= 0, got {depth_mm}")
        self.depth_mm = float(depth_mm)

    def __call__(self, img):
        t = img if isinstance(img, torch.Tensor) else torch.as_tensor(np.asarray(img))
        t = t.float()
        core = torch.as_tensor(depth_in_brain_mm(t) > self.depth_mm, device=t.device) if self.depth_mm > 0 else None
        means, stds = [], []
        for c in range(t.shape[0]):
            values = t[c][(t[c] != 0) & core] if core is not None else t[c][t[c] != 0]
            means.append(NormalizeIntensity._mean(values) if values.numel() else None)
            stds.append(NormalizeIntensity._std(values) if values.numel() else None)
        return NormalizeIntensity(subtrahend=means, divisor=stds, nonzero=True, channel_wise=True)(t)


class TrimBrainEdged(MapTransform):
    """Dictionary version of :class:`TrimBrainEdge`."""

    def __init__(self, keys: KeysCollection, margin_mm: float = 2.0, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.trim = TrimBrainEdge(margin_mm)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.trim(d[key])
        return d


class NormalizeBrainCored(MapTransform):
    """Dictionary version of :class:`NormalizeBrainCore`."""

    def __init__(self, keys: KeysCollection, depth_mm: float = 2.0, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.normalize = NormalizeBrainCore(depth_mm)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.normalize(d[key])
        return d
