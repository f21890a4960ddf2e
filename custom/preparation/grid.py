"""The model grid and resampling onto it: BraTS-like, in the reference series' world.

:func:`model_grid`: voxel axes pointing to L, P, S (as the BraTS files) of the head when its
orientation is known (the atlas registration's rotation: the head upright, as in BraTS, whatever its
tilt in the scanner), else those of the reference series (:func:`lattice_rotation`); ``spacing`` mm
isotropic (1), 240 x 240 x 155 mm centred on the brain (more if the brain does not fit), its voxel centres
on the reference's where the axes are parallel (the reference then needs no interpolation, labels go back
exactly). :func:`resample_to_grid`
brings a series onto it through its registration; :func:`bias_correct` is SimpleITK's N4 on a
shrunken copy, its field applied at full resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from custom.preparation.series import RAS_TO_LPS, image_from_array, image_to_array

BRATS_FOV_MM = (240.0, 240.0, 155.0)
AXIS_SIGNS = np.array([-1.0, -1.0, 1.0])  # voxel axes L, P, S


@dataclass
class ModelGrid:
    """A grid of ``shape`` voxels with voxel -> RAS mm ``affine`` (4, 4) in the reference series' world."""

    shape: tuple
    affine: np.ndarray

    @property
    def spacing(self) -> float:
        return float(np.linalg.norm(self.affine[:3, 0]))

    def to_dict(self) -> dict:
        return {"shape": [int(n) for n in self.shape], "spacing_mm": round(self.spacing, 6), "affine_ras": np.round(self.affine, 6).tolist()}

    def empty(self) -> sitk.Image:
        """A ``sitk.Image`` of this grid (zeros), the reference of resampling."""
        return image_from_array(np.zeros(self.shape, np.uint8), self.affine, np.uint8)


def upright_rotation(matrix: np.ndarray) -> np.ndarray:
    """The rotation (3, 3) closest to the linear part of ``matrix`` (4, 4; e.g. reference world -> atlas
    world, an affine registration): polar decomposition, determinant +1."""
    u, _, vt = np.linalg.svd(np.asarray(matrix, float)[:3, :3])
    r = u @ vt
    if np.linalg.det(r) < 0:
        r = u @ np.diag([1.0, 1.0, -1.0]) @ vt
    return r


def lattice_rotation(affine: np.ndarray) -> np.ndarray | None:
    """The ``rotation`` (3, 3) for :func:`model_grid` whose grid axes are the voxel axes of ``affine`` (4, 4; voxel ->
    RAS mm, e.g. an oblique series), each along the one of L, P, S it is closest to. None where those axes are not
    orthogonal (a sheared series) or two are closest to the same world axis."""
    lin = np.asarray(affine, float)[:3, :3]
    units = lin / np.linalg.norm(lin, axis=0)
    world_axis = np.argmax(np.abs(units), axis=0)
    if np.abs(units.T @ units - np.eye(3)).max() > 1e-4 or len(set(world_axis.tolist())) < 3:
        return None
    axes = np.zeros((3, 3))  # columns: the directions taken as R, A, S
    for j, w in enumerate(world_axis):
        axes[:, w] = units[:, j] * np.sign(units[w, j])
    return axes.T if np.linalg.det(axes) > 0 else None


def model_grid(points_ras: np.ndarray, spacing: float = 1.0, rotation: np.ndarray | None = None,
               fov_mm=BRATS_FOV_MM, margin_mm: float = 5.0, lattice: np.ndarray | None = None) -> ModelGrid:
    """The BraTS-like grid around ``points_ras`` (N, 3; RAS mm of the brain, e.g. its mask's voxels):
    ``fov_mm`` wide, or their extent plus ``margin_mm`` on each side where that is wider. ``rotation``
    (3, 3): world -> head axes (``upright_rotation``); the grid's axes then follow the head's. ``lattice``
    (4, 4; voxel -> RAS mm of the reference series): where every grid axis is parallel to one of its axes,
    the grid moves (less than half a lattice voxel per axis) to put its voxel centres on the lattice's."""
    r = np.eye(3) if rotation is None else np.asarray(rotation, float)
    frame = np.asarray(points_ras, float) @ r.T
    lo, hi = frame.min(0), frame.max(0)
    extent = np.maximum(np.asarray(fov_mm, float), hi - lo + 2 * margin_mm)
    shape = tuple(int(n) for n in np.ceil(extent / spacing - 1e-6))
    lin = np.diag(AXIS_SIGNS * spacing)
    aff = np.eye(4)
    aff[:3, :3] = r.T @ lin
    aff[:3, 3] = r.T @ ((lo + hi) / 2.0 - lin @ ((np.array(shape) - 1) / 2.0))
    if lattice is not None:
        to_lattice = np.linalg.inv(np.asarray(lattice, float)) @ aff  # grid voxel -> lattice voxel
        lin_l = np.abs(to_lattice[:3, :3])
        if ((lin_l > 1e-6 * lin_l.max()).sum(0) == 1).all():
            aff[:3, 3] = (np.asarray(lattice, float) @ np.append(np.rint(to_lattice[:3, 3]), 1.0))[:3]
    return ModelGrid(shape, aff)


def lps_transform(matrix_ras: np.ndarray) -> sitk.AffineTransform:
    """SimpleITK transform of a 4x4 RAS matrix (fixed world -> moving world)."""
    f = np.diag([*np.diag(RAS_TO_LPS), 1.0])
    m = f @ np.asarray(matrix_ras, float) @ f
    t = sitk.AffineTransform(3)
    t.SetMatrix([float(v) for v in m[:3, :3].ravel()])
    t.SetTranslation([float(v) for v in m[:3, 3]])
    return t


def resample_to_grid(img: sitk.Image, grid: ModelGrid, matrix_ras: np.ndarray | None = None, label: bool = False) -> np.ndarray:
    """``img`` on ``grid`` (array ``(I, J, K)``): ``matrix_ras`` maps the grid's world (the reference's)
    to ``img``'s world (identity for the reference). Linear interpolation, nearest for a ``label``; 0 outside."""
    t = lps_transform(np.eye(4) if matrix_ras is None else matrix_ras)
    out = sitk.Resample(img, grid.empty(), t, sitk.sitkNearestNeighbor if label else sitk.sitkLinear, 0.0,
                        img.GetPixelID() if label else sitk.sitkFloat32)
    return image_to_array(out)


N4_LEVELS = 3
"""N4's fitting levels (each doubles the B-spline mesh): a fourth follows a large oedema's brightness as if it were bias."""


def bias_correct(data: np.ndarray, mask: np.ndarray, shrink: int = 4, iterations: int = 30, levels: int = N4_LEVELS) -> np.ndarray:
    """N4 bias-field correction of ``data`` (I, J, K) inside ``mask``: fitted on a copy shrunk
    ``shrink`` times per axis (``levels`` levels of ``iterations``), the field applied at full resolution."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(np.maximum(data, 0).astype(np.float32) + 1e-3, (2, 1, 0))))
    msk = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(mask.astype(np.uint8), (2, 1, 0))))
    small, small_mask = sitk.Shrink(img, [shrink] * 3), sitk.Shrink(msk, [shrink] * 3)
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations([iterations] * levels)
    n4.Execute(small, small_mask)
    log_field = n4.GetLogBiasFieldAsImage(img)
    field = np.transpose(sitk.GetArrayFromImage(log_field), (2, 1, 0))
    return np.where(mask, data / np.exp(field), 0).astype(np.float32)
