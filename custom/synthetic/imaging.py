"""Image formation: tissue and lesion classes -> T1, T1ce, T2 and FLAIR images, randomised per case
and per sequence.

Contrasts are drawn around plausible values (relative to white matter, table ``CONTRASTS``) or, for
``RANDOM_CONTRAST_SHARE`` of the cases, at random (SynthSeg style). Then, per sequence: partial
volume (soft class maps), texture, thick-slice acquisition resampled to the grid, Gibbs ringing,
motion ghosts, a bias field, Rician noise; last the skull-stripping mask and the case's intensity
style (``STYLES``: raw int16, 12-bit uint16, raw float, z-scored float with a constant background).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from custom.synthetic.fields import smooth_field

SEQUENCES = ("t1", "t1ce", "t2", "flair")
CLASSES = ("wm", "gm", "csf", "ed", "nec", "net", "et", "cyst", "vessel", "choroid", "wmh", "remnant")
# Mean signal of each class relative to white matter (jittered per case).
CONTRASTS = {
    #          wm    gm    csf   ed    nec   net   et    cyst  vessel choroid wmh  remnant
    "t1":    (1.0, 0.72, 0.35, 0.78, 0.5, 0.7, 0.85, 0.35, 0.8, 0.75, 0.85, 0.9),
    "t1ce":  (1.0, 0.75, 0.35, 0.8, 0.45, 0.72, 1.9, 0.35, 2.0, 1.8, 0.85, 1.5),
    "t2":    (1.0, 1.45, 3.3, 2.6, 2.8, 2.3, 1.9, 3.3, 0.6, 1.8, 2.2, 1.5),
    "flair": (1.0, 1.3, 0.35, 2.2, 1.4, 2.2, 1.8, 0.45, 0.8, 1.5, 1.9, 1.5),
}
RANDOM_CONTRAST_SHARE = 0.1
STYLES = ("int16", "uint16", "float", "zscore")
STYLE_PROBS = (0.6, 0.1, 0.15, 0.15)


def draw_contrasts(rng: np.random.Generator) -> tuple[dict[str, dict[str, float]], bool]:
    """Per-sequence class means (white matter = 1) and whether they are random (SynthSeg style)."""
    random = bool(rng.random() < RANDOM_CONTRAST_SHARE)
    out = {}
    for s in SEQUENCES:
        if random:
            vals = rng.uniform(0.15, 3.0, len(CLASSES))
            vals[0] = 1.0
        else:
            vals = np.array(CONTRASTS[s]) * np.exp(rng.normal(0.0, 0.12, len(CLASSES)))
            vals[0] = 1.0
        out[s] = dict(zip(CLASSES, vals.tolist()))
    if not random:  # the most variable lesion signals
        out["t1ce"]["et"] = rng.uniform(1.3, 3.0)
        out["t1ce"]["nec"] = rng.uniform(0.3, 0.8)
        out["flair"]["ed"] = rng.uniform(1.7, 3.0)  # oedema: usually the brightest FLAIR signal
        out["flair"]["nec"] = rng.uniform(0.4, 1.8)
        out["flair"]["net"] = rng.uniform(1.1, 2.2)
        out["flair"]["et"] = rng.uniform(1.0, 2.0)
        out["flair"]["csf"] = rng.uniform(0.2, 0.6)
        out["t1ce"]["vessel"] = rng.uniform(1.2, 2.8)
    return out, random


def _thick_slices(rng, img: np.ndarray, spacing: float) -> np.ndarray:
    """A 2D acquisition with 3-7 mm slices along one axis, interpolated back to the grid."""
    thickness = rng.uniform(3.0, 7.0)
    factor = thickness / spacing
    if factor < 1.3:
        return img
    axis = 2 if rng.random() < 0.7 else int(rng.integers(0, 2))
    blurred = ndi.gaussian_filter1d(img, thickness / 2.355 / spacing, axis=axis)
    n = img.shape[axis]
    zoom = [1.0, 1.0, 1.0]
    zoom[axis] = max(2, round(n / factor)) / n
    low = ndi.zoom(blurred, zoom, order=1)
    back = [1.0, 1.0, 1.0]
    back[axis] = n / low.shape[axis]
    return ndi.zoom(low, back, order=1).astype(np.float32)


def _ringing(rng, img: np.ndarray) -> np.ndarray:
    """Gibbs ringing: k-space truncated to 40-75 % along one axis."""
    axis = int(rng.integers(0, 3))
    k = np.fft.fftshift(np.fft.fft(img, axis=axis), axes=axis)
    n = img.shape[axis]
    keep = int(n * rng.uniform(0.4, 0.75)) // 2
    mask = np.zeros(n, bool)
    mask[n // 2 - keep: n // 2 + keep] = True
    shape = [1, 1, 1]
    shape[axis] = n
    k = k * mask.reshape(shape)
    return np.abs(np.fft.ifft(np.fft.ifftshift(k, axes=axis), axis=axis)).astype(np.float32)


def _ghosts(rng, img: np.ndarray) -> np.ndarray:
    """Motion ghosts: faint copies shifted along a phase-encoding axis."""
    axis = int(rng.integers(0, 2))
    n = img.shape[axis]
    out = img + rng.uniform(0.03, 0.12) * np.roll(img, n // 2, axis=axis)
    if rng.random() < 0.5:
        out += rng.uniform(0.02, 0.06) * np.roll(img, n // 4, axis=axis)
    return out.astype(np.float32)


def form_images(rng: np.random.Generator, weights: dict[str, np.ndarray], brain: np.ndarray, kept: np.ndarray,
                spacing: float, oedema_gain: np.ndarray) -> tuple[dict[str, np.ndarray], dict]:
    """Images (float32, white matter ~1 before the style) of every sequence on one grid.

    ``weights``: soft class maps of ``CLASSES`` (the normal tissues sum to 1 in ``brain``; lesion
    and other maps replace them where they are > 0). ``kept``: the skull-stripping mask (voxels
    outside are 0). ``oedema_gain`` in [0, 1]: how far oedema's signal departs from normal tissue.
    Returns the images and the case's acquisition details.
    """
    means, random = draw_contrasts(rng)
    lesion_keys = ("ed", "nec", "net", "et", "cyst")
    textures = {k: smooth_field(rng, brain.shape, spacing, 14, 1.0) for k in ("normal", "lesion")}
    lesion_total = np.clip(sum(weights[k] for k in lesion_keys), 0, 1)
    snr = float(np.exp(rng.uniform(np.log(6.0), np.log(40.0))))
    details = {"random_contrast": random, "snr": snr, "artefacts": {}}
    images = {}
    for s in SEQUENCES:
        m = means[s]
        tex_n = 1.0 + rng.uniform(0.01, 0.06) * textures["normal"]
        tex_l = 1.0 + rng.uniform(0.05, 0.25) * textures["lesion"]
        normal = (weights["wm"] * m["wm"] + weights["gm"] * m["gm"] + weights["csf"] * m["csf"]) * tex_n
        for k in ("wmh", "vessel", "choroid"):
            normal = normal * (1 - weights[k]) + weights[k] * m[k]
        ed_signal = (1.0 - oedema_gain) * normal + oedema_gain * m["ed"] * tex_l
        img = normal * (1.0 - lesion_total) + weights["ed"] * ed_signal
        for k in ("nec", "net", "et", "cyst"):
            img = img + weights[k] * m[k] * (tex_l if k != "cyst" else 1.0)
        img = img * (1 - weights["remnant"]) + weights["remnant"] * m["remnant"] * (1.0 + 0.3 * textures["lesion"])
        arts = []
        bias = np.exp(rng.uniform(0.05, 0.35) * smooth_field(rng, brain.shape, spacing, 3, 1.0))
        img = img * bias
        if rng.random() < (0.45 if s == "flair" else 0.3):
            img = _thick_slices(rng, img, spacing)
            arts.append("thick-slices")
        if rng.random() < 0.15:
            img = _ringing(rng, img)
            arts.append("ringing")
        if rng.random() < 0.12:
            img = _ghosts(rng, img)
            arts.append("ghosts")
        sigma = 1.0 / snr
        n1 = rng.standard_normal(img.shape, dtype=np.float32) * sigma
        n2 = rng.standard_normal(img.shape, dtype=np.float32) * sigma
        img = np.sqrt((img + n1) ** 2 + n2 ** 2)  # Rician magnitude noise
        images[s] = np.where(kept, img, 0.0).astype(np.float32)
        details["artefacts"][s] = arts
    return images, details


def apply_style(rng: np.random.Generator, images: dict[str, np.ndarray], kept: np.ndarray) -> tuple[dict[str, np.ndarray], str]:
    """Scale and store the images as one of ``STYLES`` (drawn per case); returns them and the style."""
    style = STYLES[int(rng.choice(len(STYLES), p=STYLE_PROBS))]
    out = {}
    for s, img in images.items():
        if style == "int16":
            out[s] = np.clip(np.rint(img * rng.uniform(150.0, 4000.0)), 0, 32767).astype(np.int16)
        elif style == "uint16":
            top = float(np.percentile(img[kept], 99.9)) if kept.any() else 1.0
            out[s] = np.clip(np.rint(img / max(top, 1e-6) * 4095.0), 0, 65535).astype(np.uint16)
        elif style == "float":
            out[s] = (img * float(np.exp(rng.uniform(np.log(0.3), np.log(1000.0))))).astype(np.float32)
        else:  # z-scored inside the mask, background = the image minimum (as some preprocessing pipelines write)
            v = img[kept]
            z = (img - v.mean()) / max(float(v.std()), 1e-6)
            bg = float(z[kept].min()) if kept.any() else 0.0
            out[s] = np.where(kept, z, bg).astype(np.float32)
    return out, style
