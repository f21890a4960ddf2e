"""Fully connected 3D CRF (Kraehenbuehl & Koltun 2011, ``pydensecrf``) on BraTS region probabilities.

:class:`DenseCRFd` refines the network's sigmoid outputs with a dense CRF whose bilateral kernel
uses the four MRI channels, and returns refined *probabilities* of the same three regions, so the
bundle's ``AsDiscreted`` (at the configs' ``threshold``) and ``RegionsToLabeld`` run on its output unchanged.

Input / output (channel-first, one case, no batch dimension):

* ``pred``: ``(3, H, W, D)`` region probabilities in [0, 1], channels ``custom.data.REGIONS``
  = (TC, WT, ET); output: the same shape, dtype and type (``MetaTensor`` meta kept).
* ``image``: ``(4, H, W, D)`` MRI (T1, T1ce, T2, FLAIR), z-score normalised over the brain with
  background exactly 0, on the *same grid* as ``pred``. The voxel spacing (mm) comes from the
  ``MetaTensor`` affine of ``image`` (or of ``pred``; or the ``spacing`` argument for plain arrays);
  positions are ``P @ (i, j, k)`` mm with ``affine[:3, :3] = U P`` (polar decomposition: the
  distances of the affine without its flips/rotation), so anisotropic and oblique grids are handled.

Regions -> exclusive classes -> regions. The sigmoids are not guaranteed to nest, so nesting is
enforced first: ``ET' = ET``, ``TC' = max(TC, ET')``, ``WT' = max(WT, TC')``; then the four
classes are ``p(BG) = 1 - WT'``, ``p(ED) = WT' - TC'``, ``p(NCR) = TC' - ET'``, ``p(ET) = ET'``
(non-negative, summing to 1). The CRF unary is ``-log(max(p, 1e-5))``; mean-field inference gives
class marginals ``Q``, mapped back to ``TC = Q(NCR) + Q(ET)``, ``WT = Q(ED) + Q(NCR) + Q(ET)``,
``ET = Q(ET)`` (nested by construction). Thresholding these is the usual BraTS region decision,
not the class arg-max (at 0.5 they differ only where no class dominates).

Energy: ``E(x) = sum_i -log p_i(x_i) + sum_{i<j} [x_i != x_j] (w_g k_g(i, j) + w_b k_b(i, j))`` with
``k_g = exp(-|r_i - r_j|^2 / (2 theta_g^2))`` (smoothness; ``r`` = position in mm) and
``k_b = exp(-|r_i - r_j|^2 / (2 theta_b^2) - |I_i - I_j|^2 / (2 theta_I^2))`` (appearance; ``I`` =
the four z-scored intensities), Potts compatibility, symmetric kernel normalisation (pydensecrf's
defaults), computed with the permutohedral lattice.

Cost proportional to the tumour, not the volume. The CRF runs on the voxels that are (a) inside the
brain (any image channel non-zero) and (b) inside the bounding box, grown by ``margin_mm`` on every
side, of *each connected component* (26-connectivity) of the candidate tumour ``max region
probability > box_threshold``. A small false-positive speck far from the tumour therefore costs a
box of its own (its size + 2 margins) instead of stretching one box over the brain; the union of
the boxes is one CRF (boxes that touch share voxels). Every other voxel keeps its input value (bit
for bit for float32 input); a case without candidate voxels is returned as is, without building a CRF. The default
margin is 3 widths of the widest active kernel (30 mm): with 2 widths the box edges (whose
voxels have truncated kernel sums, hence other normalisations) flipped up to 16 of ~1.3 M labels
relative to a full-brain run on the 1 mm training cases, with 3 widths at most 1. ``crop=False``
runs on every brain voxel (for tests and checks). Positions are whole-grid coordinates, so a
cropped run sees exactly the features a full run sees.

Defaults (``theta_bilateral_mm=10, theta_intensity=0.5, w_bilateral=10, w_gauss=0, n_iter=5,
box_threshold=0.5``) were chosen by coordinate descent (``benchmarks/crf_benchmark.py tune``) on
the training split only: ``custom.synthetic`` seed 0, cases 0-3, bundle preprocessing at 1 mm,
with oracle-noised probabilities (ground truth + smooth and voxel noise + false-positive specks);
mean Dice of the three regions there 0.859 without and 0.971 with the CRF. The smoothness kernel
(``w_gauss`` 1 or 3) lowered Dice slightly, so it is off by default. Wider or stronger appearance
kernels scored still higher on these synthetic cases but were excluded a priori (spatial width <= 10
mm, ``w_bilateral`` <= 10): the unary is at most ``-log(1e-5) = 11.5``, so with ``w_bilateral <=
10`` the appearance term alone cannot overturn a voxel the network is more than ~99.995 % sure of.
These are synthetic-data choices; re-tune on real validation predictions before relying on them.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.utils import convert_to_dst_type
from scipy import ndimage as ndi

from custom.data import MODALITIES, REGIONS

logger = logging.getLogger(__name__)

__all__ = ["regions_to_classes", "classes_to_regions", "crf_voxel_mask", "dense_crf_regions", "DenseCRFd"]

CLASSES = ("BG", "ED", "NCR", "ET")
"""Mutually exclusive CRF classes, in label order 0..3."""

_TC, _WT, _ET = (REGIONS.index(r) for r in ("TC", "WT", "ET"))
_PROB_TOL = 1e-3  # probabilities may overshoot [0, 1] by this much (resampling, float error)
_EPS = 1e-5


def regions_to_classes(regions: np.ndarray) -> np.ndarray:
    """Region probabilities ``(3, ...)`` (TC, WT, ET) -> class probabilities ``(4, ...)`` (BG, ED, NCR, ET).

    Nesting is enforced (``TC' = max(TC, ET)``, ``WT' = max(WT, TC')``); the classes are
    ``1 - WT'``, ``WT' - TC'``, ``TC' - ET``, ``ET``: non-negative and summing to 1.
    """
    r = np.clip(np.asarray(regions, dtype=np.float32), 0.0, 1.0)
    et = r[_ET]
    tc = np.maximum(r[_TC], et)
    wt = np.maximum(r[_WT], tc)
    return np.stack([1.0 - wt, wt - tc, tc - et, et])


def classes_to_regions(classes: np.ndarray) -> np.ndarray:
    """Class probabilities ``(4, ...)`` (BG, ED, NCR, ET) -> region probabilities ``(3, ...)`` (TC, WT, ET)."""
    q = np.asarray(classes, dtype=np.float32)
    out = np.empty((len(REGIONS),) + q.shape[1:], np.float32)
    out[_ET] = q[3]
    out[_TC] = q[2] + q[3]
    out[_WT] = q[1] + q[2] + q[3]
    return np.clip(out, 0.0, 1.0)


def _margin_voxels(linear: np.ndarray, margin_mm: float) -> np.ndarray:
    """Voxels per axis covering at least ``margin_mm`` (spacing = column norms of ``linear``)."""
    spacing = np.linalg.norm(linear, axis=0)
    return np.ceil(margin_mm / spacing - 1e-6).astype(int)


def crf_voxel_mask(regions: np.ndarray, brain: np.ndarray, linear: np.ndarray, box_threshold: float, margin_mm: float) -> np.ndarray:
    """Boolean ``(H, W, D)`` mask of the voxels the CRF runs on (see the module docstring).

    ``regions``: ``(3, H, W, D)`` probabilities; ``brain``: ``(H, W, D)`` bool; ``linear``: the 3x3
    voxel-to-mm matrix. Empty when no voxel has ``max region probability > box_threshold``.
    """
    tumour = regions.max(axis=0) > box_threshold
    mask = np.zeros(tumour.shape, bool)
    if not tumour.any():
        return mask
    labels, _ = ndi.label(tumour, structure=np.ones((3, 3, 3), bool))
    grow = _margin_voxels(linear, margin_mm)
    for box in ndi.find_objects(labels):
        mask[tuple(slice(max(s.start - g, 0), s.stop + g) for s, g in zip(box, grow))] = True
    return mask & brain


def dense_crf_regions(
    regions: np.ndarray,
    image: np.ndarray,
    linear: np.ndarray,
    *,
    theta_gauss_mm: float,
    theta_bilateral_mm: float,
    theta_intensity: float,
    w_gauss: float,
    w_bilateral: float,
    n_iter: int,
    box_threshold: float,
    margin_mm: float,
    crop: bool = True,
) -> tuple[np.ndarray, dict]:
    """Run the CRF on numpy arrays; the work behind :class:`DenseCRFd` (inputs already validated).

    ``regions``: ``(3, H, W, D)`` float probabilities (TC, WT, ET); ``image``: ``(4, H, W, D)``
    z-scored MRI, 0 outside the brain; ``linear``: 3x3 voxel-index-to-mm matrix. Returns the refined
    ``(3, H, W, D)`` float32 probabilities (``regions`` itself when the CRF had nothing to do) and
    an info dict: ``voxels`` (CRF nodes) and ``seconds``.
    """
    import pydensecrf.densecrf as dcrf

    t0 = time.perf_counter()
    brain = np.any(image != 0, axis=0)
    if crop:
        nodes = crf_voxel_mask(regions, brain, linear, box_threshold, margin_mm)
    else:
        nodes = brain if (regions.max(axis=0) > box_threshold).any() else np.zeros_like(brain)
    n = int(nodes.sum())
    info = {"voxels": n, "seconds": 0.0}
    if n == 0:
        info["seconds"] = time.perf_counter() - t0
        return regions, info

    # Positions in mm: P @ (i, j, k) with P the symmetric positive factor of linear = U P (polar
    # decomposition). Distances are those of the affine; the axis flips/rotation U are dropped so the
    # permutohedral lattice (not rotation invariant) sees the same features for LPS and RAS grids.
    _, sv, vt = np.linalg.svd(np.asarray(linear, np.float64))
    stretch = vt.T @ np.diag(sv) @ vt
    # Work inside the bounding box of the nodes only (memory and time proportional to it).
    box = tuple(slice(int(a.min()), int(a.max()) + 1) for a in np.nonzero(nodes))
    sub = nodes[box]
    ijk = np.stack(np.nonzero(sub)).astype(np.float32) + np.array([s.start for s in box], np.float32)[:, None]
    pos = (stretch.astype(np.float32) @ ijk).astype(np.float32)  # (3, n) global positions in mm
    feats_b = np.ascontiguousarray(np.concatenate([pos / np.float32(theta_bilateral_mm),
                                                   image[(slice(None),) + box][:, sub].astype(np.float32) / np.float32(theta_intensity)]))
    probs = regions_to_classes(regions[(slice(None),) + box][:, sub])  # (4, n)
    unary = np.ascontiguousarray(-np.log(np.clip(probs, _EPS, 1.0)), dtype=np.float32)

    crf = dcrf.DenseCRF(n, len(CLASSES))
    crf.setUnaryEnergy(unary)
    if w_gauss > 0:
        crf.addPairwiseEnergy(np.ascontiguousarray(pos / np.float32(theta_gauss_mm)), compat=float(w_gauss))
    if w_bilateral > 0:
        crf.addPairwiseEnergy(feats_b, compat=float(w_bilateral))
    q = np.asarray(crf.inference(int(n_iter)), dtype=np.float32).reshape(len(CLASSES), n)

    out = np.array(regions, dtype=np.float32, copy=True)
    view = out[(slice(None),) + box]
    view[:, sub] = classes_to_regions(q)
    info["seconds"] = time.perf_counter() - t0
    return out, info


def _linear_from(obj) -> np.ndarray | None:
    """3x3 voxel-to-mm matrix of a MetaTensor's affine, else None."""
    if isinstance(obj, MetaTensor) and "affine" in obj.meta:
        a = np.asarray(torch.as_tensor(obj.affine).detach().cpu(), dtype=np.float64)
        if a.shape == (4, 4):
            return a[:3, :3]
    return None


class DenseCRFd(MapTransform):
    """Refine region probabilities ``d[key]`` ``(3, H, W, D)`` with a fully connected 3D CRF.

    Features: positions in mm and the four z-scored channels of ``d[image_key]`` ``(4, H, W, D)``
    (same grid). Output: refined region probabilities, same shape/type/meta (see module docstring).

    Args:
        keys: region-probability keys (sigmoid outputs, channels TC, WT, ET).
        image_key: key of the MRI image on the same grid.
        theta_gauss_mm: width (std, mm) of the smoothness kernel.
        theta_bilateral_mm: spatial width (std, mm) of the appearance kernel.
        theta_intensity: intensity width of the appearance kernel, in z-score units (all channels).
        w_gauss, w_bilateral: Potts weights of the two kernels (energy units; the unary is -log p).
        n_iter: mean-field iterations.
        box_threshold: voxels with ``max region probability > box_threshold`` are candidate tumour.
        margin_mm: growth of each candidate component's bounding box, mm on every side; None (default):
            3 x the widest kernel with a non-zero weight (30 mm with the defaults).
        crop: False runs on every brain voxel (slow on full volumes; for testing).
        spacing: voxel spacing (mm, 3 values) for inputs without a MetaTensor affine; ignored
            when ``image`` or ``pred`` has one.
        allow_missing_keys: skip missing ``keys`` (the image key is always required).

    After each call ``last_info`` holds, per key, ``voxels`` (CRF nodes) and ``seconds``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        image_key: str = "image",
        theta_gauss_mm: float = 3.0,
        theta_bilateral_mm: float = 10.0,
        theta_intensity: float = 0.5,
        w_gauss: float = 0.0,
        w_bilateral: float = 10.0,
        n_iter: int = 5,
        box_threshold: float = 0.5,
        margin_mm: float | None = None,
        crop: bool = True,
        spacing: Sequence[float] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        for name, v in (("theta_gauss_mm", theta_gauss_mm), ("theta_bilateral_mm", theta_bilateral_mm), ("theta_intensity", theta_intensity)):
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        if margin_mm is None:  # 3 widths of the widest active kernel: cropped == full run (see the module docstring)
            margin_mm = 3.0 * max([t for t, w in ((theta_gauss_mm, w_gauss), (theta_bilateral_mm, w_bilateral)) if w > 0], default=0.0)
        for name, v in (("w_gauss", w_gauss), ("w_bilateral", w_bilateral), ("margin_mm", margin_mm)):
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a non-negative number, got {v!r}")
        if int(n_iter) != n_iter or n_iter < 1:
            raise ValueError(f"n_iter must be a positive integer, got {n_iter!r}")
        if not 0.0 <= box_threshold < 1.0:
            raise ValueError(f"box_threshold must be in [0, 1), got {box_threshold!r}")
        if spacing is not None and (len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing)):
            raise ValueError(f"spacing must be three positive numbers (mm), got {spacing!r}")
        self.image_key = image_key
        self.params = dict(theta_gauss_mm=float(theta_gauss_mm), theta_bilateral_mm=float(theta_bilateral_mm),
                           theta_intensity=float(theta_intensity), w_gauss=float(w_gauss), w_bilateral=float(w_bilateral),
                           n_iter=int(n_iter), box_threshold=float(box_threshold), margin_mm=float(margin_mm), crop=bool(crop))
        self.spacing = None if spacing is None else tuple(float(s) for s in spacing)
        self.last_info: dict = {}

    def _check(self, key: Hashable, pred, image) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Validate one (pred, image) pair; return float32 numpy arrays and the 3x3 voxel-to-mm matrix."""
        ik = self.image_key
        p_shape, i_shape = tuple(pred.shape), tuple(image.shape)
        if len(p_shape) != 4 or p_shape[0] != len(REGIONS):
            raise ValueError(f"DenseCRFd: {key!r} must be region probabilities of shape (3, H, W, D) (channels {', '.join(REGIONS)}), got shape {p_shape}")
        if len(i_shape) != 4 or i_shape[0] != len(MODALITIES):
            raise ValueError(f"DenseCRFd: {ik!r} must be an image of shape (4, H, W, D) (channels {', '.join(MODALITIES)}), got shape {i_shape}")
        if p_shape[1:] != i_shape[1:]:
            raise ValueError(f"DenseCRFd: spatial shapes differ: {key!r} {p_shape} vs {ik!r} {i_shape}; both must be on the same grid "
                             "(run the CRF before Invertd, where the prediction is still on the image's grid)")
        lin_i, lin_p = _linear_from(image), _linear_from(pred)
        if lin_i is not None and lin_p is not None:
            a_i, a_p = np.asarray(image.affine, float), np.asarray(pred.affine, float)
            if not np.allclose(a_i, a_p, atol=1e-3):
                raise ValueError(f"DenseCRFd: {key!r} and {ik!r} have the same shape {p_shape[1:]} but different affines "
                                 f"(not the same grid):\n{np.array2string(a_p, precision=3)}\nvs\n{np.array2string(a_i, precision=3)}")
        linear = lin_i if lin_i is not None else lin_p
        if linear is None:
            if self.spacing is None:
                raise ValueError(f"DenseCRFd: neither {key!r} nor {ik!r} is a MetaTensor with an affine; pass spacing=(sx, sy, sz) in mm")
            linear = np.diag(self.spacing)
        if not (np.all(np.isfinite(linear)) and abs(np.linalg.det(linear)) > 1e-9):
            raise ValueError(f"DenseCRFd: the affine of {ik!r} is not a valid voxel-to-mm matrix: {linear.tolist()}")
        p = np.asarray(torch.as_tensor(pred).detach().cpu().float().numpy() if isinstance(pred, torch.Tensor) else pred, dtype=np.float32)
        im = np.asarray(torch.as_tensor(image).detach().cpu().float().numpy() if isinstance(image, torch.Tensor) else image, dtype=np.float32)
        for name, arr in ((key, p), (ik, im)):
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"DenseCRFd: {name!r} (shape {arr.shape}) contains {int((~np.isfinite(arr)).sum())} NaN or infinite values")
        lo, hi = float(p.min()), float(p.max())
        if lo < -_PROB_TOL or hi > 1 + _PROB_TOL:
            raise ValueError(f"DenseCRFd: {key!r} (shape {p_shape}) must hold probabilities in [0, 1] (apply the sigmoid first), "
                             f"got values in [{lo:.4g}, {hi:.4g}]")
        return p, im, linear

    def __call__(self, data: Mapping[Hashable, torch.Tensor | np.ndarray]) -> dict:
        d = dict(data)
        self.last_info = {}
        if self.image_key not in d:
            raise ValueError(f"DenseCRFd: image key {self.image_key!r} is missing from the data (keys: {sorted(map(str, d))})")
        image = d[self.image_key]
        for key in self.key_iterator(d):
            pred = d[key]
            t0 = time.perf_counter()
            p, im, linear = self._check(key, pred, image)
            out, info = dense_crf_regions(p, im, linear, **self.params)
            if out is p:  # nothing to refine: hand back the input object untouched
                info["seconds"] = time.perf_counter() - t0
                self.last_info[key] = info
                logger.info(f"DenseCRFd: no tumour predicted in {key!r}, left unchanged")
                continue
            d[key], *_ = convert_to_dst_type(out, pred)
            info["seconds"] = time.perf_counter() - t0
            self.last_info[key] = info
            logger.info(f"DenseCRFd refined {key!r}: {info.get('voxels', 0)} voxels in {info['seconds']:.2f} s")
        return d
