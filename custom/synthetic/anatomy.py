"""Normal anatomy on the output grid: the MNI ICBM152 2009a tissue maps that nilearn ships, warped
per case (random rotation, scale, smooth elastic field and a tumour's mass effect), plus structures
that matter to image formation: ventricles, choroid plexus, vessels, white-matter hyperintensities
and the ragged border that skull stripping leaves.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from custom.synthetic.fields import dct_coefs, dct_eval, dct_eval_points, rotation, smooth_field
from custom.synthetic.grid import FOV_MM, GRIDS, grid_affine


@functools.lru_cache(maxsize=1)
def atlas() -> dict:
    """MNI templates as float32 arrays (197 x 233 x 189, 1 mm) plus derived helpers (cached)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nilearn import datasets

        gm_img = datasets.load_mni152_gm_template(resolution=1)
        wm = np.asarray(datasets.load_mni152_wm_template(resolution=1).get_fdata(), np.float32)
        gm = np.asarray(gm_img.get_fdata(), np.float32)
        mask = datasets.load_mni152_brain_mask(resolution=1).get_fdata() > 0.5
    affine = np.asarray(gm_img.affine, float)
    gm = np.clip(gm, 0, 1) * mask
    wm = np.clip(wm, 0, 1) * mask
    scale = np.maximum(gm + wm, 1.0)
    gm, wm = gm / scale, wm / scale
    csf = np.where(mask, np.clip(1.0 - gm - wm, 0, 1), 0).astype(np.float32)
    lo, hi = np.argwhere(mask).min(0), np.argwhere(mask).max(0)
    depth = ndi.distance_transform_edt(mask[::2, ::2, ::2], sampling=2.0)  # mm, on a 2 mm grid (fast)
    depth = depth.repeat(2, 0).repeat(2, 1).repeat(2, 2)[: mask.shape[0], : mask.shape[1], : mask.shape[2]]
    zworld = affine[2, 2] * np.arange(mask.shape[2]) + affine[2, 3]
    # tumour centres: white matter (or deep grey matter) at least 6 mm inside the brain, above the cerebellum
    cand = ((wm > 0.45) | ((gm > 0.5) & (depth >= 20))) & (depth >= 6) & (zworld[None, None, :] > -22)
    return {
        "gm": np.ascontiguousarray(gm, np.float32),
        "wm": np.ascontiguousarray(wm, np.float32),
        "csf": np.ascontiguousarray(csf, np.float32),
        "depth": np.ascontiguousarray(depth, np.float32),
        "affine": affine,
        "bbox_vox": (lo, hi),
        "candidates": np.argwhere(cand),
        "top_points": np.argwhere(mask & ~np.roll(mask, -1, axis=2))[::3].astype(float),
    }


@dataclass
class Anatomy:
    """Warped anatomy on the sub-box ``b0:b1`` of the output grid (all arrays ``(h, w, d)`` float32).

    ``wm``, ``gm``, ``csf``: tissue probabilities (sum to 1 in ``brain``); ``depth``: mm inside the
    (unwarped) brain surface; ``centre``: the tumour centre in frame mm (voxel i spans
    ``[i, i + 1) * spacing`` along each axis of the full grid).
    """

    shape: np.ndarray
    spacing: float
    affine: np.ndarray
    b0: np.ndarray
    b1: np.ndarray
    wm: np.ndarray
    gm: np.ndarray
    csf: np.ndarray
    depth: np.ndarray
    brain: np.ndarray
    centre: np.ndarray
    info: dict = field(default_factory=dict)

    @property
    def sub_slice(self) -> tuple[slice, ...]:
        return tuple(slice(int(a), int(b)) for a, b in zip(self.b0, self.b1))

    def axes_mm(self) -> list[np.ndarray]:
        """Voxel-centre positions (frame mm) along each axis of the sub-box."""
        return [(np.arange(self.b0[d], self.b1[d]) + 0.5) * self.spacing for d in range(3)]


def warp_anatomy(rng: np.random.Generator, size: str, r_eq: float, mass_strength: float) -> Anatomy:
    """Random anatomy on grid ``size`` with a tumour site and a mass effect around it.

    ``r_eq`` (mm) is the radius of a sphere of the tumour's volume; ``mass_strength`` in [0, 0.45)
    the displacement gain of the mass effect (0: none), which expands the tissue around the tumour
    and pushes ventricles and midline away.
    """
    atl = atlas()
    shape, sp = GRIDS[size]
    shape = np.array(shape)
    out_aff = grid_affine(size)
    angles = np.clip(rng.normal(0.0, 4.0, 3), -10, 10)
    # MNI152 is ~7 % larger than a typical adult brain (and the SRI24 space of BraTS): base scale 0.93
    scale = 0.93 * rng.uniform(0.9, 1.08) * np.clip(1.0 + rng.normal(0, 0.03, 3), 0.93, 1.07)
    shift_xy = np.clip(rng.normal(0.0, 4.0, 2), -10, 10)
    top_margin = rng.uniform(3.0, 12.0)
    elastic = [dct_coefs(rng, 7, 2.0) * rng.uniform(1.5, 4.0) for _ in range(3)]  # mm RMS
    m_lin = rotation(angles).T @ np.diag(1.0 / scale)
    mni_aff = atl["affine"]
    lo, hi = atl["bbox_vox"]
    lo_w, hi_w = mni_aff[:3, :3] @ lo + mni_aff[:3, 3], mni_aff[:3, :3] @ hi + mni_aff[:3, 3]
    c_mni = np.array([(lo_w[0] + hi_w[0]) / 2, (lo_w[1] + hi_w[1]) / 2, hi_w[2]])
    fov_centre = out_aff[:3, :3] @ ((shape - 1) / 2.0) + out_aff[:3, 3]
    fov_top = out_aff[2, 2] * (shape[2] - 0.5) + out_aff[2, 3]
    anchor = np.array([fov_centre[0] + shift_xy[0], fov_centre[1] + shift_xy[1], fov_top - top_margin])
    a_lin = out_aff[:3, :3] / sp
    a_off = out_aff[:3, 3] - 0.5 * np.diag(out_aff[:3, :3])
    mni_inv = np.linalg.inv(mni_aff)
    lin = mni_inv[:3, :3] @ m_lin @ a_lin  # frame mm -> MNI voxel (linear part)
    lin_inv = np.linalg.inv(lin)

    def offset():
        return mni_inv[:3, :3] @ (c_mni + m_lin @ (a_off - anchor)) + mni_inv[:3, 3]

    def to_frame(q, off, iters=5):
        """MNI voxel positions q (N, 3) -> frame mm (N, 3), inverting the elastic part by fixed point."""
        x = (q - off) @ lin_inv.T
        for _ in range(iters):
            ud = np.stack([mni_inv[d, d] * dct_eval_points(elastic[d], x, FOV_MM) for d in range(3)], axis=1)
            x = (q - ud - off) @ lin_inv.T
        return x

    off = offset()
    cands = atl["candidates"]
    centre, q = None, None
    for _ in range(64):
        q = cands[rng.integers(len(cands))].astype(float)
        x = to_frame(q[None], off)[0]
        if np.all(x > 25.0) and np.all(x < FOV_MM - 25.0):
            centre = x
            break
    found = centre is not None
    if not found:  # pragma: no cover - extremely unlikely
        centre = FOV_MM / 2.0
    mass_s = 1.3 * r_eq

    def mass_push(x):
        y = x.copy()
        for _ in range(8):
            dy = y - centre
            y = x + mass_strength * dy * np.exp(-(dy ** 2).sum(1, keepdims=True) / (2 * mass_s ** 2))
        return y

    top = mass_push(to_frame(atl["top_points"], off, iters=3))[:, 2].max()
    dz = (FOV_MM[2] - top_margin) - top
    anchor[2] += dz
    off = offset()
    centre = to_frame(q[None], off)[0] if found else centre + np.array([0.0, 0.0, dz])

    corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])], float)
    fr = (corners - off) @ lin_inv.T
    b0 = np.clip(np.floor((fr.min(0) - 20.0) / sp - 0.5).astype(int), 0, shape)
    b1 = np.clip(np.ceil((fr.max(0) + 20.0) / sp + 0.5).astype(int), 0, shape)
    axes_mm = [(np.arange(b0[d], b1[d]) + 0.5) * sp for d in range(3)]
    coords = np.empty((3, *(b1 - b0)), np.float32)
    for d in range(3):
        u = mni_inv[d, d] * dct_eval(elastic[d], axes_mm, FOV_MM)
        coords[d] = (lin[d, 0] * axes_mm[0][:, None, None] + lin[d, 1] * axes_mm[1][None, :, None]
                     + lin[d, 2] * axes_mm[2][None, None, :] + off[d]) + u
    gx, gy, gz = (axes_mm[e] - centre[e] for e in range(3))
    ex, ey, ez = (np.exp(-g ** 2 / (2 * mass_s ** 2)) for g in (gx, gy, gz))
    gauss = (mass_strength * ex[:, None, None] * ey[None, :, None] * ez[None, None, :]).astype(np.float32)
    for d in range(3):
        coords[d] -= gauss * (lin[d, 0] * gx[:, None, None] + lin[d, 1] * gy[None, :, None] + lin[d, 2] * gz[None, None, :])
    del gauss
    maps = {k: ndi.map_coordinates(atl[k], coords, order=1, mode="constant", cval=0.0, output=np.float32, prefilter=False)
            for k in ("wm", "gm", "csf", "depth")}
    del coords
    brain = (maps["wm"] + maps["gm"] + maps["csf"]) > 0.5
    sharpen = rng.uniform(1.2, 2.0)  # the templates are population averages: sharpen, renormalise
    tot = np.zeros(brain.shape, np.float32)
    for k in ("wm", "gm", "csf"):
        maps[k] = maps[k] ** sharpen
        tot += maps[k]
    tot = np.where(brain, np.maximum(tot, 1e-3), 1.0)
    for k in ("wm", "gm", "csf"):
        maps[k] = np.where(brain, maps[k] / tot, 0).astype(np.float32)
    return Anatomy(shape, sp, out_aff, b0, b1, maps["wm"], maps["gm"], maps["csf"], maps["depth"], brain, centre,
                   {"mass_effect": float(mass_strength), "mni_rotation_deg": [float(a) for a in angles]})


def ventricles(anat: Anatomy) -> np.ndarray:
    """Deep CSF (bool): the ventricles, at least 12 mm inside the brain surface."""
    return (anat.csf > 0.5) & (anat.depth > 12.0)


def choroid_plexus(rng: np.random.Generator, anat: Anatomy) -> np.ndarray:
    """Soft map (float32) of choroid plexus: tufts inside the ventricles (enhance in T1ce)."""
    vent = ventricles(anat)
    if not vent.any():
        return np.zeros(vent.shape, np.float32)
    f = smooth_field(rng, vent.shape, anat.spacing, 10, 1.0)
    sel = vent & (f > np.quantile(f[vent], rng.uniform(0.8, 0.95)))
    return ndi.gaussian_filter(sel.astype(np.float32), 0.6)


def vessels(rng: np.random.Generator, anat: Anatomy, count: int) -> np.ndarray:
    """Soft map (float32) of ``count`` vessels: smooth random walks, mostly in sulci and at the surface."""
    sp = anat.spacing
    shape = np.array(anat.brain.shape)
    out = np.zeros(anat.brain.shape, np.float32)
    superficial = np.argwhere(anat.brain & (anat.depth < 12.0) & (anat.csf > 0.2))
    deep = np.argwhere(anat.brain & (anat.depth >= 12.0))
    if len(superficial) == 0 or len(deep) == 0:
        return out
    for thick in (False, True):
        pts = []
        for _ in range(count // 4 if thick else count - count // 4):
            pool = deep if rng.random() < 0.2 else superficial
            p = pool[rng.integers(len(pool))].astype(float)
            d = rng.standard_normal(3)
            d /= np.linalg.norm(d)
            for _ in range(int(rng.integers(15, 60))):
                pts.append(p.copy())
                d += rng.normal(0, 0.35, 3)
                d /= np.linalg.norm(d)
                p = p + d * (1.5 / sp)
                if np.any(p < 0) or np.any(p > shape - 1) or not anat.brain[tuple(np.round(p).astype(int))]:
                    break
        if not pts:
            continue
        idx = np.clip(np.round(np.array(pts)).astype(int), 0, shape - 1)
        hits = np.zeros(anat.brain.shape, np.float32)
        np.add.at(hits, tuple(idx.T), 1.0)
        radius = (1.6 if thick else 0.8) / sp  # voxels
        sigma = max(radius, 0.5)
        peak = 1.0 / ((2 * np.pi) ** 1.5 * sigma ** 3)
        out = np.maximum(out, np.clip(ndi.gaussian_filter(hits, sigma) / peak * min(1.0, radius), 0, 1))
    return out


def white_matter_hyperintensities(rng: np.random.Generator, anat: Anatomy, count: int) -> np.ndarray:
    """Soft map (float32) of small FLAIR/T2-bright white-matter lesions (not tumour), mostly periventricular."""
    vent = ventricles(anat)
    near = ndi.binary_dilation(vent, iterations=max(1, int(round(6.0 / anat.spacing)))) & (anat.wm > 0.5) & ~vent
    pool_p, pool_d = np.argwhere(near), np.argwhere((anat.wm > 0.7) & (anat.depth > 8))
    out = np.zeros(anat.brain.shape, np.float32)
    if len(pool_d) == 0:
        return out
    hits = np.zeros(anat.brain.shape, np.float32)
    for _ in range(count):
        pool = pool_p if len(pool_p) and rng.random() < 0.6 else pool_d
        hits[tuple(pool[rng.integers(len(pool))])] = 1.0
    radius = rng.uniform(1.5, 4.0) / anat.spacing
    blobs = ndi.gaussian_filter(hits, radius) * ((2 * np.pi) ** 1.5 * radius ** 3)
    return np.clip(blobs * (anat.wm > 0.3), 0, 1).astype(np.float32)


def skull_strip_border(rng: np.random.Generator, anat: Anatomy) -> tuple[np.ndarray, np.ndarray]:
    """The mask a skull-stripping tool would keep, and the soft map of non-brain tissue it keeps.

    A random smooth margin between -3 mm (cortex cut away) and +4 mm (dura, vessels, fat left on)
    around the brain surface: returns ``(kept, remnant)``, bool and float32.
    """
    sp = anat.spacing
    inside = ndi.distance_transform_edt(anat.brain, sampling=sp)
    outside = ndi.distance_transform_edt(~anat.brain, sampling=sp)
    signed = np.where(anat.brain, -inside, outside).astype(np.float32)  # mm, positive outside
    f = smooth_field(rng, anat.brain.shape, sp, 12, 1.2)
    margin = rng.uniform(-0.5, 1.5) + rng.uniform(1.0, 2.5) * f  # mm
    kept = signed < margin
    kept = ndi.binary_opening(kept, iterations=1) | (anat.brain & (inside > 3.0))
    remnant = (kept & ~anat.brain).astype(np.float32)
    return kept, ndi.gaussian_filter(remnant, 0.5)
