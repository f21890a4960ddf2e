"""MONAI transforms between a release's integer labels and the three nested BraTS regions.

Regions (channels, in ``custom.brats.REGIONS`` order): TC = NCR + ET, WT = NCR + ED + ET, ET.
``LabelToRegions`` generalises MONAI's ``ConvertToMultiChannelBasedOnBratsClasses`` (BraTS 2018-2023
labels only) to the MSD convention and checks the label values; ``RegionsToLabel`` is its inverse,
giving the BraTS submission format: ``label = ED on WT, NCR on TC, ET on ET`` (later wins).
``CheckedLoadImaged`` is the bundle's loader: ``LoadImaged`` whose failures name the case and the file.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import LoadImaged, MapTransform, Transform
from monai.utils import convert_to_dst_type, ensure_tuple

from custom.brats import (
    CONVENTIONS,
    REGIONS,
    BraTSDataError,
    LabelConvention,
    _check_same_grid,
    case_id_from_path,
    check_image_voxels,
    check_label_values,
    load_nifti,
    load_voxels,
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


class CheckedLoadImaged(LoadImaged):
    """``LoadImaged`` for BraTS cases whose every failure is a ``BraTSDataError`` naming the case and the file.

    Before loading, each file's header is checked (``custom.brats.load_nifti``: a readable NIfTI
    file, size limit checked before any voxel is read, finite non-degenerate affine, not truncated)
    and all files of the item (the four modalities and the label) must share one grid (shape and
    affine). A file that still fails to load (a corrupt gzip stream) is named. After loading, every
    channel of ``image_keys`` must be finite, not all zero and within
    ``custom.brats.MAX_ABS_INTENSITY`` (``custom.brats.check_image_voxels``), and have
    ``num_channels`` channels (the four modalities); other keys (the label) one channel. The case
    id is the item's ``case_id`` (the datalists of ``custom.datalist`` carry it), else derived from
    the first file name.

    This is the load-time half of the bundle's checks: its datalists are built with
    ``check="header"`` (headers only, milliseconds a case) and the voxel checks run here on the
    arrays the pipeline loads anyway, instead of a ``check="full"`` pass that would decompress
    every file twice. Takes all ``LoadImaged`` arguments.
    """

    def __init__(self, keys: KeysCollection, *args, image_keys: KeysCollection = ("image",), num_channels: int | None = 4, **kwargs) -> None:
        super().__init__(keys, *args, **kwargs)
        self.image_keys = ensure_tuple(image_keys)
        self.num_channels = num_channels

    def __call__(self, data, reader=None):
        d = dict(data)
        files = {key: paths for key in self.key_iterator(d) if (paths := _paths(d[key]))}
        all_files = [p for paths in files.values() for p in paths]
        if not all_files:
            return super().__call__(d, reader)
        case_id = str(d.get("case_id") or case_id_from_path(all_files[0]))
        headers = {p: load_nifti(p, case_id) for p in all_files}
        for paths in files.values():
            for path in paths if len(paths) > 1 else ():  # one modality a file: each must be 3D
                if len(headers[path].shape) != 3:
                    raise BraTSDataError(f"case {case_id}: {path}: expected a 3D image, got shape {headers[path].shape}")
        ref_path, ref = next(iter(headers.items()))
        for path, img in list(headers.items())[1:]:
            _check_same_grid(case_id, ref_path, ref, path, img)
        try:
            out = super().__call__(d, reader)
        except BraTSDataError:
            raise
        except Exception as e:  # a corrupt deflate stream, an I/O error: name the file
            for path, img in headers.items():
                load_voxels(img, path, case_id)
            raise BraTSDataError(f"case {case_id}: {', '.join(all_files)}: cannot be loaded ({type(e).__name__}: {e})") from e
        if not getattr(self._loader, "ensure_channel_first", False):
            return out  # channel counts are only known with a channel-first output
        for key, paths in files.items():
            if key not in self.image_keys and out[key].shape[0] != 1:
                raise BraTSDataError(f"case {case_id}: {', '.join(paths)}: a label must be 3D (H, W, D), got {out[key].shape[0]} channels")
        for key in self.image_keys:
            if key not in files:
                continue
            img, paths = out[key], files[key]
            if self.num_channels is not None and img.shape[0] != self.num_channels:
                raise BraTSDataError(
                    f"case {case_id}: {', '.join(paths)}: expected {self.num_channels} image channels (T1, T1ce, T2, FLAIR), got {img.shape[0]}"
                )
            for c in range(img.shape[0]):
                where = paths[c] if len(paths) == img.shape[0] else f"{paths[0]} (channel {c})"
                check_image_voxels(img[c], f"case {case_id}: {where}")
        return out


def _paths(value) -> list[str]:
    """File path(s) of a datalist value: one path or a list of them ([] for anything else: not checked)."""
    if isinstance(value, (str, os.PathLike)):
        return [os.fspath(value)]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (str, os.PathLike)) for v in value):
        return [os.fspath(v) for v in value]
    return []
