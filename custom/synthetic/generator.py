"""One synthetic case: plan a tumour, warp the anatomy around it, draw the labels, form the images."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from custom.synthetic.anatomy import choroid_plexus, skull_strip_border, vessels, warp_anatomy, white_matter_hyperintensities
from custom.synthetic.fields import smooth_field
from custom.synthetic.grid import check_size
from custom.synthetic.imaging import apply_style, form_images
from custom.synthetic.tumour import ED, ET, NCR, draw_tumour, plan_tumour


def generate_case(index: int, seed: int = 0, size: str = "full", return_maps: bool = False):
    """Generate case ``index`` of dataset ``seed`` on grid ``size`` (``custom.synthetic.SIZES``).

    Returns ``(images, seg, affine)``, plus ``maps`` when ``return_maps``:

    * ``images``: dict ``{"t1", "t1ce", "t2", "flair"}`` of arrays ``(H, W, D)`` (voxel axes L, P,
      S), all of the case's intensity style: int16 or uint16 (zero background), float32 raw (zero
      background) or float32 z-scored (background = the image minimum);
    * ``seg``: uint8 ``(H, W, D)``, 0 background, 1 necrotic / non-enhancing core, 2 oedema, 3 ET;
    * ``affine``: 4x4 voxel-to-world affine in mm (:func:`custom.synthetic.grid_affine`);
    * ``maps``: float32 ``"wm"``, ``"gm"``, ``"csf"`` (before the tumour), bool ``"brain"`` and
      ``"kept"`` (the skull-stripping mask), and ``"info"`` (tumour type, foci, volumes in mL,
      intensity style, contrast, artefacts).
    """
    check_size(size)
    index, seed = int(index), int(seed)
    if index < 0 or seed < 0:
        raise ValueError("index and seed must be non-negative integers")
    rng = np.random.default_rng([seed, index])
    plan = plan_tumour(rng)
    mass = rng.uniform(0.05, 0.4) * min(1.0, plan.wt_ml / 40.0) ** 0.5
    anat = warp_anatomy(rng, size, plan.r_eq, mass)
    sp = anat.spacing
    seg = np.zeros(anat.brain.shape, np.uint8)
    seg_box, det = draw_tumour(rng, plan, anat)
    box = det["box"]
    seg[box] = seg_box
    zeros = np.zeros(anat.brain.shape, np.float32)
    vessel_map = vessels(rng, anat, int(rng.integers(10, 50))) if rng.random() < 0.85 else zeros
    choroid = choroid_plexus(rng, anat) if rng.random() < 0.8 else zeros
    wmh = white_matter_hyperintensities(rng, anat, int(rng.integers(1, 25))) if rng.random() < 0.35 else zeros
    kept, remnant = skull_strip_border(rng, anat) if rng.random() < 0.7 else (anat.brain, zeros)
    seg[~kept] = 0

    pv = max(0.6 / sp, 0.35)  # partial volume: soft class maps

    def soft(mask):
        return ndi.gaussian_filter(mask.astype(np.float32), pv)

    cyst = np.zeros(seg.shape, bool)
    cyst[box] = det["cyst"]
    ncr = (seg == NCR) & ~cyst
    necrotic = plan.kind in ("necrotic", "cystic")
    wt_soft = soft(seg > 0)
    away = 1.0 - soft(ndi.binary_dilation(seg > 0, iterations=max(1, int(round(3.0 / sp)))))
    weights = {
        "wm": anat.wm, "gm": anat.gm, "csf": anat.csf,
        "ed": soft(seg == ED), "et": soft(seg == ET), "cyst": soft(cyst),
        "nec": soft(ncr) if necrotic else zeros, "net": zeros if necrotic else soft(ncr),
        "vessel": vessel_map * (1.0 - wt_soft), "choroid": choroid * away, "wmh": wmh * away, "remnant": remnant,
    }
    core_distance = np.full(seg.shape, 99.0, np.float32)
    core_distance[box] = det["core_distance"]
    fade = rng.uniform(15.0, 80.0)  # mm: how fast oedema's signal fades away from the core
    gain = 0.65 + 0.35 * np.exp(-core_distance / fade) + 0.1 * smooth_field(rng, seg.shape, sp, 10, 1.0)
    gain = np.clip(gain, 0.5, 1.0).astype(np.float32)
    images_sub, acq = form_images(rng, weights, anat.brain, kept, sp, gain)
    images_sub, style = apply_style(rng, images_sub, kept)

    shape = tuple(int(n) for n in anat.shape)
    sub = anat.sub_slice
    images = {}
    for s, img in images_sub.items():
        fill = float(img.min()) if style == "zscore" else 0
        full = np.full(shape, fill, img.dtype)
        full[sub] = img
        images[s] = full
    seg_full = np.zeros(shape, np.uint8)
    seg_full[sub] = seg
    if not return_maps:
        return images, seg_full, anat.affine
    vox_ml = sp ** 3 / 1000.0
    info = {
        "type": plan.kind, "foci": plan.n_foci, "style": style, **acq, **anat.info,
        "centre_vox": (anat.centre / sp - 0.5).tolist(),
        "wt_ml": float((seg > 0).sum() * vox_ml), "tc_ml": float(np.isin(seg, (NCR, ET)).sum() * vox_ml),
        "et_ml": float((seg == ET).sum() * vox_ml),
    }
    maps = {"info": info}
    for k, a in (("wm", anat.wm), ("gm", anat.gm), ("csf", anat.csf), ("brain", anat.brain), ("kept", kept)):
        full = np.zeros(shape, a.dtype)
        full[sub] = a
        maps[k] = full
    return images, seg_full, anat.affine, maps
