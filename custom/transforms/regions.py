"""Between a release's integer labels and the three nested BraTS regions.

Regions (channels, in ``custom.data.REGIONS`` order): TC = NCR + ET, WT = NCR + ED + ET, ET.
``LabelToRegions`` generalises MONAI's ``ConvertToMultiChannelBasedOnBratsClasses`` (BraTS 2018-2023
labels only) to the MSD convention and checks the label values; ``RegionsToLabel`` is its inverse,
giving the BraTS submission format: ``label = ED on WT, NCR on TC, ET on ET`` (later wins).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import convert_to_dst_type

from custom.data import (
    CONVENTIONS,
    REGIONS,
    LabelConvention,
    case_id_from_path,
    check_label_values,
)


def _convention(convention: str | LabelConvention) -> LabelConvention:
    if isinstance(convention, LabelConvention):
        return convention
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown label convention {convention!r}; expected one of {sorted(CONVENTIONS)}")
    return CONVENTIONS[convention]


def _source(img) -> str:
    name = img.meta.get("filename_or_obj") if isinstance(img, MetaTensor) else None
    return f"case {case_id_from_path(name)}: {name}" if name else "label"


class LabelToRegions(Transform):
    """Integer label ``(1, H, W, D)`` or ``(H, W, D)`` -> region masks ``(3, H, W, D)`` (TC, WT, ET).

    Values outside ``convention`` raise ``BraTSDataError`` naming the file. Output dtype: ``dtype``.
    """

    def __init__(self, convention: str | LabelConvention, dtype=torch.float32) -> None:
        self.convention = _convention(convention)
        self.dtype = dtype

    def __call__(self, img):
        lab = img[0] if img.ndim == 4 and img.shape[0] == 1 else img
        if lab.ndim != 3:
            raise ValueError(f"{_source(img)}: expected a (1, H, W, D) or (H, W, D) label, got shape {tuple(img.shape)}")
        lab_t = torch.as_tensor(lab)
        check_label_values(lab_t.cpu().numpy(), self.convention, _source(img))
        regions = torch.stack([torch.isin(lab_t, torch.tensor(self.convention.region_labels[r], device=lab_t.device)) for r in REGIONS])
        out, *_ = convert_to_dst_type(regions, img, dtype=self.dtype)
        return out


class RegionsToLabel(Transform):
    """Region masks ``(3, H, W, D)`` (TC, WT, ET; boolean or 0/1) -> integer label ``(1, H, W, D)``.

    ED where WT, NCR where TC, ET where ET (each overriding the previous), as uint8.
    """

    def __init__(self, convention: str | LabelConvention) -> None:
        self.convention = _convention(convention)

    def __call__(self, img):
        if img.ndim != 4 or img.shape[0] != len(REGIONS):
            raise ValueError(f"expected region masks of shape (3, H, W, D) (TC, WT, ET), got {tuple(img.shape)}")
        regions = torch.as_tensor(img) > 0.5
        tc, wt, et = (regions[REGIONS.index(r)] for r in ("TC", "WT", "ET"))
        c = self.convention
        label = torch.zeros_like(wt, dtype=torch.uint8)
        label[wt] = c.ed
        label[tc] = c.ncr
        label[et] = c.et
        out, *_ = convert_to_dst_type(label[None], img, dtype=torch.uint8)
        return out


class LabelToRegionsd(MapTransform):
    """Dictionary version of :class:`LabelToRegions`."""

    def __init__(self, keys: KeysCollection, convention: str | LabelConvention, dtype=torch.float32, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.converter = LabelToRegions(convention, dtype)

    def __call__(self, data: Mapping[Hashable, torch.Tensor | np.ndarray]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.converter(d[key])
        return d


class RegionsToLabeld(MapTransform):
    """Dictionary version of :class:`RegionsToLabel`."""

    def __init__(self, keys: KeysCollection, convention: str | LabelConvention, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.converter = RegionsToLabel(convention)

    def __call__(self, data: Mapping[Hashable, torch.Tensor | np.ndarray]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.converter(d[key])
        return d
