"""MONAI transforms between a release's integer labels and the three nested BraTS regions.

Regions (channels, in ``custom.brats.REGIONS`` order): TC = NCR + ET, WT = NCR + ED + ET, ET.
``LabelToRegions`` generalises MONAI's ``ConvertToMultiChannelBasedOnBratsClasses`` (BraTS 2018-2023
labels only) to the MSD convention and checks the label values; ``RegionsToLabel`` is its inverse,
giving the BraTS submission format: ``label = ED on WT, NCR on TC, ET on ET`` (later wins).
``CheckedLoadImaged`` is the bundle's loader: ``LoadImaged`` whose failures name the case and the file,
which also fills the channels of missing sequences with zeros. ``ZeroBackgroundd`` sets a constant
non-zero background (z-scored images) to 0. ``SequenceNiftiWriter`` writes the sequences used into the
NIfTI header of the saved label.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor, NibabelWriter
from monai.transforms import LoadImaged, MapTransform, Transform
from monai.utils import convert_to_dst_type, ensure_tuple

from custom.brats import (
    CONVENTIONS,
    MODALITIES,
    REGIONS,
    BraTSDataError,
    OutputError,
    LabelConvention,
    _check_same_grid,
    case_id_from_path,
    check_sequences,
    describe_sequences,
    check_image_voxels,
    check_label_values,
    load_nifti,
    load_voxels,
)

logger = logging.getLogger(__name__)


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
    and all files of the item (the modalities and the label) must share one grid (shape and
    affine). A file that still fails to load (a corrupt gzip stream) is named. After loading, every
    channel of ``image_keys`` must be finite, not all zero and within
    ``custom.brats.MAX_ABS_INTENSITY`` (``custom.brats.check_image_voxels``), and have
    ``num_channels`` channels (the four modalities); other keys (the label) one channel. The case
    id is the item's ``case_id`` (the datalists of ``custom.datalist`` carry it), else derived from
    the first file name.

    Missing sequences: when the item has ``sequences`` (names of ``custom.brats.MODALITIES``, a list
    or a comma-separated string, as ``BraTSCase.to_dict`` writes it) naming fewer than four, its
    image files are those sequences' files in canonical order; they are loaded and checked as
    above, then scattered into a ``(4, H, W, D)`` image in canonical order T1, T1ce, T2, FLAIR with
    all-zero channels for the missing sequences (``NormalizeIntensityd(nonzero=True)`` leaves them at
    exactly 0: what the model saw in training for a dropped sequence). A set without FLAIR or T2 is
    refused. The sequences used are recorded in the output as ``sequences`` (a comma-separated
    string, e.g. ``"t1ce,flair"``, so that it collates) and in the image's ``meta["sequences"]``
    (same string; it follows the image through the pipeline to the saved label's header, see
    :class:`SequenceNiftiWriter`), and a case with missing sequences is logged once (logger
    ``custom.transforms``): ``case X: sequences T1ce, FLAIR (missing T1, T2: zero-filled)``.

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
        sequences = _sequences(d.get("sequences"), case_id)
        partial = sequences != MODALITIES
        if partial:
            for key in self.image_keys:
                if key in files and len(files[key]) != len(sequences):
                    raise BraTSDataError(
                        f"case {case_id}: {len(files[key])} image file(s) {', '.join(files[key])} for the {len(sequences)} sequences "
                        f"{describe_sequences(sequences)} (one file a sequence, canonical order T1, T1ce, T2, FLAIR)"
                    )
        headers = {p: load_nifti(p, case_id) for p in all_files}
        for key, paths in files.items():
            one_file_a_modality = len(paths) > 1 or (partial and key in self.image_keys)
            for path in paths if one_file_a_modality else ():  # one modality a file: each must be 3D
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
            if partial:
                raise ValueError("CheckedLoadImaged needs ensure_channel_first=True to fill the channels of missing sequences")
            return out  # channel counts are only known with a channel-first output
        for key, paths in files.items():
            if key not in self.image_keys and out[key].shape[0] != 1:
                raise BraTSDataError(f"case {case_id}: {', '.join(paths)}: a label must be 3D (H, W, D), got {out[key].shape[0]} channels")
        for key in self.image_keys:
            if key not in files:
                continue
            img, paths = out[key], files[key]
            expected = len(sequences) if partial else self.num_channels
            if expected is not None and img.shape[0] != expected:
                raise BraTSDataError(
                    f"case {case_id}: {', '.join(paths)}: expected {expected} image channels ({describe_sequences(sequences)}), got {img.shape[0]}"
                )
            for c in range(img.shape[0]):
                where = paths[c] if len(paths) == img.shape[0] else f"{paths[0]} (channel {c})"
                check_image_voxels(img[c], f"case {case_id}: {where}")
            if partial:
                img = _scatter(img, sequences)
            if isinstance(img, MetaTensor):
                img.meta["sequences"] = ",".join(sequences)
                img.meta["case_id"] = case_id  # outputs are named after the case, not its files (copied cases)
            out[key] = img
        out["sequences"] = ",".join(sequences)
        if partial:
            missing = [m for m in MODALITIES if m not in sequences]
            logger.info(f"case {case_id}: sequences {describe_sequences(sequences)} (missing {describe_sequences(missing)}: zero-filled)")
        return out


def _sequences(value, case_id: str) -> tuple[str, ...]:
    """The item's ``sequences`` (list, tuple or comma-separated string; absent: all four), checked."""
    if value is None:
        return MODALITIES
    names = [v for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
    return check_sequences(names, f"case {case_id}")


def _scatter(img, sequences: tuple[str, ...]):
    """``(len(sequences), H, W, D)`` channels of ``sequences`` -> ``(4, H, W, D)`` in ``MODALITIES``
    order, zeros for the missing ones; a MetaTensor keeps its metadata."""
    full = torch.zeros((len(MODALITIES), *img.shape[1:]), dtype=img.dtype, device=img.device)
    full[[MODALITIES.index(m) for m in sequences]] = torch.as_tensor(img)
    if isinstance(img, MetaTensor):
        return MetaTensor(full, meta=dict(img.meta), applied_operations=list(img.applied_operations))
    return full


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
                changed = ", ".join(f"channel {c} ({MODALITIES[c] if d[key].shape[0] == len(MODALITIES) else c}): {v:.4g}" for c, v in self.converter.last_changed.items())
                logger.info(f"case {case}: constant background set to 0 ({changed})")
        return d


class SequenceNiftiWriter(NibabelWriter):
    """MONAI's ``NibabelWriter`` that writes the sequences the prediction was made from into the NIfTI
    header's ``descrip`` field, e.g. ``"sequences: t1ce,flair"`` (from ``meta["sequences"]``, set by
    :class:`CheckedLoadImaged`). Used by the bundle's ``SaveImaged`` (``writer=``).

    Each file is written beside its destination under a hidden temporary name and renamed into place,
    so a full disk or a killed process never leaves a partial file under the output's name; a write
    that fails raises ``custom.brats.OutputError`` naming the file."""

    def set_metadata(self, meta_dict: Mapping | None, resample: bool = True, **options):
        seq = (meta_dict or {}).get("sequences")
        if isinstance(seq, (list, tuple)):  # a collated / decollated string
            seq = seq[0] if len(seq) == 1 else ",".join(map(str, seq))
        self.sequences = str(seq) if seq else None
        super().set_metadata(meta_dict, resample=resample, **options)

    def write(self, filename, verbose: bool = False, **obj_kwargs):
        if getattr(self, "sequences", None) and "header" not in obj_kwargs:
            import nibabel as nib

            header = nib.Nifti1Header()
            header["descrip"] = f"sequences: {self.sequences}"[:79].encode()
            # with a header, nibabel stores the header's data type (float32 by default), not the array's
            dtype = self.output_dtype if self.output_dtype is not None else np.asarray(self.data_obj).dtype
            header.set_data_dtype(np.dtype(dtype))
            obj_kwargs["header"] = header
        final = os.fspath(filename)
        folder, name = os.path.split(final)
        tmp = os.path.join(folder, f".partial-{os.getpid()}-{name}")  # same suffix: nibabel picks the format by it
        try:
            super().write(tmp, verbose=verbose, **obj_kwargs)
            os.replace(tmp, final)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise OutputError(f"{final}: cannot be written ({type(e).__name__}: {e.strerror or e}); no file left under this name") from e


def _paths(value) -> list[str]:
    """File path(s) of a datalist value: one path or a list of them ([] for anything else: not checked)."""
    if isinstance(value, (str, os.PathLike)):
        return [os.fspath(value)]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (str, os.PathLike)) for v in value):
        return [os.fspath(v) for v in value]
    return []
