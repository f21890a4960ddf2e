"""Rigid co-registration of a series to the reference series: Mattes mutual information, multi-resolution.

Both images are first resampled to isotropic working images (``spacing`` mm, 2 by default, smoothed
against aliasing, each in its own orientation). The start is the best of three (scanner coordinates,
centred field-of-view geometry, centred intensity moments), then a regular-step gradient descent of a
rigid (Euler) transform over two levels (4 and 2 mm). A series whose field of view holds less than
:data:`MIN_OVERLAP` of the reference's head in scanner coordinates (series of one study share them)
or after registration, or whose similarity stays poor, raises :class:`PreparationError`. Inside
:func:`single_threaded`, SimpleITK runs on one thread and gives the same transform every run.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from custom.preparation.errors import PreparationError
from custom.preparation.series import RAS_TO_LPS

MIN_MUTUAL_INFORMATION = 0.15
"""Smallest final Mattes mutual information (nats) accepted: the series of generated studies reach 0.8-1.0 once
registered, a noise image on the same field of view stays below it (``tests/test_preparation.py``)."""
MIN_OVERLAP = 0.3
"""Smallest share of the reference's head that must fall inside the series' field of view."""
SEED = 12345  # of the metric sampling (SimpleITK reads 0 as "seed from the wall clock")


@dataclass
class Registration:
    """The rigid transform from the reference series' world to a series' world, and how it was found.

    ``matrix``: 4x4, reference world -> series world (RAS mm); ``rotation_deg``: Euler angles about
    the LPS x, y, z axes; ``translation_mm``: shift of the reference's head centre (LPS);
    ``metric``: final Mattes mutual information (nats, higher is better); ``overlap``: share of the
    reference's head inside the series' field of view.
    """

    sequence: str
    matrix: np.ndarray
    rotation_deg: list
    translation_mm: list
    metric: float
    overlap: float
    start: str
    iterations: int
    seconds: float
    transform: sitk.Transform | None = None

    def to_dict(self) -> dict:
        return {"sequence": self.sequence, "rotation_deg": [round(float(v), 3) for v in self.rotation_deg],
                "translation_mm": [round(float(v), 3) for v in self.translation_mm],
                "rotation_total_deg": round(rotation_angle_deg(self.matrix), 3),
                "matrix_ras": np.round(self.matrix, 6).tolist(), "mutual_information": None if np.isnan(self.metric) else round(float(self.metric), 4),
                "overlap": round(float(self.overlap), 3), "start": self.start, "iterations": self.iterations,
                "seconds": round(self.seconds, 2)}


def rotation_angle_deg(matrix: np.ndarray) -> float:
    """Angle (degrees) of the rotation in the upper-left (3, 3) of ``matrix``."""
    return float(np.degrees(np.arccos(np.clip((np.trace(np.asarray(matrix)[:3, :3]) - 1) / 2, -1, 1))))


def identity(sequence: str) -> Registration:
    """The reference series' own registration (identity)."""
    return Registration(sequence, np.eye(4), [0.0] * 3, [0.0] * 3, float("nan"), 1.0, "reference", 0, 0.0, sitk.Euler3DTransform())


def working_image(img: sitk.Image, spacing: float = 2.0) -> sitk.Image:
    """``img`` resampled to ``spacing`` mm isotropic over the same field of view and orientation (float32),
    Gaussian-smoothed first along axes finer than ``spacing``."""
    sp = np.array(img.GetSpacing(), float)
    sigma = np.sqrt(np.maximum(spacing ** 2 - sp ** 2, 0.0)) / 2.355
    src = sitk.Cast(img, sitk.sitkFloat32)
    if sigma.max() > 0:
        src = sitk.SmoothingRecursiveGaussian(src, [float(max(s, 1e-3)) for s in sigma])
    size = np.maximum(np.ceil(np.array(img.GetSize()) * sp / spacing), 1).astype(int)
    direction = np.array(img.GetDirection(), float).reshape(3, 3)
    corner = np.array(img.GetOrigin()) - direction @ (sp / 2)
    origin = corner + direction @ np.full(3, spacing / 2)
    return sitk.Resample(src, [int(s) for s in size], sitk.Transform(), sitk.sitkLinear, [float(v) for v in origin],
                         [float(spacing)] * 3, img.GetDirection(), 0.0, sitk.sitkFloat32)


def head_points(img: sitk.Image, max_points: int = 20000) -> np.ndarray:
    """World positions (N, 3) LPS mm of a subsample of ``img``'s head voxels (above an Otsu threshold)."""
    arr = sitk.GetArrayFromImage(img)  # (K, J, I)
    fg = arr > otsu_threshold(arr)
    idx = np.argwhere(fg)[:, ::-1].astype(float)
    if len(idx) > max_points:
        idx = idx[np.random.default_rng(SEED).choice(len(idx), max_points, replace=False)]
    direction = np.array(img.GetDirection(), float).reshape(3, 3)
    return idx @ (direction @ np.diag(img.GetSpacing())).T + np.array(img.GetOrigin())


def otsu_threshold(arr: np.ndarray) -> float:
    """Otsu's threshold of the positive values of ``arr`` (of all values if none is positive)."""
    v = arr[arr > 0] if (arr > 0).any() else arr.ravel()
    hist, edges = np.histogram(v, 256)
    c = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * c) / np.maximum(w0, 1)
    m1 = ((hist * c).sum() - np.cumsum(hist * c)) / np.maximum(w1, 1)
    return float(c[np.argmax(w0 * w1 * (m0 - m1) ** 2)])


def overlap(points: np.ndarray, transform: sitk.Transform, moving: sitk.Image) -> float:
    """Share of ``points`` (fixed world, LPS) that ``transform`` maps inside ``moving``'s voxel grid."""
    direction = np.array(moving.GetDirection(), float).reshape(3, 3)
    to_index = np.linalg.inv(direction @ np.diag(moving.GetSpacing()))
    mapped = np.array([transform.TransformPoint(tuple(p)) for p in points[:: max(1, len(points) // 4000)]])
    idx = (mapped - np.array(moving.GetOrigin())) @ to_index.T
    inside = np.all((idx >= -0.5) & (idx <= np.array(moving.GetSize()) - 0.5), axis=1)
    return float(inside.mean())


def transform_matrix(t: sitk.Transform) -> np.ndarray:
    """4x4 RAS matrix of a rigid or affine SimpleITK transform (fixed world -> moving world)."""
    t = sitk.Euler3DTransform(t) if t.GetName() == "Euler3DTransform" else sitk.AffineTransform(t)
    m = np.eye(4)
    a = np.array(t.GetMatrix(), float).reshape(3, 3)
    c = np.array(t.GetCenter(), float)
    m[:3, :3] = a
    m[:3, 3] = np.array(t.GetTranslation(), float) + c - a @ c
    f = np.diag([*np.diag(RAS_TO_LPS), 1.0])
    return f @ m @ f


_single_thread_lock = threading.Lock()
_single_thread_holders = {"count": 0, "threads": 1}  # blocks open, and the setting to restore when the last one ends


@contextlib.contextmanager
def single_threaded():
    """SimpleITK on one thread inside the block, for filters any thread creates meanwhile (the setting is the
    process'): a threaded registration sums its metric in a varying order, so its transform moves a little from run
    to run; on one thread it is the same. A registration's own ``SetNumberOfThreads(1)`` is not enough. Blocks may
    overlap across threads (two studies prepared at once): the setting comes back when the last one ends."""
    with _single_thread_lock:
        if _single_thread_holders["count"] == 0:
            _single_thread_holders["threads"] = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
        _single_thread_holders["count"] += 1
    try:
        yield
    finally:
        with _single_thread_lock:
            _single_thread_holders["count"] -= 1
            if _single_thread_holders["count"] == 0:
                sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(_single_thread_holders["threads"])


def _method(levels=(2, 1), sampling: float = 0.15, iterations: int = 200) -> sitk.ImageRegistrationMethod:
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=48)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(sampling, SEED)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-3, numberOfIterations=iterations,
                                                 relaxationFactor=0.6, gradientMagnitudeTolerance=1e-8)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(list(levels))
    reg.SetSmoothingSigmasPerLevel([max(0.0, float(s) - 1.0) for s in levels])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    return reg


def register_rigid(fixed: sitk.Image, moving: sitk.Image, sequence: str, spacing: float = 2.0,
                   fixed_work: sitk.Image | None = None, min_metric: float = MIN_MUTUAL_INFORMATION) -> Registration:
    """Rigid transform of series ``moving`` (named ``sequence``) onto the reference ``fixed``.

    ``fixed_work``: the reference's working image if already computed. Raises
    :class:`PreparationError` when the series does not overlap the reference's head (less than
    :data:`MIN_OVERLAP` of it inside the series' field of view, at the start and at the end) or the
    final mutual information stays below ``min_metric``.
    """
    t0 = time.perf_counter()
    fw = fixed_work if fixed_work is not None else working_image(fixed, spacing)
    mw = working_image(moving, spacing)
    pts = head_points(fw)
    centre = pts.mean(0)
    scanner = sitk.Euler3DTransform()
    scanner.SetCenter([float(v) for v in centre])
    if overlap(pts, scanner, mw) < MIN_OVERLAP:
        raise PreparationError(
            f"{sequence} series: does not overlap the reference series (less than {MIN_OVERLAP:.0%} of the reference's head inside its "
            f"field of view in scanner coordinates: check that both series are of the same patient and study)")
    starts = {}
    for name in ("scanner", "geometry", "moments"):
        t = sitk.Euler3DTransform()
        t.SetCenter([float(v) for v in centre])
        if name != "scanner":
            init = sitk.CenteredTransformInitializer(fw, mw, sitk.Euler3DTransform(), getattr(sitk.CenteredTransformInitializerFilter, name.upper()))
            t = sitk.Euler3DTransform(init)
        share = overlap(pts, t, mw)
        if share < MIN_OVERLAP:
            continue
        probe = _method()
        probe.SetInitialTransform(t, inPlace=False)
        try:
            starts[name] = (probe.MetricEvaluate(fw, mw), t, share)
        except RuntimeError:
            continue
    if not starts:
        raise PreparationError(f"{sequence} series: registration to the reference failed (no start with the reference's head in view)")
    start = min(starts, key=lambda k: starts[k][0])
    reg = _method()
    reg.SetInitialTransform(starts[start][1], inPlace=False)
    try:
        final = reg.Execute(fw, mw)
    except RuntimeError as e:
        raise PreparationError(f"{sequence} series: registration to the reference failed ({str(e).strip().splitlines()[-1]})") from e
    final = sitk.CompositeTransform(final).GetNthTransform(0) if final.GetName() == "CompositeTransform" else final
    euler = sitk.Euler3DTransform(final)
    share = overlap(pts, euler, mw)
    metric = -float(reg.GetMetricValue())
    if share < MIN_OVERLAP:
        raise PreparationError(f"{sequence} series: does not overlap the reference series after registration "
                               f"({share:.0%} of the reference's head inside its field of view)")
    if metric < min_metric:
        raise PreparationError(f"{sequence} series: poor similarity to the reference after registration (mutual information "
                               f"{metric:.3f} < {min_metric}): not the same head, or a corrupt series")
    angles = np.degrees([euler.GetAngleX(), euler.GetAngleY(), euler.GetAngleZ()])
    return Registration(sequence, transform_matrix(euler), angles.tolist(), list(euler.GetTranslation()), metric, share, start,
                        int(reg.GetOptimizerIteration()), time.perf_counter() - t0, euler)
