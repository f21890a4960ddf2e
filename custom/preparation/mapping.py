"""A label map on the prepared (model) grid carried back onto the grid of one of the study's series
(by default the reference series), and back again.

The preparation report (``<case>_preparation.json``) holds what it takes: the model grid (shape,
RAS affine) and, per series, its source grid (shape, RAS affine) and ``registration.matrix_ras``
(reference world -> series world, identity for the reference).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from custom.data.nifti import load_nifti, load_voxels
from custom.preparation.errors import PreparationError


def load_report(report_or_dir: str | os.PathLike | dict) -> dict:
    """The preparation report: a dict, a report JSON file, or the output folder of ``prepare_study``."""
    if isinstance(report_or_dir, dict):
        return report_or_dir
    p = Path(report_or_dir)
    if p.is_dir():
        found = sorted(p.glob("*_preparation.json"))
        if len(found) != 1:
            raise PreparationError(f"{p}: expected one *_preparation.json report, found {len(found)}")
        p = found[0]
    return json.loads(p.read_text())


def _save(data: np.ndarray, affine: np.ndarray, out_path: str | os.PathLike) -> Path:
    nii = nib.Nifti1Image(data, affine)
    nii.set_qform(affine, code=1)
    nii.set_sform(affine, code=1)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nii, out_path)
    return out_path


def _read(path: str | os.PathLike, name: str) -> tuple[np.ndarray, np.ndarray]:
    img = load_nifti(path, name=name)
    data = np.asarray(load_voxels(img, os.fspath(path), name=name))
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    return data, np.asarray(img.affine, float)


def _resample(data: np.ndarray, affine: np.ndarray, shape: tuple, target_affine: np.ndarray, order: int) -> np.ndarray:
    """``data`` (voxel -> RAS ``affine``) on the grid ``shape`` / ``target_affine``, 0 outside: ``order`` 1 trilinear
    (float32); 0 a label map (uint8) by :func:`resample_labels`."""
    m = np.linalg.inv(affine) @ target_affine  # target voxel -> source voxel
    if order == 0:
        return resample_labels(np.rint(data).astype(np.uint8), m, shape)
    return ndi.affine_transform(data.astype(np.float32), m[:3, :3], m[:3, 3], shape, order=order, cval=0)


def resample_labels(label: np.ndarray, matrix: np.ndarray, shape: tuple) -> np.ndarray:
    """A label map (I, J, K) on the grid of ``shape`` whose voxel ``v`` lies at ``matrix @ v`` (4, 4) in ``label``'s
    voxels, by SimpleITK's ``sitkLabelLinear``: each label's indicator interpolated trilinearly, a voxel takes the
    label that reaches highest (background outside). Unlike nearest neighbour, thin structures are not shifted by up
    to half a voxel; where the grids share voxel centres the labels are copied exactly. uint8."""
    src = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(label.astype(np.uint8), (2, 1, 0))))
    t = sitk.AffineTransform(3)  # on voxel indices: both images have unit spacing, identity direction, origin 0
    t.SetMatrix([float(v) for v in np.asarray(matrix, float)[:3, :3].ravel()])
    t.SetTranslation([float(v) for v in np.asarray(matrix, float)[:3, 3]])
    out = sitk.Resample(src, sitk.Image([int(n) for n in shape], sitk.sitkUInt8), t, sitk.sitkLabelLinear, 0)
    return np.transpose(sitk.GetArrayFromImage(out), (2, 1, 0))


def series_grid(report: dict, series: str | None = None) -> tuple[tuple, np.ndarray, np.ndarray]:
    """``(shape, affine, matrix)`` of a series of the report (default: the reference): its own grid
    (voxel -> RAS mm) and the registration (reference world -> series world, 4x4 RAS)."""
    name = series or report["reference"]["sequence"]
    if name not in report["series"]:
        raise PreparationError(f"series {name!r} is not one of the prepared study's ({', '.join(report['series'])})")
    entry = report["series"][name]
    return tuple(entry["shape"]), np.array(entry["affine_ras"], float), np.array(entry["registration"]["matrix_ras"], float)


def map_to_reference(label_path: str | os.PathLike, report_or_dir, out_path: str | os.PathLike, order: int = 0,
                     series: str | None = None) -> Path:
    """Write ``label_path`` (a map on the prepared grid) resampled onto the grid of ``series`` (a sequence
    of the report; default: the reference series), as NIfTI of that series' shape and affine: ``order``
    0 = a label map, each label interpolated (:func:`resample_labels`), uint8; 1 = a continuous map (e.g.
    uncertainty), trilinear, float32. Returns ``out_path``."""
    report = load_report(report_or_dir)
    label, affine = _read(label_path, "label")
    grid_shape = tuple(report["grid"]["shape"])
    if label.shape != grid_shape:
        raise PreparationError(f"{label_path}: label of shape {label.shape}, the prepared grid is {grid_shape}")
    shape, target_affine, matrix = series_grid(report, series)
    # target voxel -> series world -> reference world (the prepared grid's) -> label voxel
    return _save(_resample(label, affine, shape, np.linalg.inv(matrix) @ target_affine, order), target_affine, out_path)


def map_from_reference(label_path: str | os.PathLike, report_or_dir, out_path: str | os.PathLike, series: str | None = None) -> Path:
    """Write ``label_path`` (a label map on the grid of ``series``, default the reference series, e.g. an
    annotation) resampled onto the prepared grid (:func:`resample_labels`, uint8): the inverse of
    :func:`map_to_reference`, for training."""
    report = load_report(report_or_dir)
    label, affine = _read(label_path, "label")
    shape, _, matrix = series_grid(report, series)
    if label.shape != shape:
        raise PreparationError(f"{label_path}: label of shape {label.shape}, the {series or 'reference'} series is {shape}")
    grid_affine = np.array(report["grid"]["affine_ras"], float)
    # prepared voxel -> reference world -> series world -> label voxel
    return _save(_resample(label, np.linalg.inv(matrix) @ affine, tuple(report["grid"]["shape"]), grid_affine, 0), grid_affine, out_path)
