"""DICOM files on disk: the image series they hold (:func:`dicom_series`) and one series as a NIfTI volume
(:func:`dicom_to_nifti`: SimpleITK / GDCM, slices sorted by position, unevenly spaced slices put on even ones).
Which series is which sequence: :mod:`custom.data.dicom_series`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Mapping, Sequence

from custom.atomic_files import atomic_path
from custom.data.dicom_series import SeriesMatchError
from custom.data.vocabulary import strip_nifti_suffix

logger = logging.getLogger(__name__)


def dicom_series(folder: Path) -> list[dict]:
    """The DICOM image series in ``folder`` and the folders below it (files of any name but NIfTI and JSON; files
    that are not DICOM images are skipped), one dict each:
    ``SeriesInstanceUID``, ``SeriesDescription``, ``SeriesNumber``, ``Modality``, ``voxels`` (rows x columns x
    instances), ``files``, ``path`` (the folder of its first file) and ``StudyInstanceUID``, ``StudyDate``,
    ``StudyDescription`` (of its first file)."""
    import pydicom

    series: dict[str, dict] = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and not strip_nifti_suffix(p.name) and p.suffix != ".json"):
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception:  # not a DICOM file
            continue
        uid = str(ds.get("SeriesInstanceUID", ""))
        if not uid or "Rows" not in ds:
            continue
        s = series.setdefault(uid, {"SeriesInstanceUID": uid, "SeriesDescription": str(ds.get("SeriesDescription", "")),
                                    "SeriesNumber": ds.get("SeriesNumber", "?"), "Modality": str(ds.get("Modality", "?")),
                                    "voxels": 0, "files": [], "path": f.parent, "StudyInstanceUID": str(ds.get("StudyInstanceUID", "")),
                                    "StudyDate": str(ds.get("StudyDate", "")), "StudyDescription": str(ds.get("StudyDescription", ""))})
        s["files"].append(f)
        s["voxels"] += int(ds.Rows) * int(ds.Columns) * int(ds.get("NumberOfFrames", 1) or 1)
    return list(series.values())


SLICE_STEP_TOLERANCE = 0.1
"""How far (share of the median) the distance between consecutive slices may stray before a series counts as unevenly
spaced (ITK flags deviations of a rounding error's size)."""


MAX_MISSING_SLICES = 2
"""Of a series with slices missing, how many in a row :func:`regular_slices` interpolates; a larger gap is refused."""


def slice_positions(files: Sequence[str]) -> list[float] | None:
    """Positions (mm) of ``files``' slices along the normal of the first one's ImageOrientationPatient, in ``files``'
    order; None where a file has no position or orientation."""
    import numpy as np
    import pydicom

    positions, normal = [], None
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
            return None
        if normal is None:
            o = np.array(ds.ImageOrientationPatient, float)
            normal = np.cross(o[:3], o[3:])
        positions.append(float(np.dot(np.array(ds.ImagePositionPatient, float), normal)))
    return positions


def regular_slices(image, positions: Sequence[float], what: str):
    """``image`` (a SimpleITK volume whose k-th slice lies at ``positions[k]`` mm along its third axis) on evenly spaced
    slices (unchanged where they are, to :data:`SLICE_STEP_TOLERANCE`): the median distance between neighbours, from the
    first slice to the last, each interpolated linearly between
    the two acquired slices around it (as 3D Slicer's acquisition-geometry regularisation does). Raises
    ``SeriesMatchError`` where two slices share a position (several echoes or acquisitions in one series), the order is
    not monotonic, or more than :data:`MAX_MISSING_SLICES` slices in a row are missing."""
    import numpy as np
    import SimpleITK as sitk

    z = np.abs(np.asarray(positions, float) - positions[0])
    steps = np.diff(z)
    step = float(np.median(steps))
    if len(steps) and step > 0 and steps.max() - steps.min() <= SLICE_STEP_TOLERANCE * step:
        return image  # even to a rounding error
    if step <= 0 or steps.min() < SLICE_STEP_TOLERANCE * step:
        raise SeriesMatchError(f"{what}: {int((steps < SLICE_STEP_TOLERANCE * max(step, 1e-6)).sum())} of its slices lie where another "
                               f"one does (several echoes or acquisitions in one series?): export them as separate series")
    if steps.max() > (MAX_MISSING_SLICES + 1.5) * step:
        raise SeriesMatchError(f"{what}: a gap of {steps.max():.1f} mm between two of its slices, {steps.max() / step - 1:.0f} slices of "
                               f"{step:.2f} mm missing (at most {MAX_MISSING_SLICES} are interpolated): send or export the series complete")
    n = int(round(z[-1] / step)) + 1
    target = np.arange(n) * step
    k = np.clip(np.searchsorted(z, target, side="right") - 1, 0, len(z) - 2)
    w = ((target - z[k]) / (z[k + 1] - z[k])).astype(np.float32)[:, None, None]
    a = sitk.GetArrayFromImage(image)  # (K, J, I)
    data = (1 - w) * a[k].astype(np.float32) + w * a[k + 1].astype(np.float32)
    out = sitk.GetImageFromArray((np.rint(data) if np.issubdtype(a.dtype, np.integer) else data).astype(a.dtype))
    out.SetOrigin(image.GetOrigin())
    out.SetDirection(image.GetDirection())
    out.SetSpacing([*image.GetSpacing()[:2], step])
    logger.warning("%s: slices unevenly spaced (%.2f to %.2f mm apart, %d acquired): resampled onto %d slices %.2f mm apart",
                   what, steps.min(), steps.max(), len(z), n, step)
    return out


def dicom_to_nifti(series: Mapping, out: Path) -> Path:
    """The DICOM series ``series`` (a :func:`dicom_series` dict) written as the NIfTI file ``out`` (SimpleITK / GDCM:
    slices sorted by position). Unevenly spaced slices (a slice missing; :data:`SLICE_STEP_TOLERANCE`), which GDCM
    would stack at their mean spacing, away from where they were acquired, are put on even ones
    (:func:`regular_slices`). Raises ``SeriesMatchError`` when its files do not make one volume, lie in several
    folders, or share slice positions."""
    import SimpleITK as sitk

    files = [os.fspath(f) for f in series["files"]]
    folders = sorted({os.path.dirname(f) for f in files})
    what = f"DICOM series #{series.get('SeriesNumber', '?')} {str(series.get('SeriesDescription') or '')!r} ({series['path']})"
    if len(folders) != 1:
        raise SeriesMatchError(f"{what}: its files lie in {len(folders)} folders; one series must lie in one folder")
    reader = sitk.ImageSeriesReader()
    names = reader.GetGDCMSeriesFileNames(folders[0], series["SeriesInstanceUID"]) or files
    if len(names) != len(files):
        raise SeriesMatchError(f"{what}: GDCM sorts {len(names)} of its {len(files)} files into one volume (mixed orientations or sizes?)")
    reader.SetFileNames(names)
    try:
        image = reader.Execute()
    except RuntimeError as e:
        raise SeriesMatchError(f"{what}: cannot be read ({str(e).strip().splitlines()[-1]})") from e
    if image.HasMetaDataKey("ITK_non_uniform_sampling_deviation"):  # ITK's flag, raised by rounding errors too
        positions = slice_positions(names)  # headers read again: only for a flagged series
        if positions and len(positions) > 1:
            image = regular_slices(image, positions, what)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        sitk.WriteImage(image, os.fspath(tmp))
    return out
