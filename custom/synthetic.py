"""Synthetic BraTS-like glioma cases on real anatomy: the project's embedded default dataset.

Every case is built from the MNI ICBM152 2009a templates that nilearn ships offline (grey and
white matter probability maps and the brain mask), warped by a random smooth deformation
(small affine plus a smooth elastic field), with one irregular glioma (oedema around a core
that is either an enhancing rim around necrosis or, in about a quarter of the cases, a mostly
non-enhancing core), glioma-like contrasts for T1, T1ce, T2 and FLAIR, a smooth bias field
and Gaussian noise. The cases are written in the real BraTS 2021, BraTS 2023 (GLI) or Medical
Segmentation Decathlon Task01_BrainTumour layouts, with the labels of that release::

    python -m custom.synthetic --out data/synth --cases 8 --seed 0 --layout 2021 --size small

Geometry (both sizes cover the same 240 x 240 x 155 mm field of view):

* ``full``: the BraTS grid, 240 x 240 x 155 voxels of 1 mm, affine
  ``[[-1,0,0,0],[0,-1,0,239],[0,0,1,0],[0,0,0,1]]`` (LPS voxel axes, as in the real files).
* ``small``: 96 x 96 x 62 voxels of 2.5 mm; the voxel edges coincide with those of the full
  grid, so the affine is ``diag(-2.5,-2.5,2.5)`` with translation ``(-0.75, 238.25, 0.75)``.

Random numbers come from ``np.random.default_rng([seed, index])``: case ``index`` does not
depend on how many cases are generated, and the same ``(seed, index)`` gives the same
anatomy and tumour (in millimetres) at both sizes. Files are written byte-reproducibly
(gzip header with mtime 0 and no file name).

Internal label encoding (see :data:`NCR`, :data:`ED`, :data:`ET`): 0 background,
1 necrotic / non-enhancing tumour core, 2 peritumoral oedema, 3 enhancing tumour. It is
converted to the release's convention only when writing (:data:`LABEL_VALUES`).
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

__all__ = [
    "NCR", "ED", "ET", "MODALITIES", "LAYOUTS", "SIZES", "LABEL_VALUES",
    "grid_shape", "grid_spacing", "grid_affine", "generate_case", "case_id",
    "planned_files", "write_dataset", "main",
]

NCR, ED, ET = 1, 2, 3
"""Internal (neutral) label values: necrotic/non-enhancing core, oedema, enhancing tumour."""

MODALITIES = ("t1", "t1ce", "t2", "flair")
"""Canonical modality order of :func:`generate_case`."""

LAYOUTS = ("2021", "2023", "msd")
SIZES = ("full", "small")

LABEL_VALUES = {"2021": {NCR: 1, ED: 2, ET: 4}, "2023": {NCR: 1, ED: 2, ET: 3}, "msd": {NCR: 2, ED: 1, ET: 3}}
"""Internal label -> the value written in each layout."""

_FILE_SUFFIXES = {
    "2021": ("_", {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair"}),
    "2023": ("-", {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}),
}
_MSD_CHANNELS = ("flair", "t1", "t1ce", "t2")  # MSD Task01 order: FLAIR, T1w, t1gd, T2w

_GRIDS = {"full": ((240, 240, 155), 1.0), "small": ((96, 96, 62), 2.5)}
_FOV_MM = np.array([240.0, 240.0, 155.0])
_AXIS_SIGNS = np.array([-1.0, -1.0, 1.0])  # BraTS voxel axes point to L, P, S
_FULL_ORIGIN = np.array([0.0, 239.0, 0.0])  # world position of voxel (0, 0, 0) of the full grid

# Tissue / tumour class means per modality (arbitrary BraTS-like units), before per-case jitter.
#            WM     GM    CSF    ED    NCR    ET   NET (non-enhancing tumour core)
_MEANS = {
    "t1":    (1000., 700., 300., 780., 430., 800., 620.),
    "t1ce":  (1050., 760., 330., 820., 400., 1750., 660.),
    "t2":    (650., 950., 2300., 1850., 2100., 1350., 1600.),
    "flair": (520., 680., 180., 1150., 700., 1000., 1200.),
}


# ---------------------------------------------------------------------------------------------
# grid
# ---------------------------------------------------------------------------------------------
def _check_size(size: str) -> None:
    if size not in _GRIDS:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")


def grid_shape(size: str = "full") -> tuple[int, int, int]:
    """Voxel grid shape (H, W, D) of ``size``: (240, 240, 155) for full, (96, 96, 62) for small."""
    _check_size(size)
    return _GRIDS[size][0]


def grid_spacing(size: str = "full") -> float:
    """Isotropic voxel size in mm of ``size``: 1.0 for full, 2.5 for small."""
    _check_size(size)
    return _GRIDS[size][1]


def grid_affine(size: str = "full") -> np.ndarray:
    """4x4 voxel-to-world (mm, RAS+) affine of ``size``, with the BraTS LPS diagonal.

    full: ``[[-1,0,0,0],[0,-1,0,239],[0,0,1,0],[0,0,0,1]]``; small: 2.5 mm voxels whose edges
    coincide with the full grid's, so that both cover the same 240 x 240 x 155 mm.
    """
    s = grid_spacing(size)
    aff = np.eye(4)
    aff[:3, :3] = np.diag(_AXIS_SIGNS * s)
    aff[:3, 3] = _FULL_ORIGIN + _AXIS_SIGNS * (s - 1.0) / 2.0
    return aff


# ---------------------------------------------------------------------------------------------
# anatomy (MNI ICBM152 2009a, cached per process)
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _atlas() -> dict:
    """MNI templates as float32 arrays (197 x 233 x 189, 1 mm) plus derived helpers."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nilearn import datasets

        gm_img = datasets.load_mni152_gm_template(resolution=1)
        wm = np.asarray(datasets.load_mni152_wm_template(resolution=1).get_fdata(), np.float32)
        gm = np.asarray(gm_img.get_fdata(), np.float32)
        try:
            mask = datasets.load_mni152_brain_mask(resolution=1).get_fdata() > 0.5
        except Exception:  # pragma: no cover - older/other nilearn: derive it from GM + WM
            mask = ndi.binary_closing(gm + wm > 0.15, iterations=3)
            mask = ndi.binary_fill_holes(mask)
    affine = np.asarray(gm_img.affine, float)
    gm = np.clip(gm, 0, 1) * mask
    wm = np.clip(wm, 0, 1) * mask
    scale = np.maximum(gm + wm, 1.0)
    gm, wm = gm / scale, wm / scale
    csf = np.where(mask, np.clip(1.0 - gm - wm, 0, 1), 0).astype(np.float32)
    idx = np.argwhere(mask)
    lo, hi = idx.min(0), idx.max(0)
    # Tumour centres: white matter, at least 14 mm inside the brain, supratentorial (z > -12 mm).
    depth = ndi.distance_transform_edt(mask[::2, ::2, ::2], sampling=2.0)  # mm, on a 2 mm grid (fast)
    depth = depth.repeat(2, 0).repeat(2, 1).repeat(2, 2)[: mask.shape[0], : mask.shape[1], : mask.shape[2]]
    zworld = affine[2, 2] * np.arange(mask.shape[2]) + affine[2, 3]
    cand = (wm > 0.5) & (depth >= 14) & (zworld[None, None, :] > -12)
    return {
        "gm": np.ascontiguousarray(gm, np.float32),
        "wm": np.ascontiguousarray(wm, np.float32),
        "csf": np.ascontiguousarray(csf, np.float32),
        "affine": affine,
        "bbox_vox": (lo, hi),
        "candidates": np.argwhere(cand),
        # upper brain surface (top voxel of every 3rd column): used to keep the top inside the FOV
        "top_points": np.argwhere(mask & ~np.roll(mask, -1, axis=2))[::3].astype(float),
    }


# ---------------------------------------------------------------------------------------------
# smooth random fields
# ---------------------------------------------------------------------------------------------
def _dct_coefs(rng: np.random.Generator, nfreq: int, decay: float) -> np.ndarray:
    """Random tensor-product cosine coefficients, normalised so the field has unit RMS."""
    f = np.arange(nfreq)
    ff = f[:, None, None] ** 2 + f[None, :, None] ** 2 + f[None, None, :] ** 2
    c = rng.standard_normal((nfreq,) * 3) / (1.0 + ff) ** (decay / 2.0)
    c[0, 0, 0] = 0.0
    w = np.where(f == 0, 1.0, 0.5)  # mean square of cos(pi f x / L) over [0, L]
    var = float((c ** 2 * w[:, None, None] * w[None, :, None] * w[None, None, :]).sum())
    return c / np.sqrt(var)


def _dct_eval_points(coefs: np.ndarray, pts: np.ndarray, lengths) -> np.ndarray:
    """Like :func:`_dct_eval` at scattered points ``pts`` (N, 3) in mm; returns (N,) float64."""
    n = coefs.shape[0]
    b = [np.cos(np.pi * np.outer(pts[:, d], np.arange(n)) / lengths[d]) for d in range(3)]
    return np.einsum("abc,na,nb,nc->n", coefs, b[0], b[1], b[2], optimize=True)


def _dct_eval(coefs: np.ndarray, axes: list[np.ndarray], lengths) -> np.ndarray:
    """Evaluate sum_abc c_abc cos(pi a x/Lx) cos(pi b y/Ly) cos(pi c z/Lz) on the grid ``axes``.

    ``axes`` are 1D positions (mm, from the start of the domain of length ``lengths``).
    Returns a float32 array of shape ``(len(axes[0]), len(axes[1]), len(axes[2]))``.
    """
    n = coefs.shape[0]
    bases = [np.cos(np.pi * np.outer(np.asarray(x, float), np.arange(n)) / L).astype(np.float32)
             for x, L in zip(axes, lengths)]
    t = np.tensordot(coefs.astype(np.float32), bases[0], axes=([0], [1]))  # (b, c, x)
    t = np.tensordot(t, bases[1], axes=([0], [1]))  # (c, x, y)
    t = np.tensordot(t, bases[2], axes=([0], [1]))  # (x, y, z)
    return np.ascontiguousarray(t, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# one case
# ---------------------------------------------------------------------------------------------
def _rotation(angles_deg) -> np.ndarray:
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.standard_normal(4)
    q /= np.linalg.norm(q)
    a, b, c, d = q
    return np.array([
        [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
        [2 * (b * c + a * d), a * a - b * b + c * c - d * d, 2 * (c * d - a * b)],
        [2 * (b * d - a * c), 2 * (c * d + a * b), a * a - b * b - c * c + d * d],
    ])


def _quantile_threshold(values: np.ndarray, count: int) -> float:
    """Threshold t such that about ``count`` finite entries of ``values`` are < t."""
    v = values[np.isfinite(values)]
    if v.size == 0:
        return -np.inf
    count = int(np.clip(count, 1, v.size))
    return float(np.partition(v, count - 1)[count - 1]) + 1e-6


def _component_at(mask: np.ndarray, seed_idx) -> np.ndarray:
    """The connected component of ``mask`` that contains ``seed_idx`` (else the largest)."""
    lab, n = ndi.label(mask)
    if n <= 1:
        return mask
    keep = lab[tuple(seed_idx)]
    if keep == 0:
        keep = int(np.argmax(np.bincount(lab.ravel())[1:])) + 1
    return lab == keep


def generate_case(index: int, seed: int = 0, size: str = "full", return_maps: bool = False):
    """Generate synthetic case ``index`` of dataset ``seed`` on grid ``size``.

    Returns ``(images, seg, affine)``, plus ``maps`` when ``return_maps``:

    * ``images``: dict ``{"t1", "t1ce", "t2", "flair"}`` (in that order) of int16 arrays of shape
      :func:`grid_shape` ``(H, W, D)`` (voxel axes L, P, S); non-negative, zero outside the brain,
      brain intensities in the hundreds to low thousands.
    * ``seg``: uint8 array ``(H, W, D)`` in the internal encoding 0 background, 1 (:data:`NCR`)
      necrotic/non-enhancing core, 2 (:data:`ED`) oedema, 3 (:data:`ET`) enhancing tumour.
    * ``affine``: 4x4 voxel-to-world affine in mm (:func:`grid_affine`).
    * ``maps`` (optional): dict of float32 ``(H, W, D)`` tissue probabilities ``"wm"``, ``"gm"``,
      ``"csf"`` (before the tumour), bool ``"brain"`` mask, and ``"info"`` (a dict with the
      tumour type, its centre in voxels and the WT/TC/ET volumes in mL).
    """
    _check_size(size)
    index, seed = int(index), int(seed)
    if index < 0 or seed < 0:
        raise ValueError("index and seed must be non-negative integers")
    rng = np.random.default_rng([seed, index])
    atlas = _atlas()
    shape, sp = _GRIDS[size]
    shape = np.array(shape)
    out_aff = grid_affine(size)
    vox_vol_ml = sp ** 3 / 1000.0

    # ---- random spatial transform: frame mm (x = (i + 0.5) * sp along the voxel axes) -> MNI voxel
    # MNI152 is ~7% larger than a typical adult brain (and the SRI24 space of BraTS): base scale 0.93
    angles = np.clip(rng.normal(0.0, 3.0, 3), -7, 7)
    scale = 0.93 * rng.uniform(0.93, 1.07) * np.clip(1.0 + rng.normal(0, 0.025, 3), 0.95, 1.05)
    shift_xy = np.clip(rng.normal(0.0, 3.0, 2), -8, 8)
    top_margin = rng.uniform(3.0, 10.0)
    elastic = [_dct_coefs(rng, 7, 2.0) * rng.uniform(1.5, 3.0) for _ in range(3)]  # mm RMS
    m_lin = _rotation(angles).T @ np.diag(1.0 / scale)  # output world (mm) -> MNI world offsets
    mni_aff = atlas["affine"]
    lo, hi = atlas["bbox_vox"]
    lo_w, hi_w = mni_aff[:3, :3] @ lo + mni_aff[:3, 3], mni_aff[:3, :3] @ hi + mni_aff[:3, 3]
    c_mni = np.array([(lo_w[0] + hi_w[0]) / 2, (lo_w[1] + hi_w[1]) / 2, hi_w[2]])  # top centre
    fov_centre = out_aff[:3, :3] @ ((shape - 1) / 2.0) + out_aff[:3, 3]
    fov_top = out_aff[2, 2] * (shape[2] - 0.5) + out_aff[2, 3]
    anchor = np.array([fov_centre[0] + shift_xy[0], fov_centre[1] + shift_xy[1], fov_top - top_margin])
    # frame mm x -> voxel v = x/sp - 0.5 -> world p = A v + t -> MNI world m = c + M (p - anchor) + u(x)
    a_lin = out_aff[:3, :3] / sp
    a_off = out_aff[:3, 3] - 0.5 * np.diag(out_aff[:3, :3])
    mni_inv = np.linalg.inv(mni_aff)
    lin = mni_inv[:3, :3] @ m_lin @ a_lin  # frame mm -> MNI voxel (linear part)
    lin_inv = np.linalg.inv(lin)

    def disp_mni_vox(axes_mm):
        return [mni_inv[d, d] * _dct_eval(elastic[d], axes_mm, _FOV_MM) for d in range(3)]

    def to_frame(q, off, iters=5):
        """MNI voxel positions q (N, 3) -> frame mm (N, 3), inverting the elastic part by fixed point."""
        x = (q - off) @ lin_inv.T
        for _ in range(iters):
            ud = np.stack([mni_inv[d, d] * _dct_eval_points(elastic[d], x, _FOV_MM) for d in range(3)], axis=1)
            x = (q - ud - off) @ lin_inv.T
        return x

    # provisional placement (top of the brain at the top of the FOV); refined below
    off = mni_inv[:3, :3] @ (c_mni + m_lin @ (a_off - anchor)) + mni_inv[:3, 3]

    # ---- per-case contrasts
    tumour_type = "non-enhancing" if rng.random() < 0.25 else "enhancing"
    gains = {m: float(np.clip(rng.lognormal(0.0, 0.2), 0.65, 1.6)) for m in MODALITIES}
    means = {}
    for m in MODALITIES:
        base = np.array(_MEANS[m])
        jit = np.concatenate([rng.uniform(0.9, 1.1, 3), rng.uniform(0.87, 1.13, 4)])
        means[m] = base * jit * gains[m]

    # ---- tumour (sizes in mm, position chosen in MNI space so it does not depend on the grid)
    v_wt = float(np.exp(rng.uniform(np.log(20.0), np.log(150.0))))  # mL
    tc_frac = rng.uniform(0.2, 0.5)
    ncr_frac = rng.uniform(0.15, 0.6) if tumour_type == "enhancing" else 1.0 - rng.uniform(0.0, 0.08)
    r_eq = (3.0 * v_wt * 1000.0 / (4.0 * np.pi)) ** (1.0 / 3.0)  # mm
    half = min(2.4 * r_eq + 8.0, 90.0)
    n_lobes = int(rng.integers(1, 4))
    lobes = []
    for k in range(n_lobes):
        offs = np.zeros(3) if k == 0 else rng.normal(0.0, 0.4 * r_eq, 3)
        radii = r_eq * rng.uniform(0.55, 1.25, 3) * (1.0 if k == 0 else rng.uniform(0.5, 0.85))
        lobes.append((offs, radii, _random_rotation(rng)))
    core_off = rng.normal(0.0, 0.12 * r_eq, 3)
    core_lobes = []
    for k in range(int(rng.integers(1, 4))):
        offs = core_off + (np.zeros(3) if k == 0 else rng.normal(0.0, 0.3 * r_eq, 3))
        radii = r_eq * rng.uniform(0.6, 1.2, 3) * (1.0 if k == 0 else rng.uniform(0.45, 0.8))
        core_lobes.append((offs, radii, _random_rotation(rng)))
    c_shape, c_core, c_nec, c_tex, c_ed, c_spot = (_dct_coefs(rng, n, d) for n, d in
                                                   ((10, 2.0), (10, 1.5), (12, 1.5), (12, 1.0), (8, 1.5), (12, 1.0)))
    cands = atlas["candidates"]
    centre = None
    for _ in range(64):
        q = cands[rng.integers(len(cands))].astype(float)  # MNI voxel
        x = to_frame(q[None], off)[0]
        if np.all(x > 30.0) and np.all(x < _FOV_MM - 30.0):
            centre = x
            break
    found = centre is not None
    if not found:  # pragma: no cover - extremely unlikely
        centre = _FOV_MM / 2.0
    # Mass effect: sample the anatomy at x - delta(x), delta = a (x - c) exp(-|x - c|^2 / (2 s^2)),
    # which expands the tissue around the centre and pushes its surroundings away (invertible, a < 1).
    mass_a, mass_s = rng.uniform(0.1, 0.35), 1.3 * r_eq

    def mass_push(x):
        """Output positions (N, 3) of anatomy found at x (N, 3) without mass effect."""
        y = x.copy()
        for _ in range(8):  # y - delta(y) = x, solved by fixed point (contraction as a < 1)
            dy = y - centre
            y = x + mass_a * dy * np.exp(-(dy ** 2).sum(1, keepdims=True) / (2 * mass_s ** 2))
        return y

    # Put the top of the (rotated, scaled, warped, pushed) brain top_margin mm below the top of the FOV.
    top = mass_push(to_frame(atlas["top_points"], off, iters=3))[:, 2].max()
    dz = (_FOV_MM[2] - top_margin) - top
    anchor[2] += dz
    off = mni_inv[:3, :3] @ (c_mni + m_lin @ (a_off - anchor)) + mni_inv[:3, 3]
    centre = to_frame(q[None], off)[0] if found else centre + np.array([0.0, 0.0, dz])

    # Brain sub-box of the output grid (inverse affine of the MNI brain bounding box, padded).
    corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])], float)
    fr = (corners - off) @ lin_inv.T  # frame mm
    b0 = np.clip(np.floor((fr.min(0) - 18.0) / sp - 0.5).astype(int), 0, shape)
    b1 = np.clip(np.ceil((fr.max(0) + 18.0) / sp + 0.5).astype(int), 0, shape)
    axes_mm = [(np.arange(b0[d], b1[d]) + 0.5) * sp for d in range(3)]
    u = disp_mni_vox(axes_mm)
    coords = np.empty((3, *(b1 - b0)), np.float32)
    for d in range(3):
        coords[d] = (lin[d, 0] * axes_mm[0][:, None, None] + lin[d, 1] * axes_mm[1][None, :, None]
                     + lin[d, 2] * axes_mm[2][None, None, :] + off[d]) + u[d]
    del u
    gx, gy, gz = (axes_mm[e] - centre[e] for e in range(3))
    ex, ey, ez = (np.exp(-g ** 2 / (2 * mass_s ** 2)) for g in (gx, gy, gz))
    gauss = (mass_a * ex[:, None, None] * ey[None, :, None] * ez[None, None, :]).astype(np.float32)
    for d in range(3):
        coords[d] -= gauss * (lin[d, 0] * gx[:, None, None] + lin[d, 1] * gy[None, :, None]
                              + lin[d, 2] * gz[None, None, :])
    del gauss
    tissue = {k: ndi.map_coordinates(atlas[k], coords, order=1, mode="constant", cval=0.0,
                                     output=np.float32, prefilter=False) for k in ("wm", "gm", "csf")}
    del coords
    brain = (tissue["wm"] + tissue["gm"] + tissue["csf"]) > 0.5
    # Sharpen the (population-average) probabilities a little, renormalise inside the brain.
    tot = np.zeros(brain.shape, np.float32)
    for k in tissue:
        tissue[k] *= np.sqrt(tissue[k])  # p ** 1.5
        tot += tissue[k]
    tot = np.where(brain, np.maximum(tot, 1e-3), 1.0)
    for k in tissue:
        tissue[k] = np.where(brain, tissue[k] / tot, 0).astype(np.float32)

    # Tumour box (voxel indices, clipped to the brain sub-box), coordinates relative to the centre.
    t0 = np.clip(np.floor((centre - half) / sp - 0.5).astype(int), b0, b1)
    t1 = np.clip(np.ceil((centre + half) / sp + 0.5).astype(int), b0, b1)
    sl = tuple(slice(t0[d] - b0[d], t1[d] - b0[d]) for d in range(3))
    rel = [(np.arange(t0[d], t1[d]) + 0.5) * sp - centre[d] for d in range(3)]
    box_axes = [r + half for r in rel]
    box_len = [2.0 * half] * 3
    bbrain = brain[sl]
    bwm, bgm = tissue["wm"][sl], tissue["gm"][sl]
    seg = np.zeros(brain.shape, np.uint8)
    info = {"type": tumour_type, "centre_vox": (centre / sp - 0.5).tolist()}

    def ellipsoid_radius(o, radii, rot):
        # normalised radius ||diag(1/radii) R^T (x - o)|| on the box grid
        acc = None
        for r_ax in range(3):
            w = rot[:, r_ax] / radii[r_ax]
            t = (w[0] * (rel[0] - o[0])[:, None, None] + w[1] * (rel[1] - o[1])[None, :, None]
                 + w[2] * (rel[2] - o[2])[None, None, :])
            acc = t * t if acc is None else acc + t * t
        return np.sqrt(acc, dtype=np.float32)

    if bbrain.any():
        r = None
        for o, radii, rot in lobes:
            rl = ellipsoid_radius(o, radii, rot)
            r = rl if r is None else np.minimum(r, rl)
        r = r * np.exp(0.4 * _dct_eval(c_shape, box_axes, box_len))
        # envelope: grow r towards the box faces so the lesion never reaches them (no flat cuts)
        dist = np.sqrt(rel[0][:, None, None] ** 2 + rel[1][None, :, None] ** 2 + rel[2][None, None, :] ** 2)
        env = np.exp(8.0 * np.maximum(dist / half - 0.75, 0.0)).astype(np.float32)
        r = r * env
        # Oedema spreads along white matter and spares CSF.
        cidx = np.clip(np.floor(centre / sp).astype(int) - t0, 0, np.array(bbrain.shape) - 1)
        bcsf = tissue["csf"][sl]
        # Tumour core first: its own irregular field, kept out of CSF (ventricles, sulci).
        r_core = None
        for o, radii, rot in core_lobes:
            rl = ellipsoid_radius(o, radii, rot)
            r_core = rl if r_core is None else np.minimum(r_core, rl)
        r_core = r_core * np.exp(0.35 * _dct_eval(c_core, box_axes, box_len))
        r_core = np.where(bbrain, r_core * env / (1.0 - 0.6 * bcsf), np.inf).astype(np.float32)
        tc = _component_at(r_core < _quantile_threshold(r_core, round(tc_frac * v_wt / vox_vol_ml)), cidx)
        # Oedema spreads along white matter and spares CSF; it always surrounds the core (>= ~3 mm)
        # wherever there is brain tissue.
        ring = ndi.binary_dilation(tc, iterations=max(1, int(round(2.0 / sp)))) & bbrain & (bcsf < 0.5)
        tissue_factor = 0.4 + 0.9 * bwm + 0.25 * bgm
        r_wt = np.where(bbrain, r / tissue_factor, np.inf).astype(np.float32)
        r_forced = np.where(ring | tc, -1.0, r_wt).astype(np.float32)
        t_wt = _quantile_threshold(r_forced, round(v_wt / vox_vol_ml))
        wt = _component_at((r_forced < t_wt) | tc, cidx) | tc
        del r_forced
        n_wt, n_tc = int(wt.sum()), int(tc.sum())
        t_wt = max(t_wt, 1e-3)
        if tumour_type == "enhancing":
            # necrosis inside the core, at least ~1.5 mm from its border: an enhancing rim around it
            inner = ndi.binary_erosion(tc, iterations=max(1, int(round(1.5 / sp))))
            r_nec = np.where(inner, r_core * np.exp(0.35 * _dct_eval(c_nec, box_axes, box_len)), np.inf)
            ncr = r_nec < _quantile_threshold(r_nec, round(ncr_frac * n_tc)) if ncr_frac * n_tc >= 1 else tc & False
        else:  # mostly non-enhancing core with a few enhancing spots (possibly none)
            n_et = int(round((1.0 - ncr_frac) * n_tc))
            spots = np.where(tc, -_dct_eval(c_spot, box_axes, box_len), np.inf)
            et_spots = spots < _quantile_threshold(spots, n_et) if n_et >= 1 else tc & False
            ncr = tc & ~et_spots
        bseg = np.zeros(wt.shape, np.uint8)
        bseg[wt] = ED
        bseg[tc] = ET
        bseg[ncr] = NCR
        seg[sl] = bseg
        info.update(wt_ml=n_wt * vox_vol_ml, tc_ml=n_tc * vox_vol_ml, et_ml=int((bseg == ET).sum()) * vox_vol_ml)
        # soft (partial-volume) class weights, texture and oedema strength
        sig = max(0.8 / sp, 0.4)
        w_wt = ndi.gaussian_filter(wt.astype(np.float32), sig)
        w_tc = ndi.gaussian_filter(tc.astype(np.float32), sig)
        w_ncr = ndi.gaussian_filter(ncr.astype(np.float32), sig)
        tex = 1.0 + 0.1 * _dct_eval(c_tex, box_axes, box_len)
        with np.errstate(invalid="ignore"):
            g = 0.62 + 0.38 * np.clip(1.0 - r_wt / (1.2 * t_wt), 0, 1) + 0.08 * _dct_eval(c_ed, box_axes, box_len)
        g = np.clip(np.nan_to_num(g, nan=0.6, posinf=0.6, neginf=0.6), 0.5, 1.0).astype(np.float32)
    else:  # pragma: no cover
        info.update(wt_ml=0.0, tc_ml=0.0, et_ml=0.0)

    # ---- images (computed on the brain voxels only)
    bias_coefs = [_dct_coefs(rng, 3, 1.0) * rng.uniform(0.05, 0.1) for _ in MODALITIES]
    snr = rng.uniform(20.0, 35.0)
    axes_sub = [(np.arange(b0[d], b1[d]) + 0.5) * sp for d in range(3)]
    bidx = np.flatnonzero(brain)
    flat = {k: tissue[k].ravel()[bidx] for k in ("wm", "gm", "csf")}
    if bbrain.any():
        pos = np.full(brain.shape, -1, np.int64)
        pos.ravel()[bidx] = np.arange(bidx.size)
        pos_box = pos[sl].ravel()
        del pos
        sel = pos_box >= 0
        tgt = pos_box[sel]
        tw = {k: v.ravel()[sel] for k, v in (("wt", w_wt), ("tc", w_tc), ("ncr", w_ncr), ("tex", tex), ("g", g))}
    images = {}
    sub_slice = tuple(slice(b0[d], b1[d]) for d in range(3))
    for m, bc in zip(MODALITIES, bias_coefs):
        mu_wm, mu_gm, mu_csf, mu_ed, mu_ncr, mu_et, mu_net = means[m]
        img = flat["wm"] * mu_wm + flat["gm"] * mu_gm + flat["csf"] * mu_csf
        if bbrain.any():
            base = img[tgt]
            mu_core = mu_ncr if tumour_type == "enhancing" else mu_net
            ed_val = (1.0 - tw["g"]) * base + tw["g"] * (mu_ed * tw["tex"])
            img[tgt] = (base * (1.0 - tw["wt"]) + ed_val * (tw["wt"] - tw["tc"])
                        + mu_et * tw["tex"] * (tw["tc"] - tw["ncr"]) + mu_core * tw["tex"] * tw["ncr"])
        img *= np.exp(_dct_eval(bc, axes_sub, _FOV_MM).ravel()[bidx])
        img += (mu_wm / snr) * rng.standard_normal(img.shape, dtype=np.float32)  # Gaussian noise
        sub = np.zeros(brain.shape, np.int16)
        sub.ravel()[bidx] = np.clip(np.rint(img), 0, 32767).astype(np.int16)
        full = np.zeros(tuple(shape), np.int16)
        full[sub_slice] = sub
        images[m] = full
    seg[~brain] = 0
    seg_full = np.zeros(tuple(shape), np.uint8)
    seg_full[b0[0]:b1[0], b0[1]:b1[1], b0[2]:b1[2]] = seg
    if not return_maps:
        return images, seg_full, out_aff
    maps = {}
    for k in ("wm", "gm", "csf"):
        a = np.zeros(tuple(shape), np.float32)
        a[b0[0]:b1[0], b0[1]:b1[1], b0[2]:b1[2]] = tissue[k]
        maps[k] = a
    bfull = np.zeros(tuple(shape), bool)
    bfull[b0[0]:b1[0], b0[1]:b1[1], b0[2]:b1[2]] = brain
    maps["brain"] = bfull
    maps["info"] = info
    return images, seg_full, out_aff, maps


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------
def case_id(layout: str, index: int) -> str:
    """Case identifier of case ``index`` (0-based): ``BraTS2021_00000``, ``BraTS-GLI-00000-000``, ``BRATS_001``."""
    if layout == "2021":
        return f"BraTS2021_{index:05d}"
    if layout == "2023":
        return f"BraTS-GLI-{index:05d}-000"
    if layout == "msd":
        return f"BRATS_{index + 1:03d}"
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def _case_files(layout: str, index: int, labelled: bool) -> dict[str, str]:
    """Relative paths of one case's files: keys modality names / "image" (msd) and "seg"."""
    cid = case_id(layout, index)
    if layout == "msd":
        files = {"image": f"{'imagesTr' if labelled else 'imagesTs'}/{cid}.nii.gz"}
        if labelled:
            files["seg"] = f"labelsTr/{cid}.nii.gz"
        return files
    sep, names = _FILE_SUFFIXES[layout]
    files = {m: f"{cid}/{cid}{sep}{names[m]}.nii.gz" for m in MODALITIES}
    if labelled:
        files["seg"] = f"{cid}/{cid}{sep}seg.nii.gz"
    return files


def planned_files(cases: int, layout: str, unlabelled: int = 0) -> list[str]:
    """All relative paths (files only) that :func:`write_dataset` writes for these arguments."""
    out = []
    for i in range(cases):
        out.extend(_case_files(layout, i, i < cases - unlabelled).values())
    if layout == "msd":
        out.append("dataset.json")
    return out


def _write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _save_nifti(arr: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Save a NIfTI-1 .nii.gz with qform = sform = ``affine`` (codes 1), mm units, gzip mtime 0."""
    img = nib.Nifti1Image(arr, affine)
    img.header.set_data_dtype(arr.dtype)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    # gzip.compress writes no file name; mtime=0 makes the bytes reproducible.
    _write_bytes(path, gzip.compress(img.to_bytes(), compresslevel=1, mtime=0))


def _check_out_dir(out: Path, planned: list[str]) -> None:
    """Refuse to write into a directory that holds a different dataset.

    A different dataset is any NIfTI image or ``dataset.json`` under ``out`` that this run would
    not (re)write (another layout, more cases, a label that would now be missing). Other files
    (notes, PNG renders) are left alone. Nothing is ever deleted.
    """
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    wanted = set(planned)
    foreign = []
    for p in sorted(out.rglob("*")):
        if not p.is_file() or not (p.name.endswith((".nii", ".nii.gz")) or p.name == "dataset.json"):
            continue
        rel = p.relative_to(out).as_posix()
        if rel not in wanted:
            foreign.append(rel)
    if foreign:
        more = f" (and {len(foreign) - 5} more)" if len(foreign) > 5 else ""
        raise FileExistsError(
            f"{out} holds a different dataset: {', '.join(foreign[:5])}{more} would not be rewritten by this "
            f"run; choose an empty or new directory (nothing was deleted)")


def _msd_dataset_json(cases: int, unlabelled: int) -> dict:
    training, test = [], []
    for i in range(cases):
        files = _case_files("msd", i, i < cases - unlabelled)
        if "seg" in files:
            training.append({"image": f"./{files['image']}", "label": f"./{files['seg']}"})
        else:
            test.append(f"./{files['image']}")
    return msd_dataset_json(training, test)


def msd_dataset_json(training: list[dict], test: list[str]) -> dict:
    """An MSD Task01 ``dataset.json`` for these ``training`` entries and ``test`` image paths."""
    return {
        "name": "BRATS",
        "description": "Synthetic gliomas (oedema, non-enhancing/necrotic core, enhancing tumour) on the "
                       "MNI ICBM152 2009a anatomy, in the layout of MSD Task01_BrainTumour; generated by "
                       "custom.synthetic, not patient data",
        "reference": "Layout of the Medical Segmentation Decathlon Task01_BrainTumour (BraTS 2016/2017); "
                     "anatomy: MNI ICBM152 nonlinear 2009a (Fonov et al. 2011)",
        "licence": "CC-BY-SA 4.0",
        "release": "synthetic 1.0",
        "tensorImageSize": "4D",
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
        "numTraining": len(training),
        "numTest": len(test),
        "training": training,
        "test": test,
    }


def encode_labels(seg: np.ndarray, layout: str) -> np.ndarray:
    """Convert an internal-encoding label map to ``layout``'s label values (uint8)."""
    lut = np.zeros(256, np.uint8)
    for k, v in LABEL_VALUES[layout].items():
        lut[k] = v
    return lut[seg]


def write_dataset(out, cases: int, seed: int = 0, layout: str = "2021", size: str = "full",
                  unlabelled: int = 0, verbose: bool = False) -> list[str]:
    """Write ``cases`` synthetic cases (indices 0..cases-1) under ``out`` in ``layout``.

    The last ``unlabelled`` cases get no label file (2021/2023) or go to ``imagesTs`` (msd).
    Refuses (``FileExistsError``) an ``out`` holding NIfTI files or a ``dataset.json`` this call
    would not write (a different dataset); overwrites its own files; never deletes anything. Returns the written case ids in order.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    _check_size(size)
    cases, unlabelled, seed = int(cases), int(unlabelled), int(seed)
    if cases < 1:
        raise ValueError("cases must be >= 1")
    if not 0 <= unlabelled <= cases:
        raise ValueError("unlabelled must be between 0 and cases")
    if seed < 0:
        raise ValueError("seed must be >= 0")
    out = Path(out)
    _check_out_dir(out, planned_files(cases, layout, unlabelled))
    out.mkdir(parents=True, exist_ok=True)
    ids = []
    for i in range(cases):
        t = time.perf_counter()
        labelled = i < cases - unlabelled
        files = _case_files(layout, i, labelled)
        images, seg, affine = generate_case(i, seed, size)
        for rel in files.values():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
        if layout == "msd":
            vol = np.stack([images[m] for m in _MSD_CHANNELS], axis=-1)
            _save_nifti(vol, affine, out / files["image"])
        else:
            for m in MODALITIES:
                _save_nifti(images[m], affine, out / files[m])
        if labelled:
            _save_nifti(encode_labels(seg, layout), affine, out / files["seg"])
        ids.append(case_id(layout, i))
        if verbose:
            print(f"{ids[-1]}: {time.perf_counter() - t:.1f} s{'' if labelled else ' (unlabelled)'}", flush=True)
    if layout == "msd":
        text = json.dumps(_msd_dataset_json(cases, unlabelled), indent=4) + "\n"
        _write_bytes(out / "dataset.json", text.encode())
    return ids


def _int_at_least(minimum: int):
    """argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {v}")
        return v

    return parse


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m custom.synthetic",
        description="Write synthetic BraTS-like glioma cases (MNI ICBM152 anatomy) in a real BraTS release layout.")
    p.add_argument("--out", required=True, type=Path,
                   help="output directory (new, empty, or the same dataset's: its files are overwritten)")
    p.add_argument("--cases", type=_int_at_least(1), default=4, help="number of cases (default 4)")
    p.add_argument("--seed", type=_int_at_least(0), default=0, help="dataset seed (default 0)")
    p.add_argument("--layout", choices=LAYOUTS, default="2021",
                   help="2021: BraTS2021_XXXXX/..._{t1,t1ce,t2,flair,seg}; 2023: BraTS-GLI-XXXXX-000/...-"
                        "{t1n,t1c,t2w,t2f,seg}; msd: Task01_BrainTumour (default 2021)")
    p.add_argument("--size", choices=SIZES, default="full",
                   help="full: 240x240x155 at 1 mm; small: 96x96x62 at 2.5 mm (default full)")
    p.add_argument("--unlabelled", type=_int_at_least(0), default=0,
                   help="write the last K cases without labels (default 0)")
    p.add_argument("-q", "--quiet", action="store_true", help="do not print per-case progress")
    args = p.parse_args(argv)
    if args.unlabelled > args.cases:
        p.error(f"--unlabelled ({args.unlabelled}) must not exceed --cases ({args.cases})")
    try:
        ids = write_dataset(args.out, args.cases, args.seed, args.layout, args.size, args.unlabelled,
                            verbose=not args.quiet)
    except FileExistsError as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    if not args.quiet:
        print(f"wrote {len(ids)} {args.layout} cases ({args.size}) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
