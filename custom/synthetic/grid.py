"""Output grids of the generator: the BraTS field of view (240 x 240 x 155 mm) at three voxel sizes.

Voxel axes point to L, P, S as in the real BraTS files; every size's voxel edges start at those of
the 1 mm grid, so the sizes cover the same field of view (``medium`` adds half a millimetre at the top).
"""

from __future__ import annotations

import numpy as np

SIZES = ("full", "medium", "small")
GRIDS = {"full": ((240, 240, 155), 1.0), "medium": ((120, 120, 78), 2.0), "small": ((96, 96, 62), 2.5)}
FOV_MM = np.array([240.0, 240.0, 155.0])
AXIS_SIGNS = np.array([-1.0, -1.0, 1.0])  # BraTS voxel axes point to L, P, S
FULL_ORIGIN = np.array([0.0, 239.0, 0.0])  # world position of voxel (0, 0, 0) of the full grid


def check_size(size: str) -> None:
    if size not in GRIDS:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")


def grid_shape(size: str = "full") -> tuple[int, int, int]:
    """Voxel grid (H, W, D): (240, 240, 155) full, (120, 120, 78) medium, (96, 96, 62) small."""
    check_size(size)
    return GRIDS[size][0]


def grid_spacing(size: str = "full") -> float:
    """Isotropic voxel size in mm: 1.0 full, 2.0 medium, 2.5 small."""
    check_size(size)
    return GRIDS[size][1]


def grid_affine(size: str = "full") -> np.ndarray:
    """4x4 voxel-to-world (mm, RAS+) affine of ``size`` with the BraTS LPS diagonal.

    full: ``[[-1,0,0,0],[0,-1,0,239],[0,0,1,0],[0,0,0,1]]``; the other sizes' voxel edges coincide
    with the full grid's at its origin corner.
    """
    s = grid_spacing(size)
    aff = np.eye(4)
    aff[:3, :3] = np.diag(AXIS_SIGNS * s)
    aff[:3, 3] = FULL_ORIGIN + AXIS_SIGNS * (s - 1.0) / 2.0
    return aff
