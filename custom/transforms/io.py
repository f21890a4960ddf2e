"""Reading and writing cases: the bundle's loader and label writer.

``CheckedLoadImaged`` is ``LoadImaged`` whose failures name the case and the file, and which fills
the channels of missing sequences with zeros. ``SequenceNiftiWriter`` writes the sequences used into
the NIfTI header of the saved label, atomically.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor, NibabelWriter
from monai.transforms import LoadImaged
from monai.utils import ensure_tuple

from custom.atomic_files import atomic_path
from custom.data import (
    MODALITIES,
    BraTSDataError,
    OutputError,
    case_id_from_path,
    check_image_voxels,
    check_sequences,
    describe_sequences,
    load_nifti,
    load_voxels,
)
from custom.data.cases import check_same_grid

logger = logging.getLogger(__name__)

class CheckedLoadImaged(LoadImaged):
    """``LoadImaged`` for BraTS cases whose every failure is a ``BraTSDataError`` naming the case and the file.

    Before loading, each file's header is checked (``custom.data.load_nifti``: a readable NIfTI
    file, size limit checked before any voxel is read, finite non-degenerate affine, not truncated)
    and all files of the item (the modalities and the label) must share one grid (shape and
    affine). A file that still fails to load (a corrupt gzip stream) is named. After loading, every
    channel of ``image_keys`` must be finite, not all zero and within
    ``custom.data.MAX_ABS_INTENSITY`` (``custom.data.check_image_voxels``), and have
    ``num_channels`` channels (the four modalities); other keys (the label) one channel. The case
    id is the item's ``case_id`` (the datalists of ``custom.data.datalist`` carry it), else derived from
    the first file name.

    Missing sequences: when the item has ``sequences`` (names of ``custom.data.MODALITIES``, a list
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
            check_same_grid(case_id, ref_path, ref, path, img)
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


class SequenceNiftiWriter(NibabelWriter):
    """MONAI's ``NibabelWriter`` that writes the sequences the prediction was made from into the NIfTI
    header's ``descrip`` field, e.g. ``"sequences: t1ce,flair"`` (from ``meta["sequences"]``, set by
    :class:`CheckedLoadImaged`). Used by the bundle's ``SaveImaged`` (``writer=``).

    Each file is written beside its destination under a hidden temporary name and renamed into place,
    so a full disk or a killed process never leaves a partial file under the output's name; a write
    that fails raises ``custom.data.OutputError`` naming the file."""

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
        try:
            with atomic_path(final) as tmp:
                super().write(str(tmp), verbose=verbose, **obj_kwargs)
        except OSError as e:
            raise OutputError(f"{final}: cannot be written ({type(e).__name__}: {e.strerror or e}); no file left under this name") from e


def _paths(value) -> list[str]:
    """File path(s) of a datalist value: one path or a list of them ([] for anything else: not checked)."""
    if isinstance(value, (str, os.PathLike)):
        return [os.fspath(value)]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (str, os.PathLike)) for v in value):
        return [os.fspath(v) for v in value]
    return []
