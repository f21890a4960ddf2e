"""Smooth random fields (cosine series), random rotations and volume-controlled thresholds."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi


def dct_coefs(rng: np.random.Generator, nfreq: int, decay: float) -> np.ndarray:
    """Random tensor-product cosine coefficients ``(nfreq,) * 3``, normalised to a unit-RMS field."""
    f = np.arange(nfreq)
    ff = f[:, None, None] ** 2 + f[None, :, None] ** 2 + f[None, None, :] ** 2
    c = rng.standard_normal((nfreq,) * 3) / (1.0 + ff) ** (decay / 2.0)
    c[0, 0, 0] = 0.0
    w = np.where(f == 0, 1.0, 0.5)  # mean square of cos(pi f x / L) over [0, L]
    var = float((c ** 2 * w[:, None, None] * w[None, :, None] * w[None, None, :]).sum())
    return c / np.sqrt(var)


def dct_eval(coefs: np.ndarray, axes: list[np.ndarray], lengths) -> np.ndarray:
    """``sum_abc c_abc cos(pi a x/Lx) cos(pi b y/Ly) cos(pi c z/Lz)`` on the grid ``axes`` (mm).

    Returns float32 ``(len(axes[0]), len(axes[1]), len(axes[2]))``.
    """
    n = coefs.shape[0]
    bases = [np.cos(np.pi * np.outer(np.asarray(x, float), np.arange(n)) / L).astype(np.float32)
             for x, L in zip(axes, lengths)]
    t = np.tensordot(coefs.astype(np.float32), bases[0], axes=([0], [1]))
    t = np.tensordot(t, bases[1], axes=([0], [1]))
    t = np.tensordot(t, bases[2], axes=([0], [1]))
    return np.ascontiguousarray(t, dtype=np.float32)


def dct_eval_points(coefs: np.ndarray, pts: np.ndarray, lengths) -> np.ndarray:
    """:func:`dct_eval` at scattered points ``pts`` (N, 3) in mm; returns (N,) float64."""
    n = coefs.shape[0]
    b = [np.cos(np.pi * np.outer(pts[:, d], np.arange(n)) / lengths[d]) for d in range(3)]
    return np.einsum("abc,na,nb,nc->n", coefs, b[0], b[1], b[2], optimize=True)


def smooth_field(rng: np.random.Generator, shape, spacing: float, nfreq: int, decay: float) -> np.ndarray:
    """A unit-RMS smooth random field on a grid of ``shape`` voxels of ``spacing`` mm (float32)."""
    axes = [(np.arange(n) + 0.5) * spacing for n in shape]
    return dct_eval(dct_coefs(rng, nfreq, decay), axes, [n * spacing for n in shape])


def rotation(angles_deg) -> np.ndarray:
    """3x3 rotation ``Rz @ Ry @ Rx`` from angles in degrees."""
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3x3 rotation (from a random unit quaternion)."""
    q = rng.standard_normal(4)
    a, b, c, d = q / np.linalg.norm(q)
    return np.array([
        [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
        [2 * (b * c + a * d), a * a - b * b + c * c - d * d, 2 * (c * d - a * b)],
        [2 * (b * d - a * c), 2 * (c * d + a * b), a * a - b * b - c * c + d * d],
    ])


def quantile_threshold(values: np.ndarray, count: int) -> float:
    """Threshold t such that about ``count`` finite entries of ``values`` are < t."""
    v = values[np.isfinite(values)]
    if v.size == 0:
        return -np.inf
    count = int(np.clip(count, 1, v.size))
    return float(np.partition(v, count - 1)[count - 1]) + 1e-6


def component_at(mask: np.ndarray, seed_idx) -> np.ndarray:
    """The connected component of ``mask`` containing ``seed_idx`` (else the largest one)."""
    lab, n = ndi.label(mask)
    if n <= 1:
        return mask
    keep = lab[tuple(seed_idx)]
    if keep == 0:
        keep = int(np.argmax(np.bincount(lab.ravel())[1:])) + 1
    return lab == keep
