"""A study as it comes from the scanner: a generated case inside a head, each series on its own grid.

:func:`generate_raw_study` takes case ``index`` of dataset ``seed`` (:func:`custom.synthetic.generate_case`),
builds a head around its brain (skull with diploe, scalp fat and skin, a neck; the brain mask is the
intracranial space, its outer rim cerebrospinal fluid) and acquires every sequence as a hospital
would: its own orientation (axial, sagittal or coronal voxel axes, flipped or swapped at random),
voxel size and slice thickness (partial volume across the slice), field of view, bias field, noise,
and its own rigid head pose (up to 10 degrees and 10 mm from the others). Written as NIfTI; returned
with the truth: every series' pose, the brain mask and the label.

Frames (RAS+ mm): the *head frame* is the generated case's world (``generate_case``'s affine); series
``s`` sees the head through ``poses[s]`` (head frame -> scanner world of ``s``). Registering series
``s`` onto the reference ``r`` should recover ``poses[s] @ inv(poses[r])`` (reference world -> world of
``s``: :meth:`RawStudy.true_transform`). Study ``i`` of ``seed`` comes from
``np.random.default_rng([seed, i, 16])`` (after the case's own stream): the same arguments write the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from custom.data.vocabulary import default_reference
from custom.synthetic.fields import rotation, smooth_field
from custom.synthetic.generator import generate_case

PROTOCOLS = {
    # sequence: [(voxel size (in-plane, in-plane, slice) mm, orientations)], one drawn per study
    "t1": [((1.0, 1.0, 1.0), ("sagittal", "axial")), ((0.9, 0.9, 5.0), ("axial",))],
    "t1ce": [((1.0, 1.0, 1.0), ("axial", "sagittal", "coronal"))],
    "t2": [((0.5, 0.5, 5.0), ("axial",)), ((0.6, 0.6, 4.0), ("coronal",))],
    "flair": [((1.0, 1.0, 1.0), ("sagittal",)), ((0.9, 0.9, 5.0), ("axial",)), ((0.7, 0.7, 4.0), ("coronal",))],
}
"""Acquisition protocols per sequence: 3D isotropic or 2D thick-slice, as in clinical brain-tumour MRI."""
SLICE_AXIS = {"axial": 2, "sagittal": 0, "coronal": 1}  # world axis (R, A, S) normal to the slices
HEAD_TISSUES = {
    # relative to white matter:  bone  diploe  fat   skin/muscle
    "t1": (0.04, 0.8, 1.35, 0.55),
    "t1ce": (0.04, 0.85, 1.35, 0.7),
    "t2": (0.04, 0.6, 1.0, 0.45),
    "flair": (0.04, 0.7, 1.1, 0.55),
}
HEAD_MARGIN_MM = 20.0  # scalp and skull around the brain that a field of view covers
PAD_MM = 40.0  # head grid margin around the case grid (mm); twice that below, for the neck


@dataclass
class RawStudy:
    """A generated study: series files, their acquisition and pose, the truth on the head grid.

    ``brain`` (bool) and ``label`` (uint8, 0 / 1 NCR / 2 ED / 3 ET) are ``(H, W, D)`` on the case grid
    of ``generate_case`` (voxel -> head frame: ``affine``); ``poses[s]``: 4x4 head frame -> world of
    series ``s`` (RAS mm); ``acquisitions[s]``: orientation, voxel size (mm), shape, pose angles
    (degrees) and shift (mm).
    """

    case_id: str
    series: dict[str, Path]
    poses: dict[str, np.ndarray]
    acquisitions: dict[str, dict]
    brain: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    reference: str
    info: dict = field(default_factory=dict)

    def true_transform(self, seq: str, reference: str | None = None) -> np.ndarray:
        """4x4 map from the reference series' world to series ``seq``'s world (RAS mm)."""
        ref = reference or self.reference
        return self.poses[seq] @ np.linalg.inv(self.poses[ref])

    def brain_points(self, reference: str | None = None, step: int = 2) -> np.ndarray:
        """World positions (N, 3) of brain voxels (every ``step``-th along each axis) in the reference's world."""
        idx = np.argwhere(self.brain[::step, ::step, ::step]) * step
        head = idx @ self.affine[:3, :3].T + self.affine[:3, 3]
        pose = self.poses[reference or self.reference]
        return head @ pose[:3, :3].T + pose[:3, 3]

    def truth_on_grid(self, shape, affine: np.ndarray, reference: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(brain, label)`` on a grid of ``shape`` with voxel -> reference-world ``affine``: brain
        mask by linear interpolation (>= 0.5), label by nearest neighbour."""
        m = self._case_from_grid(affine, reference)
        brain = ndi.affine_transform(self.brain.astype(np.float32), m[:3, :3], m[:3, 3], tuple(shape), order=1, cval=0.0)
        return brain >= 0.5, self.label_on_grid(self.label, shape, affine, reference)

    def label_on_grid(self, label: np.ndarray, shape, affine: np.ndarray, reference: str | None = None) -> np.ndarray:
        """``label`` ``(H, W, D)`` on the case grid (the truth, or a prediction on the BraTS-ready case) by
        nearest neighbour onto a grid of ``shape`` with voxel -> reference-world ``affine``, through the true pose."""
        m = self._case_from_grid(affine, reference)
        return ndi.affine_transform(np.asarray(label), m[:3, :3], m[:3, 3], tuple(shape), order=0, cval=0)

    def _case_from_grid(self, affine: np.ndarray, reference: str | None) -> np.ndarray:
        """4x4 map from a grid's voxels (voxel -> reference-world ``affine``) to the case grid's voxels."""
        return np.linalg.inv(self.affine) @ np.linalg.inv(self.poses[reference or self.reference]) @ np.asarray(affine, float)


def _class_means(img: np.ndarray, maps: dict, sel: np.ndarray) -> np.ndarray:
    """Least-squares ``(wm, gm, csf)`` intensities of ``img`` over the voxels ``sel`` (the tissue maps sum to 1 there)."""
    a = np.stack([maps["wm"][sel], maps["gm"][sel], maps["csf"][sel]], 1)
    coef, *_ = np.linalg.lstsq(a, img[sel].astype(np.float64), rcond=None)
    return coef


def _head(rng: np.random.Generator, images: dict, seg: np.ndarray, maps: dict, sp: float) -> tuple[dict, np.ndarray, np.ndarray, int]:
    """Normalised head images (white matter ~1) on the case grid padded by ``PAD_MM`` (twice below).

    Inside the brain: the case's image (voxels the case's skull stripping removed are redrawn from
    the tissue maps); outside: bone (inner and outer tables), diploe, scalp fat, skin, a neck under the
    brain. Returns the images, the padded brain mask and label, and the padding in voxels.
    """
    pad = int(round(PAD_MM / sp))
    widths = ((pad, pad), (pad, pad), (2 * pad, pad))
    brain = np.pad(maps["brain"], widths)
    label = np.pad(seg, widths)
    mp = {k: np.pad(maps[k], widths) for k in ("wm", "gm", "csf")}
    kept = np.pad(maps["kept"], widths)
    dist = ndi.distance_transform_edt(~brain, sampling=sp).astype(np.float32)  # mm outside the brain
    thick = {  # smooth thickness fields (mm)
        "skull": 4.0 + 4.0 / (1.0 + np.exp(-smooth_field(rng, brain.shape, sp, 4, 1.0))),
        "scalp": 4.0 + 5.0 / (1.0 + np.exp(-smooth_field(rng, brain.shape, sp, 4, 1.0))),
    }
    skull = dist <= thick["skull"]
    head = dist <= thick["skull"] + thick["scalp"]
    # neck: an elliptic column under the brain's lowest part, down to the bottom of the grid
    idx = np.argwhere(brain)
    zlow = idx[:, 2].min()
    low = idx[idx[:, 2] < zlow + int(40 / sp)]
    cx, cy = low[:, 0].mean(), low[:, 1].mean() + 10 / sp  # a little posterior (voxel y points to P)
    x, y = np.ogrid[: brain.shape[0], : brain.shape[1]]
    ell = ((x - cx) * sp / 55.0) ** 2 + ((y - cy) * sp / 60.0) ** 2 <= 1.0
    neck = np.zeros_like(brain)
    neck[:, :, : zlow + int(25 / sp)] = ell[:, :, None]
    neck &= ~brain
    head |= neck
    skull &= ~neck
    frac = np.clip((dist - 0.0) / np.maximum(thick["skull"], 1e-3), 0, 1)
    diploe = skull & (frac > 0.3) & (frac < 0.75)
    skin = head & ~ndi.binary_erosion(head, iterations=max(1, int(round(2.0 / sp))))
    muscle = smooth_field(rng, brain.shape, sp, 8, 1.0) > 0.3
    sel = brain & kept & (label == 0)
    sel &= rng.random(sel.shape) < min(1.0, 4e5 / max(int(sel.sum()), 1))
    out = {}
    for s, img in images.items():
        img = np.pad(img.astype(np.float32) - float(img.min()), widths)  # z-scored cases: background (their minimum) -> 0
        c_wm, c_gm, c_csf = _class_means(img, mp, sel)
        c_wm = c_wm if c_wm > 1e-6 else float(np.median(img[sel]))
        norm = img / c_wm
        resid = float(np.std(norm[sel] - (mp["wm"][sel] + c_gm / c_wm * mp["gm"][sel] + c_csf / c_wm * mp["csf"][sel])))
        redraw = brain & ~kept
        norm[redraw] = (mp["wm"] + c_gm / c_wm * mp["gm"] + c_csf / c_wm * mp["csf"])[redraw] + rng.normal(0, resid, int(redraw.sum()))
        bone, dip, fat, soft = np.array(HEAD_TISSUES[s]) * np.exp(rng.normal(0, 0.1, 4))
        outside = np.zeros(brain.shape, np.float32)
        outside[head] = fat
        outside[head & muscle] = soft
        outside[skin] = soft
        outside[skull] = bone
        outside[diploe] = dip
        outside = ndi.gaussian_filter(outside, 0.6 / sp) * (1.0 + 0.05 * smooth_field(rng, brain.shape, sp, 12, 1.0))
        out[s] = np.where(brain, np.clip(norm, 0, None), outside).astype(np.float32)
    return out, brain, label, pad


def _posed_extent(brain: np.ndarray, affine: np.ndarray, pose: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World bounding box (RAS mm, low and high corners) of ``brain`` (voxel -> head frame ``affine``) seen through ``pose``."""
    idx = np.argwhere(brain[::4, ::4, ::4]) * 4
    pts = idx @ (pose[:3, :3] @ affine[:3, :3]).T + (pose[:3, :3] @ affine[:3, 3] + pose[:3, 3])
    return pts.min(0), pts.max(0)


def series_affine(rng: np.random.Generator, orientation: str, voxel: tuple, shape: tuple, centre: np.ndarray) -> np.ndarray:
    """Voxel -> world (RAS mm) of a grid with its slice axis along ``orientation``, in-plane axes flipped or
    swapped at random, centred on ``centre``."""
    slice_axis = SLICE_AXIS[orientation]
    in_plane = [a for a in range(3) if a != slice_axis]
    if rng.random() < 0.5:
        in_plane = in_plane[::-1]
    axes = np.eye(3)[:, [*in_plane, slice_axis]] * rng.choice([-1.0, 1.0], 3)
    aff = np.eye(4)
    aff[:3, :3] = axes * np.asarray(voxel)
    aff[:3, 3] = centre - aff[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return aff


def acquire(rng: np.random.Generator, head: np.ndarray, head_affine: np.ndarray, pose: np.ndarray, aff: np.ndarray,
             shape: tuple, thickness: float, snr: float, bias: float) -> np.ndarray:
    """Sample ``head`` (voxel -> head frame ``head_affine``) at the voxels of a series grid (voxel ->
    world ``aff``) seen through ``pose``, averaging across the slice thickness; bias field and Rician noise."""
    m = np.linalg.inv(head_affine) @ np.linalg.inv(pose) @ aff  # series voxel -> head voxel
    src_sp = float(np.sqrt((head_affine[:3, :3] ** 2).sum(0)).min())
    n_sub = int(np.clip(np.ceil(thickness / src_sp), 1, 7))
    out = np.zeros(shape, np.float32)
    for k in range(n_sub):  # sub-slices spread over the slice thickness (voxel axis 2 is the slice axis)
        dz = (k + 0.5) / n_sub - 0.5
        off = m[:3, 3] + m[:3, 2] * dz
        out += ndi.affine_transform(head, m[:3, :3], off, shape, order=1, cval=0.0, prefilter=False)
    out /= n_sub
    out *= np.exp(bias * smooth_field(rng, shape, 1.0, 3, 1.0))  # one smooth field across the grid
    sigma = 1.0 / snr
    n1 = rng.standard_normal(shape, dtype=np.float32) * sigma
    n2 = rng.standard_normal(shape, dtype=np.float32) * sigma
    return np.sqrt((out + n1) ** 2 + n2 ** 2)


def generate_raw_study(index: int, seed: int, out_dir: str | Path, size: str = "full", sequences=("t1", "t1ce", "t2", "flair"),
                       voxel_scale: float = 1.0, max_angle: float = 10.0, max_shift: float = 10.0) -> RawStudy:
    """Write study ``index`` of dataset ``seed`` as ``<out_dir>/<case>_<seq>_raw.nii.gz`` (int16), one file per
    sequence of ``sequences``; the reference is ``custom.data.vocabulary.default_reference``'s.

    ``size``: grid of the underlying case (``custom.synthetic.SIZES``); ``voxel_scale`` multiplies every
    series' voxel size (2: half the resolution, for fast tests). Poses: rotation up to ``max_angle``
    degrees about each axis, shift up to ``max_shift`` mm per axis, drawn per series.
    """
    images, seg, case_affine, maps = generate_case(index, seed, size, return_maps=True)
    rng = np.random.default_rng([int(seed), int(index), 16])
    sp = float(np.sqrt((case_affine[:3, :3] ** 2).sum(0))[0])
    head, brain_p, label_p, pad = _head(rng, {s: images[s] for s in sequences}, seg, maps, sp)
    head_affine = case_affine.copy()
    head_affine[:3, 3] = case_affine[:3, 3] - case_affine[:3, :3] @ np.array([pad, pad, 2 * pad])
    centre_vox = np.argwhere(brain_p).mean(0)
    centre = head_affine[:3, :3] @ centre_vox + head_affine[:3, 3]  # brain centre, head frame
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    case = f"RawStudy_{seed:03d}_{index:05d}"
    reference = default_reference(sequences)
    series, poses, acq = {}, {}, {}
    for s in sequences:
        voxel, orients = PROTOCOLS[s][int(rng.integers(len(PROTOCOLS[s])))]
        orientation = orients[int(rng.integers(len(orients)))]
        voxel = tuple(v * voxel_scale for v in voxel)
        angles = rng.uniform(-max_angle, max_angle, 3)
        shift = rng.uniform(-max_shift, max_shift, 3)
        pose = np.eye(4)
        pose[:3, :3] = rotation(angles)
        pose[:3, 3] = centre - pose[:3, :3] @ centre + shift
        lo, hi = _posed_extent(brain_p, head_affine, pose)
        ext = hi - lo + 2 * HEAD_MARGIN_MM  # the head, world axes (R, A, S)
        slice_axis = SLICE_AXIS[orientation]
        in_plane = max(ext[a] for a in range(3) if a != slice_axis)
        fov_in = max(rng.uniform(220.0, 256.0), in_plane)
        coverage = ext[slice_axis] + rng.uniform(0.0, 20.0)
        shape = (int(np.ceil(fov_in / voxel[0])), int(np.ceil(fov_in / voxel[1])), int(np.ceil(coverage / voxel[2])))
        fov_centre = (lo + hi) / 2 + rng.uniform(-4.0, 4.0, 3)  # the operator centres the field of view on the head
        aff = series_affine(rng, orientation, voxel, shape, fov_centre)
        snr = float(rng.uniform(15.0, 40.0))
        img = acquire(rng, head[s], head_affine, pose, aff, shape, voxel[2], snr, float(rng.uniform(0.1, 0.3)))
        scale = float(rng.uniform(300.0, 1500.0))
        data = np.clip(np.rint(img * scale), 0, 32767).astype(np.int16)
        path = out_dir / f"{case}_{s}_raw.nii.gz"
        nii = nib.Nifti1Image(data, aff)
        nii.set_qform(aff, code=1)
        nii.set_sform(aff, code=1)
        nib.save(nii, path)
        series[s], poses[s] = path, pose
        acq[s] = {"orientation": orientation, "voxel_mm": [float(v) for v in voxel], "shape": list(shape),
                  "angles_deg": angles.tolist(), "shift_mm": shift.tolist()}
    return RawStudy(case, series, poses, acq, maps["brain"].copy(), seg, case_affine, reference,
                    {"brain_ml": float(maps["brain"].sum() * sp ** 3 / 1000.0), **maps["info"]})
