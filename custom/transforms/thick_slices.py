"""Thick-slice acquisition simulated on a 3D image: ``ThickSlices`` and ``RandThickSlicesd`` (training).

Clinical studies mix 3D series with 2D ones of 3-6 mm slices (an axial T2, a coronal FLAIR), which the
preparation brings back onto a fine grid by interpolation: blurred across the slices, sharp in-plane.
MONAI's ``RandSimulateLowResolution`` lowers the resolution of all channels along all axes by one
factor; here each sequence (channel) gets its own slice axis and thickness, as each series of a study
has its own. A slice is the mean over its thickness (box profile, ``adaptive_avg_pool``), brought
back by linear interpolation; voxels that were zero (outside the brain of a skull-stripped image)
stay zero, as the brain mask of the preparation keeps them.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform, Transform

from custom.transforms.brain_edge import voxel_size_mm


class ThickSlices(Transform):
    """Channel ``c`` of ``img`` ``(C, H, W, D)`` acquired in slices ``thickness_mm[c]`` thick across spatial axis
    ``axis[c]`` (0, 1 or 2) and interpolated back (same shape; ``None`` or a thickness no larger than the voxel
    leaves a channel as it is). Voxel size from the MetaTensor's affine, else 1 mm."""

    def __call__(self, img: torch.Tensor, axis: Sequence[int | None], thickness_mm: Sequence[float]) -> torch.Tensor:
        if img.ndim != 4:
            raise ValueError(f"expected a (C, H, W, D) image, got shape {tuple(img.shape)}")
        if len(axis) != img.shape[0] or len(thickness_mm) != img.shape[0]:
            raise ValueError(f"one axis and one thickness per channel ({img.shape[0]}), got {len(axis)} and {len(thickness_mm)}")
        voxel = voxel_size_mm(img)
        out = img.clone()
        for c, (a, t) in enumerate(zip(axis, thickness_mm)):
            if a is None:
                continue
            if a not in (0, 1, 2):
                raise ValueError(f"channel {c}: axis must be 0, 1 or 2, got {a}")
            factor = float(t) / float(voxel[a])
            size = list(img.shape[1:])
            if factor <= 1.0 or size[a] < 2:
                continue
            size[a] = max(1, int(round(size[a] / factor)))
            x = torch.as_tensor(img[c], dtype=torch.float32)[None, None]
            slices = F.adaptive_avg_pool3d(x, size)
            back = F.interpolate(slices, size=tuple(img.shape[1:]), mode="trilinear", align_corners=False)[0, 0]
            out[c] = torch.where(torch.as_tensor(img[c]) != 0, back.to(out.dtype), torch.zeros((), dtype=out.dtype))
        return out


class RandThickSlicesd(RandomizableTransform, MapTransform):
    """With probability ``prob``, every channel of ``keys`` ``(C, H, W, D)`` is, with probability ``channel_prob``,
    acquired in slices of a thickness drawn uniformly from ``thickness_mm`` (mm) across a random spatial axis
    (:class:`ThickSlices`; same shape). Labels are not touched: the network learns the fine truth from thick input."""

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 0.5,
        channel_prob: float = 0.5,
        thickness_mm: Sequence[float] = (3.0, 6.0),
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if not 0.0 <= channel_prob <= 1.0:
            raise ValueError(f"channel_prob must be in [0, 1], got {channel_prob}")
        lo, hi = (float(v) for v in thickness_mm)
        if not 0.0 < lo <= hi:
            raise ValueError(f"thickness_mm must be (min, max) with 0 < min <= max, got {thickness_mm!r}")
        self.channel_prob = float(channel_prob)
        self.thickness_mm = (lo, hi)
        self.thick = ThickSlices()

    def randomize(self, n_channels: int) -> tuple[list[int | None], list[float]]:
        super().randomize(None)
        axes: list[int | None] = [None] * n_channels
        thickness = [0.0] * n_channels
        if self._do_transform:
            for c in range(n_channels):
                if self.R.rand() < self.channel_prob:
                    axes[c] = int(self.R.randint(3))
                    thickness[c] = float(self.R.uniform(*self.thickness_mm))
        return axes, thickness

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        first = next(self.key_iterator(d), None)
        if first is None:
            return d
        axes, thickness = self.randomize(d[first].shape[0])
        if all(a is None for a in axes):
            return d
        for key in self.key_iterator(d):
            img = d[key]
            if img.shape[0] != len(axes):
                raise ValueError(f"{key}: {img.shape[0]} channels, expected {len(axes)} as in {first}")
            d[key] = self.thick(img, axes, thickness)
        return d

