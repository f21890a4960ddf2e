"""Brain extraction on the reference series: an atlas registered onto the head, and deepbet.

1. :func:`atlas_prior`: a head model registered onto the reference, its brain mask carried over.
   The model is the MNI ICBM152 2009a T1 brain template that nilearn ships in its wheel (no
   download; brain mask: template > 0.2, nilearn's own definition) inside a dark shell (CSF and
   bone) and a bright one (scalp): nilearn has no template with the head. Mattes mutual information
   over the reference's head on 2 mm working images: similarity (three starting scales, the top of
   the brain 12 mm under the top of the head; the result of highest mutual information goes on, or, of
   those near it, the one whose brain agrees clearly better with deepbet's, 3), then affine, then optionally a
   coarse B-spline.
   Without the shells (brain template, moving mask) the optimum is a brain too small: its mutual
   information is higher than the true alignment's.
2. :func:`refine_mask` on the model grid: the intracranial space, i.e. voxels brighter than bone
   (threshold between the skull's level and the brain edge's) connected to the prior's core, within
   ``reach`` mm of the prior's edge; the prior's core is always kept.
3. :func:`~custom.preparation.deepbet_brain.deepbet_mask`: deepbet's network (trained on real
   T1-weighted heads, weights in its wheel) on the reference; the atlas still places the grid.

A series that is already skull-stripped (BraTS-ready input, research data) keeps its own brain:
:func:`stripped_mask` (the default ``"auto"`` tries it first, then :data:`AUTO_METHOD`). Methods
(:data:`METHODS`): ``"skull-stripped"``, ``"atlas-deformable"`` (prior > 0.5 after the B-spline
step), ``"atlas-affine"`` (after the affine step), ``"atlas+intensity"`` (the affine prior refined by
2), ``"deepbet"`` (3 on the affine atlas' grid), ``"deepbet+atlas"`` (3, less what lies more than
:data:`ATLAS_GUARD_MM` outside 1's affine brain, whose start 3 chose: deepbet learnt from real heads, the head
model's shells are made up, so the atlas only vetoes gross errors such as eyes or neck);
measured against each other by ``benchmarks/preparation.py``.
"""

from __future__ import annotations

import functools
import time
import warnings

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from custom.preparation.deepbet_brain import deepbet_mask
from custom.preparation.errors import PreparationError
from custom.preparation.grid import ModelGrid, lattice_rotation, resample_to_grid, upright_rotation
from custom.preparation.registration import SEED, head_points, otsu_threshold, single_threaded, transform_matrix, working_image
from custom.preparation.series import RAS_TO_LPS, image_affine, image_from_array

METHODS = ("auto", "skull-stripped", "atlas-affine", "atlas-deformable", "atlas+intensity", "deepbet", "deepbet+atlas")
AUTO_METHOD = "deepbet+atlas"  # what "auto" does on a head with its skull, whatever the reference's voxel size and contrast
ATLAS_METHODS = ("atlas-affine", "atlas-deformable", "atlas+intensity", "deepbet", "deepbet+atlas")
STRIPPED_BACKGROUND_SHARE = 0.3  # of the voxels at the corners' exact value: a skull-stripped series
STRIPPED_VOLUME_ML = (500.0, 2500.0)  # what such a series' non-background may measure to count as a brain
BRAIN_TOP_DEPTH_MM = 12.0  # scalp + skull above the top of the brain, for the start of the atlas registration
SHELL_MM = (5.0, 7.0)  # the head model's CSF-and-bone and scalp layers around the template's brain
BORDER_GROWTH_MM = 20.0  # how far the grid grows past a brain that reaches its border
BSPLINE_ITERATIONS = 25  # of the coarse deformable step, on 4 mm images
ATLAS_GUARD_MM = 3.0  # "deepbet+atlas": how far outside the atlas' brain deepbet's brain may reach
START_METRIC_SHARE = 0.75  # "deepbet+atlas": of the best start's mutual information, what a start needs for deepbet to choose it
START_OVERLAP_MARGIN = 0.03  # "deepbet+atlas": how much more a start's brain must overlap deepbet's than the best start's does (Dice)


@functools.lru_cache(maxsize=1)
def template() -> tuple[sitk.Image, sitk.Image]:
    """The head model (float32) and its brain mask (float32), 1 mm: the MNI152 2009a T1 brain template
    (brain mask: template > 0.2, nilearn's own definition) in a shell of dark CSF and bone
    (:data:`SHELL_MM` [0]) and of bright scalp (:data:`SHELL_MM` [1]), padded by 20 mm."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nilearn import datasets

        img = datasets.load_mni152_template(resolution=1)
    pad = 20
    data = np.pad(np.asarray(img.get_fdata(), np.float32), pad)
    mask = data > 0.2
    wm_level = float(np.percentile(data[mask], 90))
    outside = ndi.distance_transform_edt(~mask).astype(np.float32)
    head = np.where(mask, data, 0.0)
    head = np.where(~mask & (outside <= SHELL_MM[0]), 0.05 * wm_level, head)
    head = np.where((outside > SHELL_MM[0]) & (outside <= SHELL_MM[0] + SHELL_MM[1]), 0.8 * wm_level, head)
    head = ndi.gaussian_filter(head, 1.0).astype(np.float32)
    affine = np.asarray(img.affine, float).copy()
    affine[:3, 3] -= affine[:3, :3] @ np.full(3, pad)
    return image_from_array(head, affine), image_from_array(mask.astype(np.float32), affine)


def _anchor(points: np.ndarray, depth: float) -> tuple[np.ndarray, float]:
    """The (x, y) centre of ``points`` (LPS mm) from ``depth`` to ``depth`` + 80 mm under their top, at
    the top minus ``depth``, and their mean width along x and y (5th to 95th percentile) less twice ``depth``."""
    top = float(np.percentile(points[:, 2], 99.5))
    upper = points[(points[:, 2] < top - depth) & (points[:, 2] > top - depth - 80.0)]
    lo, hi = np.percentile(upper[:, :2], 5, axis=0), np.percentile(upper[:, :2], 95, axis=0)
    return np.array([(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, top - depth]), float((hi - lo).mean() - 2 * depth)


def _stage(fixed, moving, transform, levels, fixed_mask):
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=48)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.2, SEED)
    reg.SetMetricFixedMask(fixed_mask)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-3, numberOfIterations=150, relaxationFactor=0.6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(list(levels))
    reg.SetSmoothingSigmasPerLevel([max(0.0, s - 1.0) for s in levels])
    reg.SetInitialTransform(transform, inPlace=False)
    out = reg.Execute(fixed, moving)
    if out.GetName() == "CompositeTransform":
        out = sitk.CompositeTransform(out).GetNthTransform(0)
    return out, -float(reg.GetMetricValue())


def overlap(fixed: sitk.Image, transform: sitk.Transform, brain: sitk.Image) -> float:
    """Dice of the template's brain carried onto ``fixed``'s grid by ``transform`` (``fixed`` world ->
    template world) with ``brain`` (a mask in the same world, any grid)."""
    a = sitk.GetArrayViewFromImage(sitk.Resample(template()[1], fixed, transform, sitk.sitkLinear, 0.0)) > 0.5
    b = sitk.GetArrayViewFromImage(sitk.Resample(brain, fixed, sitk.Transform(), sitk.sitkNearestNeighbor, 0)) > 0
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def atlas_prior(reference: sitk.Image, reference_work: sitk.Image | None = None, spacing: float = 2.0,
                deformable: bool = True, brain_mask: sitk.Image | None = None) -> tuple[np.ndarray, sitk.Transform, float]:
    """The template registered onto ``reference``: ``(affine, transform, metric)``.

    ``affine``: 4x4 RAS matrix, reference world -> template world; ``transform``: the same with, if
    ``deformable``, a coarse B-spline step first (control points every ~50 mm); ``metric``: final
    mutual information (nats). Of the similarity stage's starting scales, the result with the highest
    mutual information goes on, or, given ``brain_mask`` (the reference's brain by another method, e.g.
    deepbet's; a mask in the reference world), of those reaching :data:`START_METRIC_SHARE` of it, the one
    whose brain overlaps ``brain_mask`` most (:func:`overlap`), where it does so by more than
    :data:`START_OVERLAP_MARGIN`: on some heads, and on T2s, the highest mutual information is a brain a fifth
    too small; where deepbet takes scalp, a start far below the best mutual information would follow it; and a
    near tie, which rounding can turn either way, leaves the highest mutual information.
    """
    fw = reference_work if reference_work is not None else working_image(reference, spacing)
    mw = working_image(template()[0], spacing)
    head, head_width = _anchor(head_points(fw), BRAIN_TOP_DEPTH_MM)
    fmask = sitk.BinaryDilate(sitk.Cast(fw > otsu_threshold(sitk.GetArrayFromImage(fw)), sitk.sitkUInt8), [3] * 3)  # the head
    brain, brain_width = _anchor(head_points(mw), BRAIN_TOP_DEPTH_MM)
    s0 = float(np.clip(brain_width / max(head_width, 1.0), 0.8, 1.25))
    found = []
    for scale in (s0 * 0.9, s0, s0 * 1.1):  # the likeliest local optimum is a brain too small or too large
        sim = sitk.Similarity3DTransform()
        sim.SetCenter([float(v) for v in head])
        sim.SetScale(float(scale))
        sim.SetTranslation([float(v) for v in brain - head])
        found.append(_stage(fw, mw, sim, (4, 2), fmask))
    best = max(range(len(found)), key=lambda i: found[i][1])
    chosen, top = best, found[best][1]
    if brain_mask is not None:
        agree = {i: overlap(fw, t, brain_mask) for i, (t, metric) in enumerate(found) if metric >= min(top, START_METRIC_SHARE * top)}
        closest = max(agree, key=agree.get)
        if agree[closest] > agree[best] + START_OVERLAP_MARGIN:
            chosen = closest
    sim = found[chosen][0]
    aff = sitk.AffineTransform(3)
    s = sitk.Similarity3DTransform(sim)
    aff.SetCenter(s.GetCenter())
    aff.SetMatrix(s.GetMatrix())
    aff.SetTranslation(s.GetTranslation())
    aff, metric = _stage(fw, mw, aff, (2, 1), fmask)
    aff = sitk.AffineTransform(aff)
    if not deformable:
        return transform_matrix(aff), aff, metric
    # coarse B-spline on the brain's box of the reference (its world), started at the affine result
    inv = np.linalg.inv(transform_matrix(aff))
    corners = np.array([[x, y, z] for x in (-75.0, 75.0) for y in (-110.0, 80.0) for z in (-75.0, 85.0)])  # MNI brain box, RAS mm
    box = corners @ inv[:3, :3].T + inv[:3, 3]
    lo_lps, hi_lps = np.diag(RAS_TO_LPS) * box.min(0), np.diag(RAS_TO_LPS) * box.max(0)
    lo, hi = np.minimum(lo_lps, hi_lps) - 10.0, np.maximum(lo_lps, hi_lps) + 10.0
    size = [int(np.ceil((h - lo_) / spacing)) for lo_, h in zip(lo, hi)]
    domain = sitk.Resample(fw, size, sitk.Transform(), sitk.sitkLinear, [float(v) for v in lo], [spacing] * 3, [1, 0, 0, 0, 1, 0, 0, 0, 1], 0.0)
    bsp = sitk.BSplineTransformInitializer(domain, [4, 4, 4], order=3)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=48)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.1, SEED)
    reg.SetMetricFixedMask(sitk.Resample(fmask, domain, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=BSPLINE_ITERATIONS, maximumNumberOfCorrections=5,
                             maximumNumberOfFunctionEvaluations=2 * BSPLINE_ITERATIONS, costFunctionConvergenceFactor=1e7)
    reg.SetShrinkFactorsPerLevel([2])
    reg.SetSmoothingSigmasPerLevel([1.0])
    reg.SetMovingInitialTransform(aff)
    reg.SetInitialTransform(bsp, inPlace=True)
    reg.Execute(domain, mw)
    return transform_matrix(aff), sitk.CompositeTransform([aff, bsp]), -float(reg.GetMetricValue())


def prior_on_grid(transform: sitk.Transform, grid: ModelGrid) -> np.ndarray:
    """The template's brain mask (probability, float32 ``grid.shape``) carried onto ``grid`` by ``transform``
    (reference world -> template world, LPS)."""
    out = sitk.Resample(template()[1], grid.empty(), transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return np.transpose(sitk.GetArrayFromImage(out), (2, 1, 0))


def refine_mask(image: np.ndarray, prior: np.ndarray, spacing: float, reach: float = 6.0, core_depth: float = 6.0) -> np.ndarray:
    """The intracranial mask (bool, ``image.shape``) of ``image`` around ``prior`` (probability), voxels of ``spacing`` mm.

    Voxels above a bone threshold, connected to the prior's core (deeper than ``core_depth`` mm), at
    most ``reach`` mm outside the prior's edge, holes filled; never less than the core.
    """
    inside = prior > 0.5
    if not inside.any():
        raise PreparationError("brain extraction: the atlas prior is empty (the reference series holds no head)")
    d_in = ndi.distance_transform_edt(inside, sampling=spacing)
    d_out = ndi.distance_transform_edt(~inside, sampling=spacing)
    core = d_in > core_depth
    smooth = ndi.gaussian_filter(image.astype(np.float32), 1.0 / spacing)
    ring = (d_out > 0) & (d_out <= 12.0)
    edge = inside & (d_in <= 3.0)
    bone = float(np.percentile(smooth[ring], 5))
    level = float(np.median(smooth[edge]))
    cand = (smooth > bone + 0.4 * (level - bone)) & (d_out <= reach)
    cand = ndi.binary_opening(cand, iterations=1)
    lab, n = ndi.label(cand)
    if n == 0:
        return core | inside
    counts = np.bincount(lab[core], minlength=n + 1)
    counts[0] = 0
    mask = lab == int(np.argmax(counts))
    mask = ndi.binary_closing(mask, iterations=2) | core
    return ndi.binary_fill_holes(mask)


def near(mask: np.ndarray, distance_mm: float, spacing: float) -> np.ndarray:
    """The voxels (bool, ``mask.shape``) at most ``distance_mm`` from ``mask`` (voxels of ``spacing`` mm; the mask included)."""
    out = np.zeros(mask.shape, bool)
    if not mask.any():
        return out
    pad = int(np.ceil(distance_mm / spacing)) + 1  # the mask's box and the reach around it
    box = tuple(slice(max(s.start - pad, 0), min(s.stop + pad, n)) for s, n in zip(ndi.find_objects(mask.astype(np.uint8))[0], mask.shape))
    out[box] = ndi.distance_transform_edt(~mask[box], sampling=spacing) <= distance_mm
    return out


def _touches_border(mask: np.ndarray) -> bool:
    return bool(mask[[0, -1]].any() or mask[:, [0, -1]].any() or mask[:, :, [0, -1]].any())


def stripped_mask(reference: sitk.Image) -> np.ndarray | None:
    """The brain of an already skull-stripped series, ``(I, J, K)`` bool, or None if it is not one.

    Skull-stripped: the 8 corner voxels hold one exact value (the background; scanner noise never
    does), at least :data:`STRIPPED_BACKGROUND_SHARE` of the voxels hold it, and the largest connected
    rest (holes filled) measures :data:`STRIPPED_VOLUME_ML`."""
    data = np.transpose(sitk.GetArrayViewFromImage(reference), (2, 1, 0))
    corners = data[np.ix_(*[[0, n - 1] for n in data.shape])]
    if not np.all(corners == corners.flat[0]):
        return None
    foreground = data != corners.flat[0]
    if 1.0 - foreground.mean() < STRIPPED_BACKGROUND_SHARE:
        return None
    lab, n = ndi.label(foreground)
    if n == 0:
        return None
    mask = ndi.binary_fill_holes(lab == int(np.argmax(np.bincount(lab.ravel())[1:])) + 1)
    volume_ml = float(mask.sum() * np.prod(reference.GetSpacing()) / 1000.0)
    return mask if STRIPPED_VOLUME_ML[0] <= volume_ml <= STRIPPED_VOLUME_ML[1] else None


def not_stripped(series: str) -> PreparationError:
    """The error of brain method ``"skull-stripped"`` on a ``series`` (its name) that :func:`stripped_mask` finds is not."""
    return PreparationError(f"the {series} series is not skull-stripped (no constant background around a brain-sized region): "
                            "use brain extraction (method 'auto' or an atlas method)")


def extract_brain(reference: sitk.Image, grid_for, method: str = "auto", reference_work: sitk.Image | None = None) -> dict:
    """Brain mask of ``reference`` on the model grid: ``{"mask", "grid", "matrix", "metric", "volume_ml", "seconds", "method"}``.

    ``grid_for(points_ras, rotation)`` makes the model grid around the brain's points (N, 3; RAS mm),
    its axes those of the head (``rotation``: reference world -> the atlas' axes) when the atlas was
    registered, else the reference's own (:func:`~custom.preparation.grid.lattice_rotation`; None: the scanner's).
    ``method`` ``"auto"``: the series' own brain if it is skull-stripped (:func:`stripped_mask`), else
    :data:`AUTO_METHOD`; ``"skull-stripped"`` raises ``PreparationError`` if it is not.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    t0 = time.perf_counter()
    if method in ("auto", "skull-stripped"):
        own = stripped_mask(reference)
        if own is not None:
            aff = image_affine(reference)
            pts = np.argwhere(own)
            world = pts @ aff[:3, :3].T + aff[:3, 3]
            grid = grid_for(world, lattice_rotation(aff))
            own_img = image_from_array(own.astype(np.uint8), aff, np.uint8)
            mask = resample_to_grid(own_img, grid, label=True) > 0
            return {"mask": mask, "grid": grid, "matrix": np.eye(4), "metric": float("nan"), "method": "skull-stripped",
                    "volume_ml": float(mask.sum() * grid.spacing ** 3 / 1000.0), "seconds": time.perf_counter() - t0}
        if method == "skull-stripped":
            raise not_stripped("reference")
        method = AUTO_METHOD
    net = None
    if method in ("deepbet", "deepbet+atlas"):
        net_mask, net_affine = deepbet_mask(reference)
        net = image_from_array(net_mask.astype(np.uint8), net_affine, np.uint8)
    with single_threaded():
        matrix, transform, metric = atlas_prior(reference, reference_work, deformable=method == "atlas-deformable",
                                                brain_mask=net if method == "deepbet+atlas" else None)
    tmask = template()[1]
    pts = np.argwhere(np.transpose(sitk.GetArrayFromImage(tmask), (2, 1, 0)) > 0.5)
    world = pts @ image_affine(tmask)[:3, :3].T + image_affine(tmask)[:3, 3]
    inv = np.linalg.inv(matrix)
    ref_world = world[:: 7] @ inv[:3, :3].T + inv[:3, 3]
    upright = upright_rotation(matrix)
    grid = grid_for(ref_world, upright)
    prior = prior_on_grid(transform, grid)
    for _ in range(3):  # a deformed prior can reach past the grid placed by the affine one: widen the grid
        if not _touches_border(prior > 0.5):
            break
        pts = np.argwhere(prior > 0.5)[:: 7]
        inside = pts @ grid.affine[:3, :3].T + grid.affine[:3, 3]
        frame = inside @ upright.T
        grown = np.concatenate([frame.min(0) - BORDER_GROWTH_MM, frame.max(0) + BORDER_GROWTH_MM]).reshape(2, 3)
        grid = grid_for(np.concatenate([inside, grown @ upright]), upright)
        prior = prior_on_grid(transform, grid)
    if method == "atlas+intensity":
        mask = refine_mask(resample_to_grid(reference, grid), prior, grid.spacing)
    elif net is not None:
        mask = resample_to_grid(net, grid, label=True) > 0
        if method == "deepbet+atlas":
            mask &= near(prior > 0.5, ATLAS_GUARD_MM, grid.spacing)
    else:
        mask = prior > 0.5
    return {"mask": mask, "grid": grid, "matrix": matrix, "metric": metric, "method": method,
            "volume_ml": float(mask.sum() * grid.spacing ** 3 / 1000.0), "seconds": time.perf_counter() - t0}


