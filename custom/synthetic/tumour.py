"""Glioma label maps: the lesion's plan (type, size, foci) and its drawing on the warped anatomy.

Types (``TYPES``): ``necrotic`` (enhancing rim of uneven thickness around necrosis, often with
nodules), ``cystic`` (thin enhancing rim around a fluid cyst), ``nodular`` (solid core with patchy,
nodular enhancement), ``non-enhancing`` (low-grade-like: a non-enhancing core, no ET at all). Oedema
infiltrates along white matter (finger-like borders that spare the cortex) and always surrounds the
core; lesions may be multifocal; whole-tumour volumes span about 1 to 250 mL.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from custom.synthetic.anatomy import Anatomy
from custom.synthetic.fields import component_at, dct_coefs, dct_eval, quantile_threshold, random_rotation

NCR, ED, ET = 1, 2, 3
"""Label values of the generator: necrotic / non-enhancing core, oedema, enhancing tumour."""

TYPES = ("necrotic", "cystic", "nodular", "non-enhancing")
TYPE_PROBS = (0.55, 0.12, 0.18, 0.15)


@dataclass
class TumourPlan:
    """What to draw: ``kind`` (one of ``TYPES``), whole-tumour volume (mL), core fraction, foci."""

    kind: str
    wt_ml: float
    tc_frac: float
    n_foci: int

    @property
    def r_eq(self) -> float:
        """Radius (mm) of a sphere of the whole tumour's volume."""
        return (3.0 * self.wt_ml * 1000.0 / (4.0 * np.pi)) ** (1.0 / 3.0)


def plan_tumour(rng: np.random.Generator) -> TumourPlan:
    kind = TYPES[int(rng.choice(len(TYPES), p=TYPE_PROBS))]
    if rng.random() < 0.1:
        wt_ml = float(np.exp(rng.uniform(np.log(1.0), np.log(20.0))))  # small lesions
    else:
        wt_ml = float(np.exp(rng.uniform(np.log(30.0), np.log(250.0))))
    tc_frac = rng.uniform(0.08, 0.5) if kind != "non-enhancing" else rng.uniform(0.25, 0.8)
    n_foci = 1 if rng.random() < 0.85 else int(rng.integers(2, 4))
    return TumourPlan(kind, wt_ml, tc_frac, n_foci)


def _lobed_radius(rng, rel, r_eq, n_lobes, spread, offset):
    """Normalised radius field of a union of random ellipsoids around ``offset`` (mm)."""
    r = None
    for k in range(n_lobes):
        o = offset + (np.zeros(3) if k == 0 else rng.normal(0.0, spread * r_eq, 3))
        radii = r_eq * rng.uniform(0.55, 1.25, 3) * (1.0 if k == 0 else rng.uniform(0.45, 0.85))
        rot = random_rotation(rng)
        acc = None
        for ax in range(3):
            w = rot[:, ax] / radii[ax]
            t = w[0] * (rel[0] - o[0])[:, None, None] + w[1] * (rel[1] - o[1])[None, :, None] + w[2] * (rel[2] - o[2])[None, None, :]
            acc = t * t if acc is None else acc + t * t
        rl = np.sqrt(acc, dtype=np.float32)
        r = rl if r is None else np.minimum(r, rl)
    return r


def draw_tumour(rng: np.random.Generator, plan: TumourPlan, anat: Anatomy) -> tuple[np.ndarray, dict]:
    """Label map ``(h, w, d)`` uint8 on ``anat``'s sub-box (0, NCR, ED, ET) and the drawing's details.

    Details: ``cyst`` (bool map of fluid-filled core), ``core_distance`` (float32, mm from the
    core, for the oedema's signal gradient), ``box`` (the tumour box slices) and volumes in mL.
    """
    sp = anat.spacing
    vox_ml = sp ** 3 / 1000.0
    sub_shape = np.array(anat.brain.shape)
    r_eq = plan.r_eq
    # secondary foci: 15-45 mm from the main one
    foci = [np.zeros(3)]
    for _ in range(plan.n_foci - 1):
        d = rng.standard_normal(3)
        foci.append(d / np.linalg.norm(d) * rng.uniform(15.0, 45.0))
    reach = max(np.linalg.norm(f) for f in foci)
    half = min(2.4 * r_eq + 8.0 + reach, 95.0)
    centre_sub = anat.centre - anat.b0 * sp  # mm from the sub-box origin
    t0 = np.clip(np.floor((centre_sub - half) / sp).astype(int), 0, sub_shape)
    t1 = np.clip(np.ceil((centre_sub + half) / sp).astype(int), 0, sub_shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(t0, t1))
    rel = [(np.arange(t0[d], t1[d]) + 0.5) * sp - centre_sub[d] for d in range(3)]
    box_axes, box_len = [r + half for r in rel], [2.0 * half] * 3
    brain, wm, gm, csf = anat.brain[box], anat.wm[box], anat.gm[box], anat.csf[box]
    seg_box = np.zeros(brain.shape, np.uint8)
    details = {"kind": plan.kind, "foci": plan.n_foci, "box": box}
    if not brain.any() or min(brain.shape) < 2:  # pragma: no cover
        details.update(wt_ml=0.0, tc_ml=0.0, et_ml=0.0, cyst=np.zeros(brain.shape, bool))
        return seg_box, details
    dist = np.sqrt(rel[0][:, None, None] ** 2 + rel[1][None, :, None] ** 2 + rel[2][None, None, :] ** 2)
    env = np.exp(8.0 * np.maximum(dist / half - 0.8, 0.0)).astype(np.float32)  # keeps lesions off the box faces
    # whole-tumour potential: lobes, coarse and fine irregularity, infiltration along white matter
    r = None
    weights = [1.0] + [rng.uniform(0.2, 0.6) for _ in foci[1:]]
    for f, w in zip(foci, weights):
        rf = _lobed_radius(rng, rel, r_eq * w ** (1 / 3), int(rng.integers(1, 4)), 0.4, f)
        r = rf if r is None else np.minimum(r, rf)
    r = r * np.exp(rng.uniform(0.25, 0.5) * dct_eval(dct_coefs(rng, 10, 2.0), box_axes, box_len))
    r = r * np.exp(rng.uniform(0.05, 0.2) * dct_eval(dct_coefs(rng, 20, 1.0), box_axes, box_len)) * env
    wm_pref = rng.uniform(1.0, 3.0)  # how strongly oedema follows white matter (finger-like borders)
    tissue_factor = 0.3 + wm_pref * wm ** 1.5 + 0.15 * gm
    r_wt = np.where(brain & (csf < 0.6), r / tissue_factor, np.inf).astype(np.float32)
    # core: its own lobes near each focus, kept out of CSF
    r_core = None
    for f, w in zip(foci, weights):
        rc = _lobed_radius(rng, rel, r_eq * w ** (1 / 3), int(rng.integers(1, 4)), 0.3, f + rng.normal(0.0, 0.12 * r_eq, 3))
        r_core = rc if r_core is None else np.minimum(r_core, rc)
    r_core = r_core * np.exp(0.35 * dct_eval(dct_coefs(rng, 10, 1.5), box_axes, box_len))
    r_core = np.where(brain, r_core * env / (1.0 - 0.6 * csf), np.inf).astype(np.float32)
    cidx = np.clip(np.floor(centre_sub / sp).astype(int) - t0, 0, np.array(brain.shape) - 1)
    n_wt = max(1, round(plan.wt_ml / vox_ml))
    tc = r_core < quantile_threshold(r_core, round(plan.tc_frac * n_wt))
    if plan.n_foci == 1:
        tc = component_at(tc, cidx)
    ring = ndi.binary_dilation(tc, iterations=max(1, int(round(rng.uniform(2.0, 5.0) / sp)))) & brain & (csf < 0.6)
    r_forced = np.where(ring | tc, -1.0, r_wt).astype(np.float32)
    wt = (r_forced < quantile_threshold(r_forced, n_wt)) | tc
    if plan.n_foci == 1:
        wt = component_at(wt, cidx) | tc
    # inside the core: enhancing tumour, necrosis / non-enhancing tumour, cysts
    inner_mm = ndi.distance_transform_edt(tc, sampling=sp).astype(np.float32)
    cyst = np.zeros(tc.shape, bool)
    if plan.kind in ("necrotic", "cystic"):
        base = rng.uniform(1.5, 5.0) if plan.kind == "necrotic" else rng.uniform(1.0, 2.5)
        thick = base * np.exp(rng.uniform(0.3, 0.7) * dct_eval(dct_coefs(rng, 12, 1.2), box_axes, box_len))
        et = tc & (inner_mm <= np.maximum(thick, sp))  # the core's border voxels lie sp from the outside
        if plan.kind == "necrotic":
            et |= _nodules(rng, tc, sp, int(rng.integers(0, 5)))
        else:
            cyst = tc & ~et
    elif plan.kind == "nodular":
        patch = dct_eval(dct_coefs(rng, 14, 1.0), box_axes, box_len)
        vals = patch[tc]
        et = tc & (patch > np.quantile(vals, rng.uniform(0.3, 0.75))) if vals.size else tc & False
        et |= _nodules(rng, tc, sp, int(rng.integers(1, 5)))
    else:
        et = tc & False
    et &= tc
    seg_box[wt] = ED
    seg_box[tc] = NCR
    seg_box[et] = ET
    seg_box[~brain] = 0
    details.update(
        cyst=cyst & (seg_box == NCR),
        core_distance=ndi.distance_transform_edt(~tc, sampling=sp).astype(np.float32) if tc.any() else np.full(tc.shape, 99.0, np.float32),
        wt_ml=float((seg_box > 0).sum() * vox_ml),
        tc_ml=float(np.isin(seg_box, (NCR, ET)).sum() * vox_ml),
        et_ml=float((seg_box == ET).sum() * vox_ml),
    )
    return seg_box, details


def _nodules(rng, tc: np.ndarray, sp: float, count: int) -> np.ndarray:
    """``count`` enhancing nodules (2-6 mm radius) seeded in the core ``tc`` (bool)."""
    out = np.zeros(tc.shape, bool)
    pts = np.argwhere(tc)
    if count == 0 or len(pts) == 0:
        return out
    seeds = np.zeros(tc.shape, bool)
    for _ in range(count):
        seeds[tuple(pts[rng.integers(len(pts))])] = True
    dist = ndi.distance_transform_edt(~seeds, sampling=sp)
    return tc & (dist <= rng.uniform(2.0, 6.0))
