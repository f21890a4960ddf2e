"""Reading a series of any grid: NIfTI (any orientation, voxel size, field of view) -> SimpleITK image.

SimpleITK works in LPS world coordinates, NIfTI affines in RAS: :func:`image_from_array` and
:func:`image_affine` convert between a voxel array ``(I, J, K)`` with its RAS affine and a
``sitk.Image`` (origin, spacing, direction in LPS; the voxel axes keep their order, so no voxel is
moved). A sheared affine is replaced by the nearest one with orthogonal axes (polar decomposition).
"""

from __future__ import annotations

import os

import numpy as np
import SimpleITK as sitk

from custom.data.nifti import check_image_voxels, load_nifti, load_voxels
from custom.preparation.errors import PreparationError

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def image_from_array(data: np.ndarray, affine: np.ndarray, dtype=np.float32) -> sitk.Image:
    """``sitk.Image`` of a voxel array ``(I, J, K)`` with voxel -> RAS mm ``affine`` (4, 4)."""
    a = np.asarray(affine, float)
    lin = RAS_TO_LPS @ a[:3, :3]
    spacing = np.sqrt((lin ** 2).sum(0))
    u, _, vt = np.linalg.svd(lin / spacing)
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(np.asarray(data, dtype), (2, 1, 0))))
    img.SetSpacing([float(s) for s in spacing])
    img.SetDirection([float(v) for v in (u @ vt).ravel()])
    img.SetOrigin([float(v) for v in RAS_TO_LPS @ a[:3, 3]])
    return img


def image_affine(img: sitk.Image) -> np.ndarray:
    """Voxel -> RAS mm affine (4, 4) of a 3D ``sitk.Image``."""
    aff = np.eye(4)
    direction = np.array(img.GetDirection(), float).reshape(3, 3)
    aff[:3, :3] = RAS_TO_LPS @ direction @ np.diag(img.GetSpacing())
    aff[:3, 3] = RAS_TO_LPS @ np.array(img.GetOrigin(), float)
    return aff


def image_to_array(img: sitk.Image) -> np.ndarray:
    """Voxel array ``(I, J, K)`` of a ``sitk.Image`` (nibabel's axis order)."""
    return np.transpose(sitk.GetArrayFromImage(img), (2, 1, 0))


def read_series(path: str | os.PathLike, name: str | None = None) -> sitk.Image:
    """A 3D NIfTI series as a float32 ``sitk.Image`` (a 4D file with one volume is accepted).

    Errors (:class:`~custom.data.errors.BraTSDataError`, or :class:`PreparationError` for a 4D
    series of several volumes) name the series ``name`` and the file.
    """
    where = f"{name} series ({os.fspath(path)})" if name else os.fspath(path)
    img = load_nifti(path, name=where)
    data = load_voxels(img, os.fspath(path), name=where)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise PreparationError(f"{where}: a series must be one 3D volume, this one has shape {tuple(data.shape)}")
    check_image_voxels(data, where)
    return image_from_array(data, img.affine)


def physical_corners(img: sitk.Image) -> np.ndarray:
    """World positions (8, 3) in LPS mm of the outer corners of ``img``'s voxel grid."""
    size = np.array(img.GetSize(), float)
    idx = np.array([[i, j, k] for i in (-0.5, size[0] - 0.5) for j in (-0.5, size[1] - 0.5) for k in (-0.5, size[2] - 0.5)])
    direction = np.array(img.GetDirection(), float).reshape(3, 3)
    return idx @ (direction @ np.diag(img.GetSpacing())).T + np.array(img.GetOrigin())
