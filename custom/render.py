"""Render one BraTS-style case as a PNG: T1, T1ce, T2, FLAIR and FLAIR with the label overlay.

::

    python -m custom.render data/synth/BraTS2021_00000 --out case.png        # BraTS 2021/2023 folder
    python -m custom.render data/msd/imagesTr/BRATS_001.nii.gz --out case.png  # MSD 4D image

The axial slice with the most tumour is shown (the middle slice when there is no label), in
radiological orientation: anterior up, the patient's right on the left of the image. Labels
are drawn as NCR (necrotic / non-enhancing core) red, ED (oedema) green, ET (enhancing
tumour) yellow, whatever the release's label values.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np

__all__ = ["render_case", "load_case", "main"]

_ORDER = ("t1", "t1ce", "t2", "flair")
_TITLES = {"t1": "T1", "t1ce": "T1ce", "t2": "T2", "flair": "FLAIR"}
_ALIASES = {
    "t1": "t1", "t1n": "t1", "t1w": "t1",
    "t1ce": "t1ce", "t1c": "t1ce", "t1gd": "t1ce",
    "t2": "t2", "t2w": "t2",
    "flair": "flair", "t2f": "flair",
}
# release label values -> region name
_CONVENTIONS = {
    "2021": {1: "NCR", 2: "ED", 4: "ET"},
    "2023": {1: "NCR", 2: "ED", 3: "ET"},
    "msd": {2: "NCR", 1: "ED", 3: "ET"},
}
_COLOURS = {"NCR": (0.95, 0.1, 0.1), "ED": (0.1, 0.85, 0.2), "ET": (1.0, 0.9, 0.0)}
_LEGEND = {"NCR": "NCR / core", "ED": "ED (oedema)", "ET": "ET (enhancing)"}
BRATS_AFFINE = np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, 239.0], [0, 0, 1.0, 0], [0, 0, 0, 1]])


def _nii_name(p: Path) -> str | None:
    for ext in (".nii.gz", ".nii"):
        if p.name.endswith(ext):
            return p.name[: -len(ext)]
    return None


def load_case(path) -> tuple[dict, np.ndarray | None, np.ndarray, str]:
    """Load a BraTS 2021/2023 case folder or an MSD 4D image (label from ``../labelsTr``).

    Returns ``(images, label, affine, convention)``: ``images`` maps ``t1, t1ce, t2, flair`` to 3D
    arrays in file voxel order, ``label`` the label array (or ``None``), ``affine`` the 4x4
    voxel-to-world affine, ``convention`` ``"2021"``, ``"2023"`` or ``"msd"``.
    """
    import nibabel as nib

    path = Path(path)
    if path.is_dir():
        images, label, affine, conv = {}, None, None, None
        for f in sorted(path.iterdir()):
            stem = _nii_name(f)
            if stem is None:
                continue
            m = re.search(r"[_-]([A-Za-z0-9]+)$", stem)
            if not m:
                continue
            key = m.group(1).lower()
            sep = stem[m.start()]
            if key == "seg":
                img = nib.load(f)
                label = np.asarray(img.dataobj)
                conv = "2021" if sep == "_" else "2023"
            elif key in _ALIASES:
                img = nib.load(f)
                images[_ALIASES[key]] = np.asarray(img.dataobj)
                affine = img.affine if affine is None else affine
                conv = conv or ("2021" if sep == "_" else "2023")
        missing = [m for m in _ORDER if m not in images]
        if missing:
            raise FileNotFoundError(
                f"{path}: no {', '.join(missing)} image found (expected BraTS 2021 *_t1/_t1ce/_t2/_flair.nii.gz "
                f"or BraTS 2023 *-t1n/-t1c/-t2w/-t2f.nii.gz files)")
        return images, label, affine, conv
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such case folder or image file")
    img = nib.load(path)
    data = np.asarray(img.dataobj)
    if data.ndim != 4 or data.shape[-1] != 4:
        raise ValueError(f"{path}: expected a BraTS case folder or an MSD 4D image (H, W, D, 4), "
                         f"got shape {data.shape}")
    images = {"flair": data[..., 0], "t1": data[..., 1], "t1ce": data[..., 2], "t2": data[..., 3]}
    label = None
    lab_dir = path.parent.parent / "labelsTr"
    for cand in (lab_dir / path.name, lab_dir / (path.name[:-3] if path.name.endswith(".gz") else path.name + ".gz")):
        if cand.is_file():
            label = np.asarray(nib.load(cand).dataobj)
            break
    return images, label, img.affine, "msd"


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

    ``images``: dict name -> 3D array (names ``t1, t1ce, t2, flair`` or the 2023/MSD aliases
    ``t1n, t1c, t2w, t2f, t1gd, t1w``), or a list of four 3D arrays in the order T1, T1ce, T2,
    FLAIR. ``label``: 3D label array or ``None``. ``affine``: voxel-to-world affine of the
    arrays (default: the BraTS LPS affine); used to show anterior up and the patient's right on
    the left. ``convention``: ``"2021"``, ``"2023"`` or ``"msd"`` label values (default: 2021
    if the label holds a 4, else 2023). Shows the axial slice with the most tumour (else the
    middle slice). Returns the PNG path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    if isinstance(images, dict):
        vols = {}
        for k, v in images.items():
            name = _ALIASES.get(str(k).lower())
            if name is None:
                raise ValueError(f"unknown modality name {k!r}")
            vols[name] = v
        missing = [m for m in _ORDER if m not in vols]
        if missing:
            raise ValueError(f"missing modalities: {missing}")
    else:
        images = list(images)
        if len(images) != 4:
            raise ValueError("images must be a dict or a list of 4 arrays (T1, T1ce, T2, FLAIR)")
        vols = dict(zip(_ORDER, images))
    affine = BRATS_AFFINE if affine is None else np.asarray(affine)
    vols = {k: _to_ras(np.asarray(vols[k], dtype=np.float32), affine) for k in _ORDER}
    shape = vols["t1"].shape
    if any(v.shape != shape or v.ndim != 3 for v in vols.values()):
        raise ValueError(f"all images must be 3D with the same shape, got {[v.shape for v in vols.values()]}")
    lab = None
    if label is not None:
        lab = _to_ras(np.asarray(label), affine)
        if lab.shape != shape:
            raise ValueError(f"label shape {lab.shape} differs from image shape {shape}")
        if convention is None:
            convention = "2021" if np.any(lab == 4) else "2023"
        if convention not in _CONVENTIONS:
            raise ValueError(f"convention must be one of {tuple(_CONVENTIONS)}")
    counts = (lab > 0).sum(axis=(0, 1)) if lab is not None else None
    k = int(np.argmax(counts)) if counts is not None and counts.max() > 0 else shape[2] // 2

    # crop the in-plane field of view to the head (union of non-zero voxels over the volume)
    nz = np.argwhere(np.any(np.stack([vols[m] > 0 for m in _ORDER]).any(0), axis=2))
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
    for ax, m in zip(axes, _ORDER):
        ax.imshow(disp(_window(vols[m], vols[m])), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(_TITLES[m], color="white", fontsize=11)
    if lab is not None:
        ax = axes[4]
        ax.imshow(disp(_window(vols["flair"], vols["flair"])), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ls = disp(lab)
        rgba = np.zeros((*ls.shape, 4))
        present = []
        for value, region in _CONVENTIONS[convention].items():
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m custom.render",
        description="Render a BraTS 2021/2023 case folder or an MSD 4D image to PNG: T1, T1ce, T2, FLAIR and "
                    "FLAIR + label on the axial slice with the most tumour.")
    p.add_argument("case", type=Path, help="case folder (BraTS 2021/2023) or MSD 4D image (label from ../labelsTr)")
    p.add_argument("--out", type=Path, default=None, help="output PNG (default: <case id>.png in the current folder)")
    p.add_argument("--dpi", type=int, default=150)
    args = p.parse_args(argv)
    try:
        images, label, affine, conv = load_case(args.case)
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    name = _nii_name(args.case) or args.case.name
    out = args.out or Path(f"{name}.png")
    render_case(images, label, out, affine=affine, convention=conv, title=name, dpi=args.dpi)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
