"""Draw one case as a PNG: T1, T1ce, T2, FLAIR and FLAIR with the label overlay.

The axial slice with the most tumour is shown (the middle slice when there is no label), in
radiological orientation: anterior up, the patient's right on the left of the image. Labels are
drawn as NCR (necrotic / non-enhancing core) red, ED (oedema) green, ET (enhancing tumour) yellow,
whatever the release's label values. ``tools/render_case.py`` is the command line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from custom.data.vocabulary import CONVENTIONS, MODALITIES, SEQUENCE_ALIASES, SEQUENCE_NAMES, LabelConvention

__all__ = ["render_case"]

_COLOURS = {"NCR": (0.95, 0.1, 0.1), "ED": (0.1, 0.85, 0.2), "ET": (1.0, 0.9, 0.0)}
_LEGEND = {"NCR": "NCR / core", "ED": "ED (oedema)", "ET": "ET (enhancing)"}
BRATS_AFFINE = np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, 239.0], [0, 0, 1.0, 0], [0, 0, 0, 1]])


def _region_of_value(convention: str | LabelConvention) -> dict[int, str]:
    """Label value -> ``NCR`` / ``ED`` / ``ET`` in ``convention`` (a ``CONVENTIONS`` name or entry)."""
    if not isinstance(convention, LabelConvention):
        if convention not in CONVENTIONS:
            raise ValueError(f"convention must be one of {tuple(CONVENTIONS)}, got {convention!r}")
        convention = CONVENTIONS[convention]
    return {convention.ncr: "NCR", convention.ed: "ED", convention.et: "ET"}


def _to_ras(arr: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Reorder/flip voxel axes so that they point to R, A, S."""
    import nibabel.orientations as nio

    ornt = nio.io_orientation(affine)
    return nio.apply_orientation(arr, nio.ornt_transform(ornt, nio.axcodes2ornt("RAS")))


def _window(sl: np.ndarray, vol: np.ndarray) -> np.ndarray:
    v = vol[vol > 0]
    if v.size == 0:
        return np.zeros_like(sl, dtype=float)
    lo, hi = np.percentile(v, [0.5, 99.5])
    return np.clip((sl - lo) / max(hi - lo, 1e-6), 0, 1) * (sl > 0)


def render_case(images, label=None, out_png="case.png", affine=None, convention=None, title=None, dpi=150) -> Path:
    """Render T1, T1ce, T2, FLAIR (and FLAIR + label when ``label`` is given) to ``out_png``.

    ``images``: dict name -> 3D array (``custom.data.MODALITIES`` or any release's name of them,
    ``SEQUENCE_ALIASES``), or a list of four 3D arrays in the order T1, T1ce, T2, FLAIR. ``label``: 3D label array or ``None``.
    ``affine``: voxel-to-world affine of the
    arrays (default: the BraTS LPS affine); used to show anterior up and the patient's right on
    the left. ``convention``: the label values' ``custom.data.CONVENTIONS`` name or entry
    (default: brats2021 if the label holds a 4, else brats2023). Shows the axial slice with the most tumour (else the
    middle slice). Returns the PNG path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    if isinstance(images, dict):
        vols = {}
        for k, v in images.items():
            name = SEQUENCE_ALIASES.get(str(k).lower())
            if name is None:
                raise ValueError(f"unknown modality name {k!r}")
            vols[name] = v
        missing = [m for m in MODALITIES if m not in vols]
        if missing:
            raise ValueError(f"missing modalities: {missing}")
    else:
        images = list(images)
        if len(images) != 4:
            raise ValueError("images must be a dict or a list of 4 arrays (T1, T1ce, T2, FLAIR)")
        vols = dict(zip(MODALITIES, images))
    affine = BRATS_AFFINE if affine is None else np.asarray(affine)
    vols = {k: _to_ras(np.asarray(vols[k], dtype=np.float32), affine) for k in MODALITIES}
    shape = vols["t1"].shape
    if any(v.shape != shape or v.ndim != 3 for v in vols.values()):
        raise ValueError(f"all images must be 3D with the same shape, got {[v.shape for v in vols.values()]}")
    lab = None
    if label is not None:
        lab = _to_ras(np.asarray(label), affine)
        if lab.shape != shape:
            raise ValueError(f"label shape {lab.shape} differs from image shape {shape}")
        regions = _region_of_value(convention or ("brats2021" if np.any(lab == 4) else "brats2023"))
    counts = (lab > 0).sum(axis=(0, 1)) if lab is not None else None
    k = int(np.argmax(counts)) if counts is not None and counts.max() > 0 else shape[2] // 2

    # crop the in-plane field of view to the head (union of non-zero voxels over the volume)
    nz = np.argwhere(np.any(np.stack([vols[m] > 0 for m in MODALITIES]).any(0), axis=2))
    if nz.size:
        margin = max(2, int(0.04 * max(shape[:2])))
        lo = np.maximum(nz.min(0) - margin, 0)
        hi = np.minimum(nz.max(0) + margin + 1, shape[:2])
    else:
        lo, hi = (0, 0), shape[:2]

    def disp(a):  # axial slice, radiological: rows = anterior at top, columns = patient's right on the left
        return np.flipud(a[lo[0]:hi[0], lo[1]:hi[1], k].T)[:, ::-1]

    n = 5 if lab is not None else 4
    h_in = 3.0 * (hi[1] - lo[1]) / max(hi[0] - lo[0], 1)
    fig, axes = plt.subplots(1, n, figsize=(3.0 * n, h_in + 0.6), facecolor="black")
    for ax, m in zip(axes, MODALITIES):
        ax.imshow(disp(_window(vols[m], vols[m])), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(SEQUENCE_NAMES[m], color="white", fontsize=11)
    if lab is not None:
        ax = axes[4]
        ax.imshow(disp(_window(vols["flair"], vols["flair"])), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ls = disp(lab)
        rgba = np.zeros((*ls.shape, 4))
        present = []
        for value, region in regions.items():
            sel = ls == value
            if sel.any():
                rgba[sel] = (*_COLOURS[region], 0.5)
            if np.any(lab == value):
                present.append(region)
        ax.imshow(rgba, interpolation="nearest")
        ax.set_title("FLAIR + label", color="white", fontsize=11)
        handles = [Patch(color=_COLOURS[r], label=_LEGEND[r]) for r in ("NCR", "ED", "ET") if r in present]
        if handles:
            ax.legend(handles=handles, loc="lower right", fontsize=6, framealpha=0.6, handlelength=1.0)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
        for s in ax.spines.values():
            s.set_visible(False)
        ax.text(0.02, 0.5, "R", color="white", fontsize=7, transform=ax.transAxes, va="center")
    fig.suptitle(title or f"axial slice {k} (RAS index)", color="white", fontsize=10)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=dpi, facecolor=fig.get_facecolor())
    plt.close(fig)
    return out_png
